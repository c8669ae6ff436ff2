"""Several models and samples per line (`--models`, `--samples`): real simulator, real processes.

Each model's directory is checked as a standard output directory: one outcome per unit,
unique custom_ids, resumable after a real SIGKILL with nothing processed twice (the
simulator counts what it processed per Idempotency-Key, one per custom_id and so per
sample), a model the server does not serve failing alone, one budget across the models, and
the cache answering every sample of a rerun.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    clean_env,
    keyed_env,
    read_jsonl,
    run_cli,
    wait_for_calls,
    write_jsonl,
)
from tmbatch.client.http import idempotency_key
from tmbatch.inputs.reader import Request
from tmbatch.inputs.samples import dir_name, model_of_dir, unit_line

JOB = "fanoutjob01"
MODELS = ("tm-small", "tm-large")


def cmd(sim: Any, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "-q", "--base-url", sim.url, "--job-id", JOB,
            *extra]


def start(sim: Any, inp: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tmbatch", *cmd(sim, inp, out, *extra)],
                            env=keyed_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def kill_after(proc: subprocess.Popen[bytes], sim: Any, calls: int) -> None:
    """SIGKILL once the simulator has received `calls` billable requests in all."""
    wait_for_calls(sim, calls, proc, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def check_directory(out: Path, n: int, samples: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A standard output directory of n lines x samples units: every unit exactly one outcome,
    ids unique, each outcome's sample and line as documented."""
    res, fail = read_jsonl(out / "results.jsonl"), read_jsonl(out / "failures.jsonl")
    ids = Counter(r["custom_id"] for r in res + fail)
    assert [c for c, k in ids.items() if k != 1] == []
    assert set(ids) == {f"req-{i}#{k}" for i in range(n) for k in range(samples)}
    for r in res + fail:
        i, k = r["custom_id"].removeprefix("req-").split("#")
        assert r["sample"] == int(k)
        assert r["line"] == int(i) * samples + int(k) + 1  # line (L-1)*N+k+1 of units.jsonl
    for r in res:
        assert set(r) >= {"id", "custom_id", "response", "error"} and r["error"] is None
        assert r["response"]["status_code"] == 200
    return {r["custom_id"]: r for r in res}, {f["custom_id"]: f for f in fail}


@pytest.mark.parametrize(("via", "kills"), [("seed", (150, 750)), ("n", (50, 250))])
def test_two_models_three_samples_200_lines_resume_after_kill_9(
        sim_factory: Any, tmp_path: Path, via: str, kills: tuple[int, int]) -> None:
    """--models A,B --samples 3 on 200 lines, SIGKILLed once in each model's run and run
    again: 1,200 outcomes, 600 per directory, nothing processed twice. With `n` a line's
    three samples are one request (200 a model), so the kills come after fewer of them."""
    sim = sim_factory(latency=0.02, latency_jitter=0.01)
    n, samples = 200, 3
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=4) for i in range(n)])
    out = tmp_path / "out"
    extra = ("--models", ",".join(MODELS), "--samples", str(samples), "--concurrency", "8",
             "--samples-via", via)
    kill_after(start(sim, inp, out, *extra), sim, kills[0])  # in tm-small's run
    kill_after(start(sim, inp, out, *extra), sim, kills[1])  # in tm-large's run
    final = run_cli(cmd(sim, inp, out, *extra), env=keyed_env(), timeout=180)
    assert final.returncode in (0, 1), final.stderr
    stats = sim.stats()
    assert stats["duplicates"] == 0, stats["duplicate_keys"][:5]
    total = 0
    for model in MODELS:
        res, fail = check_directory(out / model, n, samples)
        total += len(res) + len(fail)
        assert len(res) + len(fail) == n * samples
        for f in fail.values():  # the only failures a crash may leave: never re-sent
            assert (f["error"]["class"], f["error"]["code"]) == \
                ("ambiguous", "unknown_outcome_after_crash")
        for cid, r in res.items():
            assert r["response"]["body"]["model"] == model
            if via == "seed":  # (with n, one key answers a line's units: `duplicates` above)
                assert stats["processed"][idempotency_key(f"{JOB}-{model}", cid)] == 1
        journal = read_jsonl(out / model / "journal.jsonl")
        assert any(isinstance(r, dict) and r.get("e") == "resume" for r in journal)  # killed
        st = orjson.loads(run_cli(["status", str(out / model), "--json"], env=keyed_env()).stdout)
        assert st["finished"] and st["succeeded"] == len(res) and st["not_yet_sent"] == 0
    assert total == 1200
    assert stats["completion_calls"] == sum(stats["processed"].values())
    if via == "n":  # a request per line (and model) at most, plus what a resume split
        assert stats["completion_calls"] < 2 * n * 1.5
    manifest = orjson.loads((out / "models.json").read_bytes())
    assert [m["dir"] for m in manifest["models"]] == list(MODELS)
    assert manifest["samples"] == samples
    again = run_cli(cmd(sim, inp, out, *extra), env=keyed_env(), timeout=60)  # all done: sends 0
    assert again.returncode == final.returncode, again.stderr
    assert sim.stats()["completion_calls"] == stats["completion_calls"]


