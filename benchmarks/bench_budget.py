#!/usr/bin/env python
"""A checkpoint larger than the memory budget, run under it: peak memory and logits against the full model.

The generator of `bench_full_size.py` writes `--layers` full-width V4-Flash layers (D 4096, 256 FP4 experts
of width 2048 each, FP8 matrices; default 2 layers: 7.8 GB on disk) in DeepSeek's official layout. Two fresh
processes then run the same prompt (a prefill and `--steps` decoding steps with the cache) in fp32:

* budget: `v4lens.load(path, dtype=fp32, keep_quantized=True, expert_offload="disk", expert_cache=...,
  max_memory=budget)`: the routed experts stay in the checkpoint's files and only the experts the
  router picks are read (through a cache of `--expert-cache` bytes); the rest stays as stored;
* reference: `v4lens.load(path, dtype=fp32, keep_quantized=True)`: the whole checkpoint in memory (as
  stored; the tests show this equals the dequantise-on-load model bit for bit).

Each reports its peak resident memory (VmHWM) over what the interpreter held after importing torch and
v4lens. The check passes when the budget run's peak stays under `--budget` plus the activations' bound
(`--activations`, default 0.3 GB for a short prompt) and its logits equal the reference's exactly; the
exit status says which failed.

    python benchmarks/bench_budget.py --out benchmarks/results/budget_flash_2_layers.md
    python benchmarks/bench_budget.py --layers 1 --experts 32 --budget 1.5GB --expert-cache 256MB   # quick (~1 min)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


def worker(spec: dict) -> None:
    import torch
    from bench_full_size import _rss  # the same RSS reader as the full-size benchmark

    import v4lens

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    before = _rss("VmRSS:")
    kwargs = {"dtype": torch.float32, "keep_quantized": True}
    if spec["mode"] == "budget":
        kwargs |= {"expert_offload": "disk", "expert_cache": spec["expert_cache"], "max_memory": spec["budget"]}
    t0 = time.perf_counter()
    model = v4lens.load(spec["path"], **kwargs)
    load_s, after_load = time.perf_counter() - t0, _rss("VmRSS:") - before
    tokens = (torch.arange(spec["tokens"] + spec["steps"]) * 7919 % model.cfg.d_vocab)[None]
    prompt = spec["tokens"]
    t0 = time.perf_counter()
    with torch.inference_mode():
        kv = v4lens.V4KVCache()
        logits = [model(tokens[:, :prompt], past_kv_cache=kv)]
        for i in range(prompt, tokens.shape[1]):
            logits.append(model(tokens[:, i : i + 1], past_kv_cache=kv))
    run_s = time.perf_counter() - t0
    from safetensors.torch import save_file

    save_file({"logits": torch.cat(logits, dim=1).contiguous()}, spec["logits"])
    cache = getattr(model, "expert_cache", None)
    print(json.dumps({"load_s": load_s, "run_s": run_s, "after_load": after_load, "peak": _rss("VmHWM:") - before,
                      "cache": repr(cache) if cache is not None else None}))  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=16, help="prompt length")
    p.add_argument("--steps", type=int, default=2, help="decoding steps after the prompt")
    p.add_argument("--budget", default="2.5GB")
    p.add_argument("--expert-cache", default="1GB")
    p.add_argument("--activations", default="0.3GB", help="allowance for activations and the allocator over the budget")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/v4lens_full_size"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import torch
    from bench_full_size import generated_checkpoint
    from safetensors.torch import load_file

    from v4lens.weights.memory import parse_bytes

    ckpt, _, made_s = generated_checkpoint(args.workdir, args.layers, args.experts, args.vocab)
    on_disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    runs, logits = {}, {}
    for mode in ("budget", "reference"):
        out = args.workdir / f"logits-{mode}.safetensors"
        spec = {"mode": mode, "path": str(ckpt), "tokens": args.tokens, "steps": args.steps, "budget": args.budget,
                "expert_cache": args.expert_cache, "threads": args.threads, "logits": str(out)}  # fmt: skip
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 2
        runs[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        logits[mode] = load_file(out)["logits"]
        out.unlink()
    budget, allowance = parse_bytes(args.budget, "--budget"), parse_bytes(args.activations, "--activations")
    equal = torch.equal(logits["budget"], logits["reference"])
    within = runs["budget"]["peak"] <= budget + allowance
    gb = 1e9
    lines = [f"# A {on_disk / gb:.2f} GB checkpoint under a {budget / gb:.2f} GB budget", "",
             (f"{args.layers} full-width V4-Flash layer(s) with {args.experts} FP4 experts each, official layout, "
              f"vocabulary {args.vocab} (generated in {made_s:.0f} s; 0 if reused). fp32 compute; a {args.tokens}-token "
              f"prefill and {args.steps} decoding steps. Memory: peak RSS over the interpreter's after imports."), "",
             "| run | load | memory after load | peak | prompt + steps |", "|---|---|---|---|---|"]  # fmt: skip
    names = {"budget": f"experts from disk, cache {args.expert_cache}, max_memory {args.budget}",
             "reference": "whole checkpoint in memory (as stored)"}  # fmt: skip
    for mode, r in runs.items():
        lines.append(f"| {names[mode]} | {r['load_s']:.1f} s | {r['after_load'] / gb:.2f} GB | {r['peak'] / gb:.2f} GB "
                     f"| {r['run_s']:.1f} s |")  # fmt: skip
    lines += ["", f"- {runs['budget']['cache']}",
              f"- peak {runs['budget']['peak'] / gb:.2f} GB ≤ budget {budget / gb:.2f} GB + activations "
              f"{allowance / gb:.2f} GB: {'yes' if within else 'NO'}",
              f"- logits ({tuple(logits['budget'].shape)}) equal the reference's bit for bit: {'yes' if equal else 'NO'}"]  # fmt: skip
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0 if equal and within else 1


if __name__ == "__main__":
    sys.exit(main())
