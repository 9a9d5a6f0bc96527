#!/usr/bin/env python
"""Loading benchmark: building mini-3b's random scaffold vs loading it from safetensors.

Once (in a worker), the scaffold is built and written with `save_pretrained` in both layouts
(transformers' and DeepSeek's) under `--dir`. Then every measurement runs in its own fresh
worker process, `--repeat` times (best time, largest memory reported; the first read of a
file after writing it may come from disk, later ones from the page cache):

* `scaffold`: `v4lens.load(preset, dtype=bf16)` (seeded random init);
* `v4lens (hf)` / `v4lens (official)`: `v4lens.load(dir, dtype=bf16)`;
* `transformers`: `AutoModelForCausalLM.from_pretrained(dir/hf, dtype=bf16)` on the same files;
* `slice`: `v4lens.slice_checkpoint` of the official copy to a smaller config (`--slice-to`;
  its "model bytes" are the bytes written).

Memory, both over the process's baseline just before the load (after imports): the peak RSS
(VmHWM, reset through /proc/self/clear_refs; it counts mapped file pages too) and the private
(anonymous) memory after loading, against the model's own bytes. "One copy" means peak ≈
the model's bytes.

    python benchmarks/bench_load.py --preset mini-3b --dir /tmp/v4lens-bench --out benchmarks/results/load_mini3b_bf16.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "@@LOAD "


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(job: str, args) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    import v4lens

    torch.set_num_threads(args.threads)
    d = Path(args.dir)
    from transformers import AutoModelForCausalLM  # imported before the clock starts, like v4lens

    with open("/proc/self/clear_refs", "w") as f:  # reset the RSS high-water mark: measure the load only
        f.write("5")
    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    start = time.perf_counter()
    if job == "prepare":
        model = v4lens.load(args.preset, dtype=torch.bfloat16)
        built = time.perf_counter()
        model.save_pretrained(d / "hf")
        saved_hf = time.perf_counter()
        model.save_pretrained(d / "official", format="official")
        return {
            "build_s": built - start,
            "save_hf_s": saved_hf - built,
            "save_official_s": time.perf_counter() - saved_hf,
        }
    if job == "scaffold":
        model = v4lens.load(args.preset, dtype=torch.bfloat16)
    elif job in ("hf", "official"):
        model = v4lens.load(d / job, dtype=torch.bfloat16)
    elif job == "transformers":
        model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.bfloat16)
    elif job == "slice":
        overrides = json.loads(args.slice_to)
        target = v4lens.preset(args.preset, **overrides)
        v4lens.slice_checkpoint(d / "official", target, d / "sliced", progress=False)
        model = None  # "model bytes": what was written
    else:
        raise ValueError(job)
    seconds = time.perf_counter() - start
    if model is None:
        weights = sum(f.stat().st_size for f in (d / "sliced").glob("*.safetensors"))
    else:
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "seconds": seconds, "peak_rss": _status("VmHWM") - base_rss, "anon": _status("RssAnon") - base_anon,
        "weights": weights,
    }  # fmt: skip


def run(job: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", job] + [a for a in sys.argv[1:] if a != "--worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini-3b")
    p.add_argument("--dir", default="/tmp/v4lens-bench-load", help="where the checkpoints are written (~2× model size)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    smaller = {
        "d_model": 1024,
        "n_routed_experts": 12,
        "n_layers": 14,
        "compress_ratios": [0, 0] + [4, 112] * 5 + [4, 0, 0],
    }
    p.add_argument(
        "--slice-to", default=json.dumps(smaller), help="V4Config overrides of the preset for the slicing run (JSON)"
    )
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", action="append", default=[], help=".md or .json (repeatable)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(args.worker, args)), flush=True)
        return 0

    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(f"preparing {args.preset} checkpoints in {args.dir} ...", flush=True)
    prep = run("prepare", args)
    jobs = ["scaffold", "hf", "official"] + ([] if args.no_transformers else ["transformers"]) + ["slice"]
    results = {}
    for job in jobs:
        runs = [run(job, args) for _ in range(args.repeat)]
        results[job] = {
            "seconds": min(r["seconds"] for r in runs), "runs_s": [round(r["seconds"], 2) for r in runs],
            "peak_rss": max(r["peak_rss"] for r in runs), "anon": max(r["anon"] for r in runs),
            "weights": runs[0]["weights"],
        }  # fmt: skip
        print(job, results[job], flush=True)
    size = sum(f.stat().st_size for f in (Path(args.dir) / "hf").glob("*.safetensors"))
    report = {
        "preset": args.preset, "dtype": "bfloat16", "threads": args.threads, "checkpoint_bytes": size,
        "prepare": prep, "results": results, "machine": (f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    md = render(report)
    print(md)
    for out in args.out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n" if out.endswith(".json") else md)
    return 0


def render(r: dict) -> str:
    gb = 1e9
    names = {"scaffold": "random scaffold (seeded init)", "hf": "v4lens.load(transformers layout)",
             "official": "v4lens.load(official layout)", "transformers": "transformers from_pretrained",
             "slice": "slice_checkpoint (official → smaller; bytes written)"}  # fmt: skip
    lines = [
        f"# Loading {r['preset']} in bf16 ({r['date']}, {r['machine']}, {r['threads']} threads)",
        "",
        (
            f"Checkpoint: {r['checkpoint_bytes'] / gb:.2f} GB of safetensors; building the scaffold took "
            f"{r['prepare']['build_s']:.1f} s, writing it {r['prepare']['save_hf_s']:.1f} s (transformers layout) "
            f"and {r['prepare']['save_official_s']:.1f} s (official)."
        ),
        "",
        "| what | time (best) | runs | peak RSS added | private memory added | model bytes | peak ÷ model |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for job, x in r["results"].items():
        ratio = f"{x['peak_rss'] / x['weights']:.2f}" if x["weights"] else "—"
        weights = f"{x['weights'] / gb:.2f} GB" if x["weights"] else "—"
        lines.append(
            f"| {names[job]} | {x['seconds']:.1f} s | {x['runs_s']} | {x['peak_rss'] / gb:.2f} GB | "
            f"{x['anon'] / gb:.2f} GB | {weights} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
