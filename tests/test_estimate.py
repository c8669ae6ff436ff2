"""`tmbatch estimate` and prices: the cost of an input before anything billable is sent.

The CLI runs for real (a subprocess); /tokenize is asked of the simulator over a real socket,
and the simulator's counters prove nothing billable was sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, chat_line, clean_env, run_cli, write_jsonl
from tmbatch.base.config import ConfigError
from tmbatch.limits import estimate_tokens
from tmbatch.spend.prices import Price, load_file, price_flag, resolve
from tmbatch.spend.tokens import DEFAULT_MAX_OUTPUT_TOKENS, output_ceiling, prompt_tokens

PRICES_TOML = """# USD per million tokens (the user's own prices)
["tm-small"]
input = 0.20
output = 0.60
cached_input = 0.05
"""


def _rows() -> list[Any]:
    rows: list[Any] = [chat_line(i, max_tokens=32) for i in range(6)]
    rows += [chat_line(i, model="tm-large", max_tokens=100) for i in range(6, 9)]
    del rows[8]["body"]["max_tokens"]  # no cap: counted at the default
    rows.append(b"{not json")
    rows.append({"custom_id": "tok", "method": "POST", "url": "/tokenize",
                 "body": {"model": "tm-small", "prompt": "hello there"}})
    return rows


# -- the estimator and prices, as functions ---------------------------------------------------

def test_output_ceiling_counts_each_of_n_choices() -> None:
    body = {"prompt": "abcd", "max_tokens": 10, "n": 3}
    assert output_ceiling(body) == 30
    assert estimate_tokens(body) == prompt_tokens(body) + 30  # --tpm charges the same
    assert output_ceiling({"prompt": "abcd"}) == DEFAULT_MAX_OUTPUT_TOKENS
    assert output_ceiling(body, generates=False) == 0


def _rule_chars(value: Any) -> int:
    """The estimator's rule as docs/budgets.md states it, written plainly: a string's
    characters; a list's strings, 4 a token id, and each message or part's content and text
    plus 4; a message's content and text; nothing else."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, int):
                total += 4
            elif isinstance(item, dict):
                total += _rule_chars(item.get("content")) + _rule_chars(item.get("text")) + 4
        return total
    if isinstance(value, dict):
        return _rule_chars(value.get("content")) + _rule_chars(value.get("text"))
    return 0


class _Str(str):
    pass


class _List(list):  # type: ignore[type-arg]
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


def test_the_prompt_estimate_follows_its_rule_on_every_shape() -> None:
    """The estimator reads the types JSON makes by exact type (it runs once per attempt); a
    body built in Python with subclasses, bools, floats or nesting is counted by the same rule."""
    import random

    rng = random.Random(7)

    def value(depth: int = 0) -> Any:
        leaves = ["ab" * rng.randrange(4), rng.randrange(50), 2.5, None, True, _Str("xyz")]
        if depth >= 3:
            return rng.choice(leaves)
        nested = [lambda: [value(depth + 1) for _ in range(rng.randrange(4))],
                  lambda: {"role": "user", "content": value(depth + 1), "text": value(depth + 1)},
                  lambda: {"content": value(depth + 1)},
                  lambda: _List(value(depth + 1) for _ in range(rng.randrange(3))),
                  lambda: _Dict(content=value(depth + 1))]
        return rng.choice(nested)() if rng.random() < 0.6 else rng.choice(leaves)

    fields = ("messages", "prompt", "input", "instructions", "tokens", "model")
    for _ in range(5000):
        body = {k: value() for k in rng.sample(fields, 3)}
        chars = sum(_rule_chars(body.get(k)) for k in fields[:5])
        assert prompt_tokens(body) == chars // 4 + 1, body
    chat = {"messages": [{"role": "system", "content": "You are concise."},
                         {"role": "user", "content": [{"type": "text", "text": "Tea?"}]}]}
    assert prompt_tokens(chat) == ((16 + 4) + (4 + (4 + 4))) // 4 + 1  # messages, a part