def test_a_model_the_server_does_not_serve_fails_alone(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(10)])
    out = tmp_path / "out"
    done = run_cli(cmd(sim, inp, out, "--models", "tm-small,org/nope", "--samples", "2"),
                   env=keyed_env(), timeout=60)
    assert done.returncode == 1, done.stderr  # the worst: org/nope's units failed
    assert "org/nope" in done.stderr and "not served" in done.stderr
    res, fail = check_directory(out / "tm-small", 10, 2)
    assert len(res) == 20 and not fail
    nope = out / "org%2Fnope"
    res, fail = check_directory(nope, 10, 2)
    assert not res and len(fail) == 20
    assert {(f["error"]["class"], f["error"]["code"]) for f in fail.values()} == \
        {("permanent", "model_not_served")}
    parent = run_cli(["status", str(out)], env=keyed_env())  # -o itself: each model's status
    assert parent.returncode == 0, parent.stderr  # both runs finished, one with failed lines
    assert "model:        org/nope" in parent.stdout and str(nope) in parent.stdout
    both = orjson.loads(run_cli(["status", str(out), "--json"], env=keyed_env()).stdout)["models"]
    assert list(both) == ["tm-small", "org/nope"]
    assert (both["tm-small"]["succeeded"], both["org/nope"]["failed"]) == (20, 20)
    assert both["org/nope"]["failed_by_class"]["permanent"] == 20
    stats = sim.stats()
    assert "org/nope" not in stats["by_model"]  # nothing was sent for it
    assert stats["completion_calls"] == 10  # a line's two samples: one request with n=2


def test_one_budget_covers_every_model(sim: Any, tmp_path: Path) -> None:
    """The models share --budget-tokens: what the first spends, the second cannot; a rerun
    with a larger budget finishes the second without sending the first's lines again."""
    rows = [chat_line(i, max_tokens=8) for i in range(20)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    budget = 250  # 20 answers of 8 tokens each for the first model, 90 left for the second
    first = run_cli(cmd(sim, inp, out, "--models", ",".join(MODELS), "--budget-tokens",
                        str(budget), "--concurrency", "2"), env=keyed_env(), timeout=60)
    assert first.returncode == 6, first.stderr
    spent = 0
    for model in MODELS:
        for r in read_jsonl(out / model / "results.jsonl"):
            spent += r["response"]["body"]["usage"]["total_tokens"]
    assert 0 < spent <= budget
    small = read_jsonl(out / "tm-small" / "results.jsonl")
    large = read_jsonl(out / "tm-large" / "results.jsonl")
    assert len(small) == 20 and len(large) < 20  # the first model's spend left less for this
    calls = sim.stats()["completion_calls"]
    assert calls == len(small) + len(large)
    more = run_cli(cmd(sim, inp, out, "--models", ",".join(MODELS), "--budget-tokens",
                       "100000"), env=keyed_env(), timeout=60)
    assert more.returncode == 0, more.stderr
    assert len(read_jsonl(out / "tm-large" / "results.jsonl")) == 20
    assert sim.stats()["completion_calls"] == calls + 20 - len(large)
    assert sim.stats()["duplicates"] == 0


@pytest.mark.parametrize(("first_via", "then_via", "requests"),
                         [("seed", "n", 30), ("n", "seed", 10)])
def test_samples_come_back_from_the_cache(sim: Any, tmp_path: Path, first_via: str,
                                          then_via: str, requests: int) -> None:
    """The cache keys samples by index, whichever way they were sent: a rerun elsewhere
    gets the same three answers per line, each with its original request id, and sends
    nothing. `n` sends one request a line, so its three samples share that request's id."""
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(10)])
    cache = tmp_path / "cache.sqlite"
    first = run_cli(cmd(sim, inp, tmp_path / "a", "--samples", "3", "--cache", str(cache),
                        "--samples-via", first_via), env=keyed_env(), timeout=60)
    assert first.returncode == 0, first.stderr
    calls = sim.stats()["completion_calls"]
    assert calls == requests
    second = run_cli(cmd(sim, inp, tmp_path / "b", "--samples", "3", "--cache", str(cache),
                         "--samples-via", then_via), env=keyed_env(), timeout=60)
    assert second.returncode == 0, second.stderr
    assert sim.stats()["completion_calls"] == calls  # nothing sent
    a, _ = check_directory(tmp_path / "a", 10, 3)
    b, _ = check_directory(tmp_path / "b", 10, 3)
    assert all(r.get("cached") for r in b.values())
    assert {c: r["response"] for c, r in a.items()} == {c: r["response"] for c, r in b.items()}
    assert len({r["response"]["request_id"] for r in b.values()}) == requests
    seeds = [orjson.loads(x)["body"]["seed"]
             for x in (tmp_path / "a" / "units.jsonl").read_bytes().splitlines()[:3]]
    assert seeds == [0, 1, 2]


