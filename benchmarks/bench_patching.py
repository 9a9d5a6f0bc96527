#!/usr/bin/env python
"""Activation-patching sweeps: v4lens with several indices per forward, v4lens with one index per
forward, and `transformer_lens.patching`'s own function, on the same model, task and metric.

Models: `tiny` (`v4lens.load("tiny", d_vocab=256)`, 4 layers: sliding, CSA, HCA, CSA) and `small`
(mini-3b's layout cut to 4 layers, d_model 512, 8 heads, 8 routed experts, vocabulary 4096, 24M
parameters: more compute per forward, where tiny is bound by per-operation overhead). Task: seeded
random clean tokens, the corrupted ones differ at one position; metric: a logit difference at the
last position.

Sweeps: `attn_out` [layer, pos] and `attn_head_out_all_pos` [layer, head] (TransformerLens has
both; its values are the reference: max |Δ| column), `attn_head_pattern_all_pos` [layer, head]
(v4lens only: TransformerLens's pastes the clean pattern by column and is refused on CSA layers
whose indexer picks differ; its column shows "refused").

Each time is the best of `--repeat` runs after one warm-up forward, on `--threads` torch threads
(default 1: on a shared 2-core machine two threads per op slow down many times over as soon as
another process holds a core). The machine's load average is printed: compare rows of one run.

    python benchmarks/bench_patching.py --out benchmarks/results/patching_tiny.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's progress bars (read when tqdm is imported)
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing v4lens
    sys.path.insert(0, str(REPO))

MODELS = {  # name -> (v4lens.load keywords, batch, tokens)
    "tiny": ({"preset": "tiny", "d_vocab": 256}, 2, 32),
    "small": (
        {"preset": "mini-3b", "n_layers": 4, "compress_ratios": (0, 4, 8, 4), "n_hash_layers": 1, "d_vocab": 4096,
         "draft": None, "d_model": 512, "n_heads": 8, "q_lora_rank": 256, "o_lora_rank": 256, "moe_inter_dim": 256,
         "n_routed_experts": 8},
        1, 16,
    ),
}  # fmt: skip
SWEEPS = (  # v4lens and TransformerLens function name (None: TransformerLens's is refused where picks differ)
    ("attn_out [layer, pos]", "get_act_patch_attn_out", "get_act_patch_attn_out"),
    ("attn_head_out_all_pos [layer, head]", *["get_act_patch_attn_head_out_all_pos"] * 2),
    ("attn_head_pattern_all_pos [layer, head]", "get_act_patch_attn_head_pattern_all_pos", None),
)


def best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_model(name: str, batch_sizes: list[int], repeat: int) -> list[dict]:
    import torch
    from transformer_lens import patching as tl

    import v4lens
    from v4lens import patching as P

    kwargs, b, S = MODELS[name]
    model = v4lens.load(**kwargs)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (b, S), generator=gen)
    corrupted = clean.clone()
    corrupted[:, S // 2] = (corrupted[:, S // 2] + 1) % model.cfg.d_vocab

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, 1] - logits[:, -1, 2]).mean()

    rows = []
    with torch.no_grad():
        clean_cache = model.run_with_cache(clean)[1]
        model(corrupted)  # warm-up
        for sweep, ours_name, theirs_name in SWEEPS:
            ours, ref = getattr(P, ours_name), None
            row = {"model": name, "sweep": sweep, "how": "transformer_lens.patching", "seconds": None, "cells": None,
                   "delta": "refused (CSA picks differ)"}  # fmt: skip
            if theirs_name is not None:
                t, ref = best_time(partial(getattr(tl, theirs_name), model, corrupted, clean_cache, metric), repeat)
                rows.append({**row, "seconds": t, "cells": ref.numel(), "delta": "reference"})
            for n in batch_sizes:
                t, got = best_time(partial(ours, model, corrupted, clean_cache, metric, batch_size=n), repeat)
                delta = "-" if ref is None else f"{float((got - ref).abs().max()):.1e}"
                how = f"v4lens batch_size={n}"
                rows.append({**row, "how": how, "seconds": t, "cells": got.numel(), "delta": delta})
            if theirs_name is None:
                rows.append(row)
            print(f"  {name} {sweep} done", file=sys.stderr)
    return rows


def render(rows: list[dict], args, elapsed: float, load: tuple) -> str:
    import torch

    busy = max(load[0], os.getloadavg()[0]) > 0.5 * (os.cpu_count() or 1)
    lines = [
        "# Patching sweeps: v4lens batched, v4lens one index per forward, transformer_lens.patching",
        "",
        (f"`python benchmarks/bench_patching.py {' '.join(sys.argv[1:])}` — {platform.machine()}, "
         f"{os.cpu_count()} CPUs, torch {torch.__version__} on {args.threads} thread(s), fp32; best of {args.repeat}; "
         f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {elapsed:.0f} s in all."
         + (" Other processes were running: absolute times are slower than on a quiet machine; compare the rows."
            if busy else "")),
        "",
        "Models: " + "; ".join(f"`{m}`: batch {MODELS[m][1]}, {MODELS[m][2]} tokens" for m in args.models) + ". "
        "Speed-up: against transformer_lens.patching's time on the same sweep (the v4lens batch_size=1 row when "
        "TransformerLens refuses). max |Δ|: v4lens's values against TransformerLens's.",
        "",
        "| model | sweep | how | cells | forwards | time (s) | cells/s | speed-up | max abs Δ vs TL |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["seconds"] is None:
            lines.append(f"| {r['model']} | {r['sweep']} | {r['how']} | | | | | | {r['delta']} |")
            continue
        base = next(x["seconds"] for x in rows if x["model"] == r["model"] and x["sweep"] == r["sweep"]
                    and x["seconds"] is not None)  # fmt: skip
        n = int(r["how"].rpartition("=")[2]) if "batch_size" in r["how"] else 1
        forwards = -(-r["cells"] // n)  # NaN cells (layers without the mechanism) would not run; none here
        lines.append(f"| {r['model']} | {r['sweep']} | {r['how']} | {r['cells']} | {forwards} | {r['seconds']:.2f} "
                     f"| {r['cells'] / r['seconds']:.0f} | {base / r['seconds']:.1f}× | {r['delta']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    p.add_argument("--batch-sizes", default="1,16,64", help="v4lens batch_size values to time")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args()
    args.models = args.models.split(",")
    import torch

    torch.set_num_threads(args.threads)
    load, t0 = os.getloadavg(), time.perf_counter()
    rows = [r for m in args.models for r in run_model(m, [int(x) for x in args.batch_sizes.split(",")], args.repeat)]
    text = render(rows, args, time.perf_counter() - t0, load)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