def test_price_cost_charges_cached_prompt_tokens_at_their_price() -> None:
    p = Price(0.2, 0.6, 0.05)
    assert p.cost(1_000_000, 1_000_000) == pytest.approx(0.8)
    assert p.cost(1_000_000, 0, cached=400_000) == pytest.approx(0.6 * 0.2 + 0.4 * 0.05)
    assert Price(1.0, 2.0).cost(1_000_000, 0, cached=10) == pytest.approx(1.0)  # no cached price


def test_price_files_in_toml_and_json_and_flags_win_model_by_model(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(PRICES_TOML)
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"tm-large": {"input": 1, "output": 3}}))
    assert load_file(str(toml)) == {"tm-small": Price(0.2, 0.6, 0.05)}
    assert load_file(str(js)) == {"tm-large": Price(1.0, 3.0)}
    assert price_flag("mock-model:mock-tools=0.1:0.2") == ("mock-model:mock-tools",
                                                            Price(0.1, 0.2))
    job = {"tm-small": Price(9, 9), "tm-x": Price(5, 5)}
    prices = resolve(str(toml), [price_flag("tm-small=1:2:0.5")], job)
    assert prices.get("tm-small") == Price(1, 2, 0.5)  # flag > file > job
    assert prices.get("tm-x") == Price(5, 5)
    assert prices.missing(["tm-small", "tm-large", "tm-x"]) == ["tm-large"]


