"""The benchmark scripts still run against the current API (on tiny: seconds, not their real sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_speculative_runs_on_tiny(tmp_path):
    out = tmp_path / "spec.md"
    args = ["--preset", "tiny", "--dtype", "fp32", "--prompt-length", "32", "--new-tokens", "6", "--threads", "1"]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_speculative.py"), *args, "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| verification forward" in report and "| speculative (oracle drafts)" in report
    oracle = next(line for line in report.splitlines() if line.startswith("| speculative (oracle drafts)"))
    assert oracle.rstrip(" |").endswith("yes")  # in fp32 the oracle's tokens are plain greedy's
