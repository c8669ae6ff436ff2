"""What `--models A,B --samples N` costs beyond sending the same units as plain runs.

    python bench/fanout_bench.py --lines 2000 --samples 3 --repeats 3

Two ways to get the same answers from the in-process simulator, timed as the child's
user+sys CPU (os.wait4) and wall clock, median of `--repeats`:

* fan-out: one `tmbatch run IN --sim --models tm-small,tm-large --samples N
  --samples-via seed` (a request per unit);
* plain: the staged `units.jsonl` of each model (copied out first) run by one plain
  `tmbatch run UNITS --sim` each, one after the other, as the fan-out runs its models;
* fan-out with n: the same command with `--samples-via n` (the default): one request per
  line and model, whose N choices are the N samples.

The first two differ by the fan-out's own work: staging each model's units (the input read
twice per model: once to check it and compare, once to write), one preflight instead of two,
and one interpreter instead of two. The third shows what `n` saves: requests sent and
tokens billed (each model's summary.json and the results' usage). Every run's outcomes are
counted, so a run that did not answer every unit fails the bench instead of timing it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODELS = ("tm-small", "tm-large")


def write_input(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        for i in range(n):
            body = {"model": "tm-small", "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"question {i}"}]}
            f.write(orjson.dumps({"custom_id": f"q{i}", "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + b"\n")


def timed(args: list[str]) -> tuple[float, float]:
    """(user+sys CPU seconds, wall seconds) of one `tmbatch` child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tmbatch", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tmbatch {' '.join(args)} failed:\n{err.decode()}")
    return usage.ru_utime + usage.ru_stime, wall


def answered(out: Path) -> int:
    with open(out / "results.jsonl", "rb") as f:
        return sum(1 for _ in f)


def sent_and_billed(out: Path) -> tuple[int, int]:
    """(requests sent, tokens billed) of the fan-out in `out`, every model's directory."""
    sent = billed = 0
    for m in MODELS:
        sent += orjson.loads((out / m / "summary.json").read_bytes())["this_run"][
            "attempts_sent"]
        with open(out / m / "results.jsonl", "rb") as f:
            for line in f:
                usage = orjson.loads(line)["response"]["body"]["usage"]
                billed += usage["prompt_tokens"] + usage["completion_tokens"]
    return sent, billed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    units = ns.lines * ns.samples
    common = ["--sim", "-q", "-c", "64"]
    fan, plain, via_n = [], [], []
    counted: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inp = d / "in.jsonl"
        write_input(inp, ns.lines)
        for r in range(ns.repeats):
            out = d / f"fan{r}"
            fan.append(timed(["run", str(inp), "-o", str(out), "--models", ",".join(MODELS),
                              "--samples", str(ns.samples), "--samples-via", "seed", *common]))
            assert all(answered(out / m) == units for m in MODELS)
            counted["fan-out"] = sent_and_billed(out)
            out_n = d / f"fan-n{r}"
            via_n.append(timed(["run", str(inp), "-o", str(out_n), "--models",
                                ",".join(MODELS), "--samples", str(ns.samples), *common]))
            assert all(answered(out_n / m) == units for m in MODELS)
            counted["fan-out n"] = sent_and_billed(out_n)
            cpu = wall = 0.0
            for m in MODELS:
                staged = d / f"units-{m}-{r}.jsonl"
                shutil.copy(out / m / "units.jsonl", staged)
                c, w = timed(["run", str(staged), "-o", str(d / f"plain{r}-{m}"), *common])
                assert answered(d / f"plain{r}-{m}") == units
                cpu, wall = cpu + c, wall + w
            plain.append((cpu, wall))
    med = {name: (statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs))
           for name, runs in (("fan-out", fan), ("plain x2", plain), ("fan-out n", via_n))}
    print(f"{ns.lines} lines x {len(MODELS)} models x {ns.samples} samples = "
          f"{units * len(MODELS)} units, median of {ns.repeats}")
    for name, (cpu, wall) in med.items():
        line = f"  {name:9} cpu {cpu:6.2f} s  wall {wall:6.2f} s"
        if name in counted:
            line += f"  requests {counted[name][0]:,}  tokens billed {counted[name][1]:,}"
        print(line)
    extra = med["fan-out"][0] - med["plain x2"][0]
    print(f"  fan-out's own CPU: {extra:+.2f} s ({1000 * extra / ns.lines:+.2f} ms per input "
          "line)")
    print(f"  staging alone (in-process, every model): {stage_seconds(ns):.3f} s CPU")


def stage_seconds(ns: argparse.Namespace) -> float:
    """CPU to stage every model's units once (check, compare, write), median of repeats."""
    from tmbatch.inputs.samples import stage_units

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_input(d / "in.jsonl", ns.lines)
        for r in range(ns.repeats):
            t0 = time.process_time()
            for m in MODELS:
                stage_units(str(d / "in.jsonl"), d / f"s{r}" / m, m, ns.samples,
                            default_model=None, endpoint=None, stream=None, restart=False)
            times.append(time.process_time() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    main()