@pytest.mark.parametrize("text,needle", [
    ('["m"]\ninput = 0.1\n', "key `m.output` is missing"),
    ('["m"]\ninput = -1\noutput = 1\n', "key `m.input` must be a number of 0 or more"),
    ('["m"]\ninput = 1\noutput = 1\nouptut = 2\n',
     "unknown key `m.ouptut`; did you mean `m.output`"),
    ('m = 3\n', "key `m` must be a table"),
    ('["m"\n', "not valid TOML"),
])
def test_a_bad_price_file_names_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_file(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_bad_prices_on_the_command_line_are_one_clear_line(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    bad = tmp_path / "p.toml"
    bad.write_text('["tm-small"]\ninput = "cheap"\noutput = 1\n')
    p = run_cli(["estimate", str(inp), "--prices", str(bad)])
    assert p.returncode == 2
    assert "tm-small.input` must be a number of 0 or more" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli(["estimate", str(inp), "--price", "tm-small=1"])
    assert p.returncode == 2 and "expected MODEL=IN:OUT" in p.stderr


# -- the command --------------------------------------------------------------------------------

def test_estimate_per_model_and_total_with_bad_lines_listed_as_validate_does(
        tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", _rows())
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    p = run_cli(["estimate", str(inp), "--prices", str(prices), "--json"])
    assert p.returncode == 1, p.stderr  # a bad line, as validate says
    *bad, last = [orjson.loads(x) for x in p.stdout.splitlines()]
    v = run_cli(["validate", str(inp), "--json"])
    assert bad == [orjson.loads(x) for x in v.stdout.splitlines()][:-1]
    assert [b["line"] for b in bad] == [10] and bad[0]["code"] == "invalid_json"

    bodies = [r["body"] for r in _rows()[:9]]  # the same estimator --tpm uses, line by line
    small = bodies[:6]
    got = last["by_model"]
    assert got["tm-small"]["lines"] == 6 and got["tm-small"]["unbilled_lines"] == 1
    assert got["tm-small"]["prompt_tokens"] == sum(prompt_tokens(b) for b in small)
    assert got["tm-small"]["worst_tokens"] == sum(estimate_tokens(b) for b in small)
    assert got["tm-large"]["output_ceiling"] == 100 * 2 + DEFAULT_MAX_OUTPUT_TOKENS
    assert got["tm-large"]["lines_without_output_cap"] == 1
    assert last["total"]["worst_tokens"] == sum(estimate_tokens(b) for b in bodies)
    assert (last["valid"], last["invalid"]) == (10, 1)

    # a price for tm-small only: its cost is a range, tm-large is named and left out
    price = Price(0.2, 0.6, 0.05)
    s = got["tm-small"]
    assert s["cost_usd"]["worst"] == pytest.approx(
        price.cost(s["prompt_tokens"], s["output_ceiling"]), abs=1e-6)
    assert s["cost_usd"]["expected"] == pytest.approx(
        price.cost(s["prompt_tokens"], s["output_ceiling"] / 2), abs=1e-6)
    assert got["tm-large"]["cost_usd"] is None
    assert last["total"]["cost_usd"]["worst"] == s["cost_usd"]["worst"]
    assert last["total"]["cost_usd"]["excludes_models"] == ["tm-large"]
    assert last["unpriced_models"] == ["tm-large"]
    assert "no price for tm-large" in p.stderr


def test_estimate_text_says_what_the_figures_exclude_and_assume(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", _rows())
    p = run_cli(["estimate", str(inp), "--price", "tm-small=0.2:0.6", "--expected-output",
                 "0.25"])
    assert p.returncode == 1
    out = p.stdout
    assert f"{inp}:10: invalid_json:" in out  # the bad line, listed as validate lists it
    assert "tm-large" in out and "no price" in out
    assert "cost figures exclude tm-large" in out
    assert "1 line(s) set no max_tokens" in out and f"counted at {DEFAULT_MAX_OUTPUT_TOKENS}" in out
    assert "25% of the output ceiling" in out
    total = next(ln for ln in out.splitlines() if ln.startswith("total"))
    assert total.rstrip().endswith("*")


def test_estimate_tokenize_compares_with_the_server_and_bills_nothing(sim_factory: Any,
                                                                       tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    rows = [chat_line(i) for i in range(8)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    p = run_cli(["estimate", str(inp), "--tokenize", "50", "--json", "--base-url", sim.url],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert p.returncode == 0, p.stderr
    tok = orjson.loads(p.stdout)["tokenize"]
    # every line sampled (50 > 8): the simulator counts words of the chat messages
    words = sum(len(m["content"].split()) for r in rows for m in r["body"]["messages"])
    assert tok["sampled"] == 8 and tok["server_prompt_tokens"] == words
    assert tok["estimated_prompt_tokens"] == sum(prompt_tokens(r["body"]) for r in rows)
    assert tok["estimate_to_server"] == pytest.approx(tok["estimated_prompt_tokens"] / words,
                                                      abs=1e-3)
    stats = sim.stats()
    assert stats["tokenize_calls"] == 8 and stats["completion_calls"] == 0

    text = run_cli(["estimate", str(inp), "--tokenize", "3", "--base-url", sim.url],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert "tokenize: on 3 sampled line(s) the server counted" in text.stdout


def test_estimate_tokenize_with_a_refused_key_exits_3(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["estimate", str(inp), "--tokenize", "--base-url", sim.url],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY="tm-wrong-key-0123456789abcdef"))
    assert p.returncode == 3 and "/tokenize refused the key" in p.stderr
    assert "tm-wrong-key" not in p.stderr + p.stdout


def test_estimate_of_a_labelling_job_uses_its_prices_and_renders_its_records(
        tmp_path: Path) -> None:
    records = write_jsonl(tmp_path / "records.jsonl",
                          [{"id": i, "text": "good stuff " * i} for i in range(1, 5)]
                          + [{"text": "no id"}])
    job = tmp_path / "job.toml"
    job.write_text(
        'input = "records.jsonl"\nmodel = "tm-small"\n'
        '[label]\nid_field = "id"\ntemplate = "Review: {text}"\nlabels = ["a", "b"]\n'
        '[prices."tm-small"]\ninput = 1.0\noutput = 2.0\n')
    p = run_cli(["estimate", str(job), "--json"])
    assert p.returncode == 1, p.stderr  # the record without an id
    *bad, last = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert [b["code"] for b in bad] == ["invalid_id"] and bad[0]["line"] == 5
    assert last["input"] == str(records) and last["by_model"]["tm-small"]["lines"] == 4
    assert last["prices_from"] == ["job.toml [prices]"]
    assert last["total"]["cost_usd"]["worst"] > 0
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('input = "records.jsonl"\n[prices."tm-small"]\ninput = 1.0\n')
    p = run_cli(["estimate", str(wrong)])
    assert p.returncode == 2 and "prices.tm-small.output` is missing" in p.stderr
