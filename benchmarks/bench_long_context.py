#!/usr/bin/env python
"""Long-context caching: chosen hooks over a 32k-token input of mini-3b on a 24 GB CPU machine.

Caching every hook of a 32k-token mini-3b forward would take ~100 GB (1,110 tensors; 2.9 GiB per
1k tokens measured by bench_forward.py) and its all-position logits alone 17 GB. An
interpretability run keeps what it needs instead:

* `run_with_cache(..., return_type=None)`: no [b, p, V] logits;
* `names_filter`: the hooks the analysis reads;
* `pos_slice`: a position subset, which slices the 4-D stream tensors [b, p, n, d] on p;
* `offload_dir`: each tensor goes, as its hook fires, to a memory-mapped file (page cache, which
  the kernel can evict), not to the process's heap;
* `stop_at_layer`: only the blocks before it run.

Scenarios (each in its own fresh process, so every peak is clean; times are one run each):

1. `forward`: the plain forward without logits (`return_type=None`), for reference.
2. `tail`: streams after every block, every layer's sink mass and every CSA layer's indexer
   picks at the last `--tail` positions, every compressor's entries (all of them), offloaded.
3. `early-layers`: the streams after each of the first `--stop-at-layer` blocks at *all*
   positions, offloaded, with `stop_at_layer` (the later blocks never run).

Reported: wall time, peak RSS of the process (absolute, and over the loaded model), bytes of
cache on disk, and that the cached tensors are file-backed.

    python benchmarks/bench_long_context.py                      # mini-3b bf16, 32k
    python benchmarks/bench_long_context.py --preset tiny --length 512 --tail 64 --stop-at-layer 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_forward import HostPeak, _proc_status  # (memory probes shared with the forward benchmark)

SCENARIOS = ("forward", "tail", "early-layers")


def worker(args) -> dict:
    import torch

    import v4lens

    torch.manual_seed(0)
    model = v4lens.load(args.preset, dtype=args.dtype)
    cfg = model.cfg
    tokens = torch.randint(1000 if cfg.d_vocab > 2000 else 0, cfg.d_vocab, (1, args.length))
    loaded = _proc_status("VmRSS")
    out_dir = Path(tempfile.mkdtemp(prefix="v4lens-long-", dir=args.offload_root))
    L = cfg.n_layers
    if args.scenario == "tail":
        wanted = {f"blocks.{l}.hook_streams_post" for l in range(L)} | {f"blocks.{l}.attn.hook_sink" for l in range(L)}
        wanted |= {f"blocks.{l}.attn.indexer.hook_topk" for l in range(L) if cfg.layer_type(l) == "csa"}
        wanted |= {f"blocks.{l}.attn.compressor.hook_kv" for l in range(L) if cfg.layer_type(l) != "sliding"}
        kwargs = dict(names_filter=lambda n: n in wanted, pos_slice=(args.length - args.tail, args.length))
    elif args.scenario == "early-layers":
        kwargs = dict(names_filter=lambda n: n.endswith("hook_streams_post"), stop_at_layer=args.stop_at_layer)
    peak = HostPeak()
    peak.start()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.scenario == "forward":
            model(tokens, return_type=None)
            cache = None
        else:
            _, cache = model.run_with_cache(tokens, return_type=None, offload_dir=out_dir, **kwargs)
    seconds = time.perf_counter() - t0
    over_model = peak.stop()
    result = {
        "scenario": args.scenario, "preset": args.preset, "dtype": args.dtype, "length": args.length,
        "seconds": seconds, "tokens_per_s": args.length / seconds, "peak_over_model": over_model,
        "peak_rss": _proc_status("VmHWM"), "model_rss": loaded, "peak_method": peak.method,
    }  # fmt: skip
    if cache is not None:
        tensors = dict(cache.items())
        result["tensors"] = len(tensors)
        result["file_backed"] = all(t.untyped_storage().filename for t in tensors.values())
        result["cache_bytes"] = sum(t.nbytes for t in tensors.values())
        shapes = sorted({tuple(t.shape) for n, t in tensors.items() if "streams" in n})
        result["stream_shapes"] = [list(s) for s in shapes]
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _mem_total_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024 / 1e9


def fmt_gb(b) -> str:
    return "—" if b is None else f"{b / 1e9:.2f} GB"


def render(results: list[dict], args, started: str, wall: float) -> str:
    import platform

    import torch

    lines = [
        f"# v4lens long-context caching: {args.preset} {args.dtype}, {args.length:,} tokens",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {_mem_total_gb():.1f} GB RAM; torch {torch.__version__}",
        f"- date {started}; total wall time {wall / 60:.1f} min; one run per scenario, fresh process each",
        f"- peak memory: {results[0]['peak_method'] if results else ''}; 'peak RSS' is the whole process "
        "(model included), 'over model' subtracts the RSS after loading",
        "",
        "| scenario | what is cached | time | tok/s | peak RSS | over model | cache (on disk) | file-backed |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    what = {
        "forward": "nothing (`return_type=None`)",
        "tail": f"streams after every block, sink mass, CSA picks at the last {args.tail} positions; all compressor entries",
        "early-layers": f"streams after blocks 0..{args.stop_at_layer - 1} at all positions (`stop_at_layer={args.stop_at_layer}`)",
    }
    for r in results:
        lines.append(
            f"| {r['scenario']} | {what[r['scenario']]} | {r['seconds']:.0f} s | {r['tokens_per_s']:.0f} | "
            f"{fmt_gb(r['peak_rss'])} | {fmt_gb(r['peak_over_model'])} | "
            f"{fmt_gb(r.get('cache_bytes')) if 'cache_bytes' in r else '—'} | "
            f"{'yes' if r.get('file_backed') else ('—' if 'file_backed' not in r else 'NO')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini-3b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--tail", type=int, default=512, help="positions cached in the 'tail' scenario")
    p.add_argument("--stop-at-layer", type=int, default=8)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--offload-root", default=None, help="where the memory-mapped cache files go (default: $TMPDIR)")
    p.add_argument("--out", default=None, help="write the markdown table here (and .json next to it)")
    p.add_argument("--scenario", help=argparse.SUPPRESS)  # worker mode
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scenario:
        print("@@RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    started, t0 = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), time.time()
    results = []
    for scenario in args.scenarios.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--scenario", scenario]
        print(f"[{scenario}] running ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT ")]
        if proc.returncode or not found:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"scenario {scenario} failed (exit {proc.returncode})")
        results.append(json.loads(found[-1].removeprefix("@@RESULT ")))
        print(f"[{scenario}] {results[-1]['seconds']:.1f} s, peak RSS {fmt_gb(results[-1]['peak_rss'])}", file=sys.stderr)
    text = render(results, args, started, time.time() - t0)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
