"""Sharded runs: N real `tmbatch run --shard i/N` processes against one simulator, then
`tmbatch merge`, which must prove that every input line has exactly one outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import cuts
from tests.conftest import API_KEY, ROOT, chat_line, clean_env, read_jsonl, run_cli, write_jsonl

N_LINES = 61


def make_input(tmp_path: Path) -> Path:
    rows: list[Any] = [chat_line(i) for i in range(1, N_LINES + 1)]
    rows.insert(11, b"")  # line 12 is blank: it needs no outcome
    return write_jsonl(tmp_path / "in.jsonl", rows)


def run_shards(inp: Path, url: str, outs: list[Path], shards: list[str],
               extra_env: list[dict[str, str]] | None = None,
               extra_args: list[list[str]] | None = None) -> list[tuple[int, str]]:
    """Start every shard at once, like the pods of an Indexed Job, and wait for all."""
    procs = []
    for k, (out, shard) in enumerate(zip(outs, shards, strict=True)):
        args = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out),
                "--base-url", url, "-c", "4", "--rpm", "60000",
                *(extra_args[k] if extra_args else [])]
        if shard:
            args += ["--shard", shard]
        env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY,
                        **(extra_env[k] if extra_env else {}))
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        done.append((p.returncode, err))
    return done


def ids_of(path: Path) -> list[str]:
    return [r["custom_id"] for r in read_jsonl(path)]


def test_four_shards_then_merge_cover_every_line_exactly_once(tmp_path: Path,
                                                             sim_factory: Any) -> None:
    sim = sim_factory(latency=0.005)
    inp = make_input(tmp_path)
    outs = [tmp_path / f"shard-{i}" for i in range(4)]
    for code, err in run_shards(inp, sim.url, outs, [f"{i}/4" for i in range(4)]):
        assert code == 0, err
    for i, out in enumerate(outs):  # each shard took exactly its lines
        lines = sorted(r["line"] for r in read_jsonl(out / "results.jsonl"))
        assert lines and all((n - 1) % 4 == i for n in lines)
    r = run_cli(["merge", *map(str, outs), "-o", str(tmp_path / "merged")])
    assert r.returncode == 0, r.stderr
    assert "every line has exactly one outcome" in r.stderr
    merged = ids_of(tmp_path / "merged" / "results.jsonl")
    assert sorted(merged) == sorted(f"req-{i}" for i in range(1, N_LINES + 1))
    assert read_jsonl(tmp_path / "merged" / "failures.jsonl") == []
    summary = orjson.loads((tmp_path / "merged" / "summary.json").read_bytes())
    assert summary["complete"] is True and summary["counts"]["succeeded"] == N_LINES
    assert summary["input_lines"] == N_LINES + 1 and summary["blank_lines_skipped"] == 1
    assert [s["shard"] for s in summary["shards"]] == [[i, 4] for i in range(4)]
    stats = sim.stats()
    assert stats["processed_keys"] == N_LINES and stats["duplicates"] == 0
    assert set(stats["processed"].values()) == {1}  # the simulator did each request once


def two_failing_shards(tmp_path: Path, sim_factory: Any) -> tuple[Any, Path, list[Path]]:
    """Shards 0/2 and 1/2 against a server that answers 500 to a fifth of the requests."""
    sim = sim_factory(error_500=0.2, seed=7)
    inp = make_input(tmp_path)
    outs = [tmp_path / f"s{i}" for i in range(2)]
    for code, err in run_shards(inp, sim.url, outs, ["0/2", "1/2"]):
        assert code == 1, err  # some 500s: ambiguous, never re-sent
    return sim, inp, outs


def test_merge_with_failures_keeps_one_outcome_per_line_and_exits_1(tmp_path: Path,
                                                                    sim_factory: Any) -> None:
    sim, _, outs = two_failing_shards(tmp_path, sim_factory)
    r = run_cli(["merge", str(outs[1]), str(outs[0]), "-o", str(tmp_path / "m")])
    assert r.returncode == 1, r.stderr
    ok = ids_of(tmp_path / "m" / "results.jsonl")
    failed = read_jsonl(tmp_path / "m" / "failures.jsonl")
    assert failed and all(f["error"]["class"] == "ambiguous" for f in failed)
    every = ok + [f["custom_id"] for f in failed]
    assert sorted(every) == sorted(f"req-{i}" for i in range(1, N_LINES + 1))
    summary = orjson.loads((tmp_path / "m" / "summary.json").read_bytes())
    assert summary["counts"]["failed_by_class"] == {"ambiguous": len(failed)}
    assert sim.stats()["duplicates"] == 0


def test_missing_and_duplicated_shards_are_reported_with_exit_5(tmp_path: Path,
                                                                sim: Any) -> None:
    inp = make_input(tmp_path)
    outs = [tmp_path / "a0", tmp_path / "a1", tmp_path / "b1", tmp_path / "c2"]
    results = run_shards(inp, sim.url, outs, ["0/3", "1/3", "1/3", "2/3"])
    assert [code for code, _ in results] == [0, 0, 0, 0]
    r = run_cli(["merge", str(outs[0]), str(outs[1]), "-o", str(tmp_path / "missing")])
    assert r.returncode == 5
    assert "shard(s) 2/3 not given" in r.stderr
    assert "line(s) have no outcome in any shard: 3, 6, 9, 15," in r.stderr  # 12 is blank
    summary = orjson.loads((tmp_path / "missing" / "summary.json").read_bytes())
    assert summary["complete"] is False
    assert summary["missing_lines"]["count"] == len(range(3, N_LINES + 2, 3)) - 1  # not 12
    r = run_cli(["merge", *map(str, outs), "-o", str(tmp_path / "dup")])
    assert r.returncode == 5
    assert "shard(s) 1/3 given more than once" in r.stderr
    assert "have an outcome in more than one shard (the first was kept): 2, 5, 8," in r.stderr
    merged = ids_of(tmp_path / "dup" / "results.jsonl")
    assert len(merged) == len(set(merged)) == N_LINES  # still one outcome per line written


def test_merge_refuses_shards_of_different_inputs(tmp_path: Path, sim: Any) -> None:
    inp = make_input(tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", [chat_line(i) for i in range(5)])
    assert run_shards(inp, sim.url, [tmp_path / "x0"], ["0/2"])[0][0] == 0
    assert run_shards(other, sim.url, [tmp_path / "y1"], ["1/2"])[0][0] == 0
    r = run_cli(["merge", str(tmp_path / "x0"), str(tmp_path / "y1"), "-o", str(tmp_path / "m")])
    assert r.returncode == 2 and "ran a different input" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(["merge", str(tmp_path), "-o", str(tmp_path / "m")])
    assert r.returncode == 2 and "not a tmbatch output directory" in r.stderr


def test_indexed_job_env_shards_a_label_job_and_merge_joins_labels(tmp_path: Path,
                                                                   sim: Any) -> None:
    job = tmp_path / "sentiment.toml"
    job.write_text(
        (ROOT / "jobs" / "label-sentiment.toml").read_text()
        .replace('input = "../samples/reviews.jsonl"',
                 f'input = "{ROOT / "samples" / "reviews.jsonl"}"\noutput = "out"'),
        encoding="utf-8")
    envs = [{"JOB_COMPLETION_INDEX": str(i), "JOB_COMPLETIONS": "2"} for i in range(2)]
    procs = []
    for env in envs:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tmbatch", "run", str(job), "--base-url", sim.url],
            env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY, **env), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "takes 1/2 of the account's limits: rpm 300, tpm 100000" in err
    shards = [tmp_path / "out" / f"shard-{i}" for i in range(2)]  # output from the file + index
    r = run_cli(["merge", *map(str, shards), "-o", str(tmp_path / "all")])
    assert r.returncode == 0, r.stderr
    labels = read_jsonl(tmp_path / "all" / "labels.jsonl")
    records = read_jsonl(ROOT / "samples" / "reviews.jsonl")
    assert [row["id"] for row in labels] == [rec["id"] for rec in records]  # input order
    assert all(row["status"] == "ok" for row in labels)
    summary = orjson.loads((tmp_path / "all" / "summary.json").read_bytes())
    assert summary["labels"]["ok"] == len(records)
    assert sim.stats()["processed_keys"] == len(records)


def test_merged_outputs_are_owner_only_whatever_the_umask(tmp_path: Path,
                                                          sim_factory: Any) -> None:
    """Merged files hold the same prompts and answers as the shards: 0600 in a 0700 directory,
    as docs/crash-safety.md promises for every output, even when merge runs under umask 0."""
    import os
    import stat

    sim = sim_factory()
    inp = make_input(tmp_path)
    outs = [tmp_path / f"shard-{i}" for i in range(2)]
    for code, err in run_shards(inp, sim.url, outs, ["0/2", "1/2"]):
        assert code == 0, err
    merged = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "tmbatch", "merge", *map(str, outs), "-o",
                        str(merged)], env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=120, preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in merged.iterdir()}
    assert {"results.jsonl", "failures.jsonl", "summary.json"} <= set(modes)
    assert {n: oct(m) for n, m in modes.items() if m != 0o600} == {}
    assert stat.S_IMODE(merged.stat().st_mode) == 0o700


def test_sharded_and_unsharded_directories_cannot_be_merged_exit_2(tmp_path: Path,
                                                                   sim: Any) -> None:
    inp = make_input(tmp_path)
    outs = [tmp_path / "s0", tmp_path / "whole"]
    assert [c for c, _ in run_shards(inp, sim.url, outs, ["0/2", ""])] == [0, 0]
    r = run_cli(["merge", *map(str, outs), "-o", str(tmp_path / "m")])
    assert r.returncode == 2, r.stderr  # the documented "cannot be merged", not 5
    assert "different shard counts" in r.stderr and "not sharded" in r.stderr
    assert "merged" not in r.stderr.split("error:")[0]  # no "merged ... succeeded" first
    assert not (tmp_path / "m").exists()  # nothing written


def test_a_merged_directory_answers_status_export_and_report(tmp_path: Path,
                                                             sim_factory: Any) -> None:
    sim, inp, outs = two_failing_shards(tmp_path, sim_factory)
    merged = tmp_path / "merged"
    assert run_cli(["merge", *map(str, outs), "-o", str(merged)]).returncode == 1
    failed = len(read_jsonl(merged / "failures.jsonl"))
    st = run_cli(["status", str(merged), "--json"])
    assert st.returncode == 0, st.stderr  # finished: every line has its outcome
    status = orjson.loads(st.stdout)
    assert (status["succeeded"], status["failed"]) == (N_LINES - failed, failed)
    assert status["not_yet_sent"] == 0 and status["unknown_outcome"] == 0
    assert status["merged_from"] == [str(o) for o in outs]
    assert status["attempts_sent"] == N_LINES  # each shard's dispatches, once
    text = run_cli(["status", str(merged)]).stdout
    assert "merged from:" in text and "(finished)" in text
    ex = run_cli(["export", str(merged), "--combined"])
    assert ex.returncode == 0, ex.stderr
    combined = read_jsonl(merged / "outcomes.ordered.jsonl")
    assert [r["line"] for r in combined] == [n for n in range(1, N_LINES + 2) if n != 12]
    rep = run_cli(["report", str(merged)])
    assert rep.returncode == 0, rep.stderr
    page = (merged / "report" / "index.html").read_text()
    assert f"{N_LINES - failed:,}</b><span>succeeded" in page
    # the merged directory is not a run: its lines' Idempotency-Keys belong to the shards
    r = run_cli(["run", str(inp), "-o", str(merged), "--base-url", sim.url, "--no-preflight"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert r.returncode == 2 and "written by `tmbatch merge`" in r.stderr
    r = run_cli(["resend", str(merged), "--class", "ambiguous", "--dry-run"])
    assert r.returncode == 2 and "merged directory" in r.stderr
    processed = sim.stats()["processed_keys"]
    assert run_cli(["merge", *map(str, outs), "-o", str(merged)]).returncode == 1  # again
    assert sim.stats()["processed_keys"] == processed


def test_merge_adds_up_the_shards_spend_for_status_summary_and_report(tmp_path: Path,
                                                                     sim: Any) -> None:
    """Each pod of an Indexed Job keeps its own books (and is held to its share of the job's
    budget); the merged directory is the whole job's: the shards' spend summed, at their
    prices, over time, against the shares added up."""
    inp = make_input(tmp_path)
    outs = [tmp_path / "s1", tmp_path / "s2"]
    price = ["--price", "tm-small=2:4"]
    done = run_shards(inp, sim.url, outs, ["0/2", "1/2"],
                      extra_args=[[*price, "--budget-usd", "4"]] * 2)
    assert [rc for rc, _ in done] == [0, 0], done
    shard_spend = [orjson.loads(run_cli(["status", str(o), "--json"]).stdout)["spend"]
                   for o in outs]
    assert all(s["tokens"] > 0 for s in shard_spend)
    merged = tmp_path / "merged"
    assert run_cli(["merge", *map(str, outs), "-o", str(merged)]).returncode == 0
    spend = orjson.loads(run_cli(["status", str(merged), "--json"]).stdout)["spend"]
    assert spend["tokens"] == sum(s["tokens"] for s in shard_spend)
    row = spend["by_model"]["tm-small"]
    assert row["requests"] == N_LINES
    assert row["prompt"] == sum(s["by_model"]["tm-small"]["prompt"] for s in shard_spend)
    assert spend["usd"] == pytest.approx(sum(s["usd"] for s in shard_spend))
    assert spend["usd"] == pytest.approx((row["prompt"] * 2 + row["completion"] * 4) / 1e6)
    assert [s["budget"]["usd"] for s in shard_spend] == [2.0, 2.0]  # 1/2 each
    assert spend["budget"] == {"tokens": None, "usd": 4.0}  # the job's again
    assert "spent:" in run_cli(["status", str(merged)]).stdout
    summary = orjson.loads((merged / "summary.json").read_bytes())
    assert summary["spend"] == spend
    assert run_cli(["report", str(merged)]).returncode == 0
    page = (merged / "report" / "index.html").read_text()
    assert 'data-file="cost.png"' in page


def test_a_shard_a_kill_cut_off_is_merged_with_the_spend_its_own_status_shows(
        tmp_path: Path, sim: Any) -> None:
    """A pod killed between a flush's output writes and its journal write leaves answers
    past its journal's last mark. Its own `status` counts them at their usage (a resume
    adopts them); the merged directory's spend, in `status` and in summary.json alike, is
    the shards' as their own `status` shows it (summary.json had those answers at their
    worst case: 404 tokens where `status` said 392). tests/cuts.py makes the state."""
    inp = make_input(tmp_path)
    outs = [tmp_path / "s1", tmp_path / "s2"]
    done = run_shards(inp, sim.url, outs, ["0/2", "1/2"])
    assert [rc for rc, _ in done] == [0, 0], done
    ahead = [c for c in cuts.cuts((outs[1] / "journal.jsonl").read_bytes()) if c.outputs_ahead]
    killed = tmp_path / "s2-killed"
    cuts.make(outs[1], killed, ahead[len(ahead) // 2])
    shard_spend = [orjson.loads(run_cli(["status", str(o), "--json"]).stdout)["spend"]
                   for o in (outs[0], killed)]
    usage = [r["response"]["body"]["usage"] for r in read_jsonl(killed / "results.jsonl")]
    answered = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    assert shard_spend[1]["tokens"] >= answered
    merged = tmp_path / "merged"
    p = run_cli(["merge", str(outs[0]), str(killed), "-o", str(merged)])
    assert p.returncode == 5, p.stderr  # the killed shard's lines in flight have no outcome
    spend = orjson.loads(run_cli(["status", str(merged), "--json"]).stdout)["spend"]
    assert spend["tokens"] == sum(s["tokens"] for s in shard_spend), (spend, shard_spend)
    assert spend["by_model"]["tm-small"]["requests"] == sum(
        s["by_model"]["tm-small"]["requests"] for s in shard_spend)
    summary = orjson.loads((merged / "summary.json").read_bytes())
    assert summary["spend"] == spend
