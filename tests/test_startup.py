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

# Runs `tmbatch` in-process and prints, after it, which of these top-level packages it loaded.
PROBE = """
import sys
from tmbatch.cli import main
code = main(sys.argv[1:])
loaded = sorted({m.split('.')[0] for m in sys.modules} & {'tenacity'})
print(code, ' '.join(loaded) or '-')
"""


def probe(args: list[str]) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY), timeout=120)
    code, loaded = proc.stdout.split()[-2:]
    return int(code), set() if loaded == "-" else set(loaded.split())


def test_a_run_where_every_line_succeeds_never_imports_tenacity(sim: Any,
                                                                 tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    code, loaded = probe(["run", str(inp), "-o", str(tmp_path / "out"), "--quiet",
                          "--no-preflight", "--base-url", sim.url])
    assert code == 0
    assert "tenacity" not in loaded  # imported at a line's first failure (retry.py)