@pytest.mark.parametrize("model", ["org/model", "../up", ".hidden", "a%2Fb", "m:7b", "模型"])
def test_directory_names_are_safe_and_reversible(model: str) -> None:
    name = dir_name(model)
    assert "/" not in name and not name.startswith(".") and name not in ("", ".", "..")
    assert model_of_dir(name) == model


def test_bad_input_is_refused_before_anything_is_sent(sim: Any, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(orjson.dumps(chat_line(0)) + b"\n{not json\n")
    out = tmp_path / "out"
    done = run_cli(cmd(sim, inp, out, "--models", ",".join(MODELS)), env=keyed_env(), timeout=30)
    assert done.returncode == 2, done.stderr
    assert "line 2" in done.stderr and "fix these lines" in done.stderr
    assert "Traceback" not in done.stderr
    assert sim.stats()["received"] == 0 and not out.exists()


@pytest.mark.parametrize("extra, says", [
    (("--models", "tm-small,tm-small"), "given twice"),
    (("--models", "tm-small,"), "empty model name"),
    (("--models", "tm-small", "--model", "tm-large"), "--model and --models"),
    (("--samples", "0"), "--samples"),
    (("--samples", "2", "--samples-via", "choices"), "--samples-via"),
])
def test_bad_flags_are_refused(sim: Any, tmp_path: Path, extra: tuple[str, ...],
                               says: str) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])
    done = run_cli(cmd(sim, inp, tmp_path / "out", *extra), env=keyed_env(), timeout=30)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert sim.stats()["received"] == 0


def test_an_output_url_takes_one_run_not_a_fan_out(sim: Any, tmp_path: Path) -> None:
    """--models and --samples stage a directory per model; an output URL holds one run's
    segments, so the pair is refused before anything is sent, with the way round it."""
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])
    url = (tmp_path / "bucket").as_uri() + "/"
    for extra in (("--models", ",".join(MODELS)), ("--samples", "2")):
        done = run_cli(cmd(sim, inp, url, *extra), env=keyed_env(), timeout=30)  # type: ignore[arg-type]
        assert done.returncode == 2, done.stderr
        assert "output URL" in done.stderr and "--model" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert sim.stats()["received"] == 0 and not (tmp_path / "bucket").exists()


