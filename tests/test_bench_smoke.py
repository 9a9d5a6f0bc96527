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


def _bench_decode():
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_decode")
    finally:
        sys.path.remove(str(BENCH))


def test_bench_decode_rounds_alternate_and_merge():
    bd = _bench_decode()
    args = bd.parse_args(["--preset", "tiny", "--prompt-lengths", "16,64", "--hf-max-len", "32", "--rounds", "3"])
    jobs = [(j["job"], j["length"], "skip" in j) for j in bd.build_jobs(args) if j["job"] != "roofline"]
    assert jobs == [
        ("v4lens", 16, False), ("hf", 16, False), ("hf", 16, False), ("v4lens", 16, False),
        ("v4lens", 16, False), ("hf", 16, False),
        ("v4lens", 64, False), ("hf", 64, True), ("v4lens", 64, False), ("v4lens", 64, False),
    ]  # fmt: skip

    def result(job, status, *times):
        spec = {"job": job, "dtype": "bf16", "length": 16}
        runs = [{"kind": "run", "mode": "generate", "time_s": t} for t in times]
        return {"spec": spec, "status": status, "events": [{"kind": "loaded"}, *runs, {"kind": "done"}]}

    merged = bd.merge_rounds([result("v4lens", "ok", 3.0), result("hf", "ok", 5.0), result("hf", "ok", 4.0),
                              result("v4lens", "timeout", 2.0)])  # fmt: skip
    by_job = {r["spec"]["job"]: r for r in merged}
    assert len(merged) == 2
    assert [e["time_s"] for e in by_job["hf"]["events"] if e["kind"] == "run"] == [5.0, 4.0]
    assert [e["kind"] for e in by_job["v4lens"]["events"]] == ["loaded", "run", "done", "run"]
    assert by_job["v4lens"]["status"] == "timeout" and by_job["hf"]["status"] == "ok"


def test_bench_decode_compiled_head_runs_in_every_round_next_to_the_eager_head():
    bd = _bench_decode()
    args = bd.parse_args(["--preset", "tiny", "--prompt-lengths", "16", "--rounds", "2", "--compiled-head"])
    jobs = [j["job"] for j in bd.build_jobs(args) if j["job"] != "roofline"]
    assert jobs == ["v4lens", "v4lens-compiled", "hf", "hf", "v4lens-compiled", "v4lens"]
    assert "v4lens-compiled" not in [j["job"] for j in bd.build_jobs(bd.parse_args(["--preset", "tiny"]))]


def test_bench_decode_reports_a_step_against_the_bandwidth_and_the_one_row_kernel():
    """Two probes, two shares: bytes per step ÷ each rate ÷ the measured step time."""
    bd = _bench_decode()
    args = bd.parse_args(["--preset", "tiny", "--prompt-lengths", "16"])
    jobs = bd.build_jobs(args)
    assert [j["measure"] for j in jobs if j["job"] == "roofline"] == ["bandwidth", "gemv"]
    probes = [{"spec": j, "status": "ok", "events": []} for j in jobs if j["job"] == "roofline"]
    assert len(bd.merge_rounds(probes)) == 2  # not merged into one job as rounds of the same probe
    probe = {"status": "ok", "threads": 2, "why": "", "route": None}
    report = {
        "args": {"new_tokens": 11},
        "decode_bytes": {"bf16": {"16": 2e9}},
        "roofline": {"bandwidth": dict(probe, value=20e9), "gemv": dict(probe, value=10e9)},
    }
    steps = {"decode_s": 10 * 0.5}  # ten steps of 0.5 s: 0.1 s at the bandwidth, 0.2 s at the kernel's rate
    assert bd._bandwidth_cell(report, "bf16", 16, steps) == bd.bf.fmt_pct(0.2)
    assert bd._bandwidth_cell(report, "bf16", 16, steps, "gemv") == bd.bf.fmt_pct(0.4)
    assert bd._bandwidth_cell({**report, "roofline": {"bandwidth": report["roofline"]["bandwidth"]}}, "bf16", 16,
                              steps, "gemv") == "—"  # fmt: skip
    lines = bd.bf.roofline_lines(report, "decode")
    assert any("read bandwidth 20.0 GB/s" in line for line in lines)
    assert any("one-row bf16 products read their weight at 10.0 GB/s" in line for line in lines)
