"""What a start costs: modules a run does not need are not imported (every start pays for them).

A 20,000-line run on the simulator takes ~2.6 s of CPU, and every ~20 ms of start-up is ~1 %
of it (bench/cpu_bench.py); these tests keep what was taken out of the start from creeping back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import API_KEY, chat_line, clean_env, write_jsonl

# Runs `tmbatch` in-process and prints, after it, which of the modules watched it imported.
PROBE = """
import sys
from tmbatch.cli.main import main
watch = sys.argv[1].split(',')
code = main(sys.argv[2:])
print(code, ' '.join(m for m in watch if m in sys.modules) or '-')
"""


def probe(args: list[str], watch: tuple[str, ...] = ("tenacity",)) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(watch), *args],
                          capture_output=True, text=True,
                          env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY), timeout=120)
    code, *loaded = proc.stdout.splitlines()[-1].split()
    return int(code), set() if loaded == ["-"] else set(loaded)


def test_a_run_where_every_line_succeeds_never_imports_tenacity(sim: Any,
                                                                 tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    code, loaded = probe(["run", str(inp), "-o", str(tmp_path / "out"), "--quiet",
                          "--no-preflight", "--base-url", sim.url])
    assert code == 0
    assert "tenacity" not in loaded  # imported at a line's first failure (retry.py)


def test_a_run_imports_neither_the_simulator_nor_the_other_commands(sim: Any,
                                                                   tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    code, loaded = probe(["run", str(inp), "-o", str(tmp_path / "out"), "--quiet",
                          "--no-preflight", "--base-url", sim.url],
                         watch=("tmbatch.sim", "aiohttp.web", "tmbatch.cli.outputs",
                                "tmbatch.cli.server", "tmbatch.tools.labels",
                                "tmbatch.spend.estimate"))
    assert code == 0
    assert not loaded  # the quick parser (cli._QuickParser): `run`'s flags, no --sim ones


# Command lines the quick parser takes: it must give what the whole parser gives, less the
# --sim-* values (read only with --sim, which sends a line to the whole parser).
QUICK = [
    ["run", "in.jsonl"],
    ["run", "in.jsonl", "-o", "out", "-c", "8", "--rpm", "600", "--tpm", "1e6", "-q",
     "--no-preflight", "--base-url", "http://127.0.0.1:1", "--shard", "1/4", "--no-stream",
     "--budget-tokens", "1000", "--price", "m=1:2", "--fsync", "never", "-vv"],
    ["run", "job.toml", "--limit-scope", "account", "--adaptive", "--patience", "30"],
    ["validate", "in.jsonl", "--endpoint", "chat"],
    ["estimate", "in.jsonl", "--prices", "p.toml"],
    ["status", "out"],
    ["resend", "out", "--class", "ambiguous"],
    ["export", "out", "--combined"],
    ["merge", "a", "b", "-o", "c"],
    ["doctor", "--json"],
    ["models"],
    ["sim", "--port", "0"],
]


def test_the_quick_parser_gives_what_the_whole_parser_gives() -> None:
    from tmbatch.cli.main import _quick_parse, build_parser

    for args in QUICK:
        quick = _quick_parse(args)
        assert quick is not None, args
        whole = vars(build_parser().parse_args(args))
        left_out = {k for k in whole if k not in vars(quick)}
        assert all(k.startswith("sim_") for k in left_out), (args, left_out)
        assert vars(quick) == {k: v for k, v in whole.items() if k not in left_out}, args


def test_help_errors_and_sim_flags_go_to_the_whole_parser() -> None:
    from tmbatch.cli.main import _quick_parse

    for args in (["run", "in.jsonl", "--sim"], ["run", "in.jsonl", "--sim-latency", "1"],
                 ["run", "-h"], ["run", "in.jsonl", "-qh"], ["status", "--help"], [],
                 ["--version"], ["runn"], ["run"], ["run", "in.jsonl", "--bogus"],
                 ["run", "in.jsonl", "-c", "0"]):
        assert _quick_parse(args) is None, args