def test_other_samples_on_a_started_directory_are_refused(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    out = tmp_path / "out"
    assert run_cli(cmd(sim, inp, out, "--samples", "2"), env=keyed_env()).returncode == 0
    calls = sim.stats()["completion_calls"]
    again = run_cli(cmd(sim, inp, out, "--samples", "3"), env=keyed_env())
    assert again.returncode == 2 and "--restart" in again.stderr, again.stderr
    assert sim.stats()["completion_calls"] == calls


def test_job_file_models_and_samples(tmp_path: Path) -> None:
    job = tmp_path / "eval.toml"
    job.write_text('input = "in.jsonl"\nmodels = ["tm-small", "org/model"]\nsamples = 4\n'
                   'samples_via = "seed"\n')
    shown = run_cli(["run", str(job), "--print-config", "--log-format", "json"], env=keyed_env())
    assert shown.returncode == 0, shown.stderr
    settings = orjson.loads(shown.stdout)["config"]
    assert settings["models"]["value"] == ["tm-small", "org/model"]
    assert settings["samples"]["value"] == 4
    assert settings["samples"]["source"].startswith("job file samples")
    assert settings["samples_via"]["value"] == "seed"
    assert settings["samples_via"]["source"].startswith("job file samples_via")
    job.write_text('input = "in.jsonl"\nsamples = 4\nsamples_via = "choices"\n')
    bad = run_cli(["run", str(job), "--print-config"], env=keyed_env())
    assert bad.returncode == 2 and "samples_via" in bad.stderr and '"n"' in bad.stderr, \
        bad.stderr


def test_resend_in_a_model_directory_keeps_its_samples(sim_factory: Any, tmp_path: Path) -> None:
    """A model served only later: `tmbatch resend DIR --class permanent` sends its units, and
    each result keeps its sample, line and custom_id."""
    only_small = sim_factory(models=("tm-small",))
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out"
    first = run_cli(cmd(only_small, inp, out, "--models", ",".join(MODELS), "--samples", "2"),
                    env=keyed_env(), timeout=60)
    assert first.returncode == 1, first.stderr
    assert len(read_jsonl(out / "tm-large" / "failures.jsonl")) == 8
    both = sim_factory()
    again = run_cli(["resend", str(out / "tm-large"), "--class", "permanent", "--yes", "-q",
                     "--base-url", both.url], env=keyed_env(), timeout=60)
    assert again.returncode == 0, again.stderr
    res, fail = check_directory(out / "tm-large", 4, 2)
    assert len(res) == 8 and not fail
    assert both.stats()["completion_calls"] == 8


def test_a_priced_run_estimates_every_model_and_sample(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    prices = ("--price", "tm-small=1:2", "--price", "tm-large=2:4")
    done = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", sim.url,
                    "--models", ",".join(MODELS), "--samples", "2", *prices],
                   env=keyed_env(), timeout=60)  # not -q: the estimate and spend lines are said
    assert done.returncode == 0, done.stderr
    assert "estimate: 20 billed line(s)" in done.stderr  # 5 lines x 2 models x 2 samples
    assert "spend across the models: " in done.stderr


def test_a_usd_budget_needs_every_models_price(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    done = run_cli(cmd(sim, inp, tmp_path / "out", "--models", ",".join(MODELS),
                       "--budget-usd", "1", "--price", "tm-small=1:2"), env=keyed_env(), timeout=60)
    assert done.returncode == 2 and "tm-large" in done.stderr, done.stderr
    assert sim.stats()["received"] == 0


def test_sigterm_during_preflight_ends_the_fan_out(serve: Any, tmp_path: Path) -> None:
    from tests.test_stops import counting_app

    app, seen = counting_app(health_delay=60)
    server = serve(app)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(tmp_path / "out"),
         "--base-url", server.url(), "--models", ",".join(MODELS)],
        env=keyed_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while seen["any"] < 1:
        assert time.monotonic() < deadline, "preflight never asked /health"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert b"interrupted (SIGTERM)" in err and b"Traceback" not in err
    assert seen["billable"] == 0


def two_models_started(sim_factory: Any, tmp_path: Path, calls: int,
                       ) -> tuple[Any, Path, Path, tuple[str, ...], subprocess.Popen[bytes]]:
    """40 lines to both models at concurrency 2 on a 50 ms server, running, once the server
    has had `calls` requests: (sim, input, -o, the flags, the process)."""
    sim = sim_factory(latency=0.05)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(40)])
    out = tmp_path / "out"
    extra = ("--models", ",".join(MODELS), "--concurrency", "2")
    proc = start(sim, inp, out, *extra)
    wait_for_calls(sim, calls, proc)
    return sim, inp, out, extra, proc


def test_sigterm_in_a_models_run_ends_the_fan_out(sim_factory: Any, tmp_path: Path) -> None:
    """The first model's run drains and stops (143); the second is not started; the same
    command then finishes both, sending nothing twice."""
    sim, inp, out, extra, proc = two_models_started(sim_factory, tmp_path, calls=4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert not (out / "tm-large" / "journal.jsonl").exists()
    final = run_cli(cmd(sim, inp, out, *extra), env=keyed_env(), timeout=60)
    assert final.returncode == 0, final.stderr
    for model in MODELS:
        res = read_jsonl(out / model / "results.jsonl")
        assert sorted(r["custom_id"] for r in res) == sorted(f"req-{i}" for i in range(40))
        assert all("sample" not in r for r in res)  # no --samples: the input's own lines
    assert sim.stats()["duplicates"] == 0 and sim.stats()["completion_calls"] == 80


def test_a_second_fan_out_on_a_live_output_is_refused_before_the_network(
        sim_factory: Any, tmp_path: Path) -> None:
    """The same --models command twice at once: the second finds -o locked before it writes
    a unit or sends anything (not after its preflight, at the model the first is on), and
    the first finishes untouched."""
    sim, inp, out, extra, proc = two_models_started(sim_factory, tmp_path, calls=2)
    second = run_cli(cmd(sim, inp, out, *extra), env=keyed_env(), timeout=30)
    assert second.returncode == 2, second.stderr
    # -o itself, found locked before staging and preflight; not a model's directory, which a
    # second fan-out would reach only after checking the server
    assert f"another tmbatch process is using {out};" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stats = sim.stats()
    assert stats["duplicates"] == 0 and stats["completion_calls"] == 80
    assert not (out / ".lock").exists()  # released at the end, as a single run's is


@pytest.mark.parametrize("url, seeded", [("/v1/chat/completions", True),
                                         ("/v1/completions", True),
                                         ("/v1/responses", False), ("/tokenize", False)])
def test_seeds_only_where_the_route_takes_one(url: str, seeded: bool) -> None:
    req = Request(3, "q-3", url, {"model": "m", "seed": 40, "input": "x"})
    lines = [orjson.loads(unit_line(req, "tm-large", 3, k)) for k in range(3)]
    assert [x["custom_id"] for x in lines] == ["q-3#0", "q-3#1", "q-3#2"]
    assert {x["body"]["model"] for x in lines} == {"tm-large"}
    assert [x["body"]["seed"] for x in lines] == ([40, 41, 42] if seeded else [40, 40, 40])
    assert req.body["seed"] == 40 and req.body["model"] == "m"  # the input's body untouched


def test_one_model_runs_and_model_runs_do_not_share_a_directory(sim: Any,
                                                                tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    fan, single = tmp_path / "fan", tmp_path / "single"
    fanned = run_cli(cmd(sim, inp, fan, "--models", ",".join(MODELS)), env=keyed_env())
    assert fanned.returncode == 0
    assert run_cli(cmd(sim, inp, single), env=keyed_env()).returncode == 0
    calls = sim.stats()["completion_calls"]
    plain = run_cli(cmd(sim, inp, fan), env=keyed_env())
    assert plain.returncode == 2 and "holds a --models run" in plain.stderr, plain.stderr
    assert str(fan / "tm-small") in plain.stderr
    models = run_cli(cmd(sim, inp, single, "--models", ",".join(MODELS)), env=keyed_env())
    assert models.returncode == 2 and "holds a run of one model" in models.stderr
    assert sim.stats()["completion_calls"] == calls and not (fan / "journal.jsonl").exists()


@pytest.mark.parametrize("models", [True, False], ids=["models", "samples-alone"])
def test_the_resume_hint_is_the_fan_outs_own_command(sim_factory: Any, tmp_path: Path,
                                                     models: bool) -> None:
    """A key refused mid-run (fatal, exit 3): the hint names the command that resumes, the
    fan-out's own (a model directory's `units.jsonl` is staged, not the input), and it does."""
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out"
    shape = ["--models", ",".join(MODELS)] if models else []
    args = ["run", str(inp), "-o", str(out), "--base-url", sim.url, *shape, "--samples", "2"]
    wrong = clean_env(TENSORMESH_INFERENCE_API_KEY="tm-wrong-key-0123456789abcdef")
    refused = run_cli([*args, "--no-preflight", "-c", "1"], env=wrong)
    assert refused.returncode == 3, refused.stderr
    hint = f"tmbatch run {inp} -o {out}" + (f" --models {','.join(MODELS)}" if models else "")
    assert f"then resume: {hint} --samples 2" in refused.stderr, refused.stderr
    done = run_cli([*args, "-q"], env=keyed_env())
    assert done.returncode == 0, done.stderr
    for d in [out / m for m in MODELS] if models else [out]:
        res, fail = check_directory(d, 4, 2)
        assert len(res) == 8 and not fail
