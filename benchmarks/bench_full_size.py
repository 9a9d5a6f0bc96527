#!/usr/bin/env python
"""Full-width V4 layers in each weight mode: memory and time per token, extrapolated to the releases.

A generated checkpoint in DeepSeek's official layout holds `--layers` full-width V4-Flash layers (D 4096,
64 heads, CSA with the Lightning Indexer, `--experts` routed experts of width 2048 + 1 shared; default
256 experts: one real Flash layer) with FP8 matrices and FP4 experts as released (random codes and
scales: values do not matter for timing), a small vocabulary (`--vocab`, so the embedding and head
stay small) and no draft module. Each mode runs in its own fresh process:

* resident bf16: `v4lens.load(path, dtype=bf16)` (dequantised on load);
* as stored: `v4lens.load(path, dtype=bf16, keep_quantized=True)` (FP8 / FP4 in memory, dequantised at use);
* experts from disk: `v4lens.load(path, dtype=bf16, keep_quantized=True, expert_offload="disk")` (each
  expert the router picks read from the checkpoint's files, through a cache of `--expert-cache` bytes,
  read ahead of compute on a background thread; "experts-sync": the same with the read-ahead off);
* layers on disk: `v4lens.load(path, dtype=bf16, device_map={...: "disk"}, offload_folder=...)` (each
  layer read back from the offload folder for its own forward).

Each process reports load time, resident memory after loading and its peak (RSS, over the
interpreter's), a prefill of `--tokens` tokens and decoding steps with the cache (best of `--repeat`).
The report then extrapolates per-layer costs to V4-Flash-0731 (43 layers) and V4-Pro-0813 (61 layers,
D 7168, 384 experts; scaled by its per-layer bytes), and prints where `v4lens info --memory` would place
them on the reference machines. `--device cuda` runs the same on a GPU when there is one.

    python benchmarks/bench_full_size.py --experts 16 --tokens 32            # smoke test (~1 min)
    python benchmarks/bench_full_size.py --out benchmarks/results/full_size_flash_layer.md   # one Flash layer
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------- the checkpoint
def make_checkpoint(path: Path, layers: int, experts: int, vocab: int, seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file

    from v4lens.model import HookedV4
    from v4lens.model.presets import preset
    from v4lens.weights.names import official_name
    from v4lens.weights.placement import _FP4, _FP8
    from v4lens.weights.quant import quantize_fp8
    from v4lens.weights.saving import write_config

    cfg = preset("flash", draft=None, n_layers=layers, compress_ratios=(4,) * layers, n_hash_layers=0,
                 d_vocab=vocab, n_routed_experts=experts)  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, cfg, "official")
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = HookedV4(cfg)
    shard, n_shard, written = {}, 0, 0
    for name, t in model.state_dict().items():
        if _FP4.search(name):  # per expert: random e2m1 codes, e8m0 scales near 2^-7
            E, out, inp = t.shape
            for e in range(E):
                key = official_name(name, e)
                shard[key] = torch.randint(-128, 128, (out, inp // 2), generator=g, dtype=torch.int8)
                shard[key.removesuffix(".weight") + ".scale"] = torch.full((out, inp // 32), 2.0**-7).to(torch.float8_e8m0fnu)
        elif _FP8.search(name):
            q, s = quantize_fp8(torch.randn(t.shape, generator=g) * 0.02)
            key = official_name(name)
            shard[key], shard[key.removesuffix(".weight") + ".scale"] = q, s
        else:
            value = torch.ones(t.shape) if name.endswith(".w") else torch.randn(t.shape, generator=g) * 0.02
            if name.endswith(("_hc.base", ".ape", "attn_sink", "gate.bias")):
                value = torch.zeros(t.shape)
            shard[official_name(name)] = value.to(torch.float32 if t.dtype == torch.float32 else torch.bfloat16)
        if sum(v.numel() * v.element_size() for v in shard.values()) > 2e9:
            save_file(shard, path / f"model-{n_shard:05d}.safetensors")
            written += sum(v.numel() * v.element_size() for v in shard.values())
            shard, n_shard = {}, n_shard + 1
    save_file(shard, path / f"model-{n_shard:05d}.safetensors")
    written += sum(v.numel() * v.element_size() for v in shard.values())
    return {"bytes": written, "params": sum(t.numel() for t in model.state_dict().values())}


def generated_checkpoint(workdir: Path, layers: int, experts: int, vocab: int) -> tuple[Path, dict, float]:
    """The generated checkpoint for these sizes under `workdir`, made unless a complete one is there:
    (its folder, make_checkpoint's info, seconds spent making it). bench.json is written last, so a
    generation that was interrupted is made again, never reused."""
    ckpt = workdir / f"ckpt-L{layers}-E{experts}-V{vocab}"
    t0 = time.perf_counter()
    if not (ckpt / "bench.json").exists():
        (ckpt / "bench.json").write_text(json.dumps(make_checkpoint(ckpt, layers, experts, vocab)))
    return ckpt, json.loads((ckpt / "bench.json").read_text()), time.perf_counter() - t0


# ---------------------------------------------------------------------- one mode, in its own process
def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def worker(spec: dict) -> None:
    import torch

    import v4lens

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    before = _rss("VmRSS:")
    kwargs = {"dtype": torch.bfloat16}
    if spec["mode"] == "stored":
        kwargs["keep_quantized"] = True
    elif spec["mode"] in ("experts", "experts-sync"):
        kwargs |= {"keep_quantized": True, "expert_offload": "disk", "expert_cache": spec["expert_cache"]}
    elif spec["mode"] == "disk":
        main = {m: spec["device"] for m in ("embed", "hc_head", "ln_final", "head")}
        kwargs |= {"device_map": main | {f"blocks.{i}": "disk" for i in range(spec["layers"])},
                   "offload_folder": spec["offload"]}  # fmt: skip
    if spec["device"] != "cpu" and spec["mode"].startswith("experts"):
        kwargs["device"] = spec["device"]
    elif spec["device"] != "cpu" and spec["mode"] != "disk":
        kwargs["device_map"] = {m: spec["device"] for m in ("embed", "hc_head", "ln_final", "head", "blocks")}
    t0 = time.perf_counter()
    model = v4lens.load(spec["path"], **kwargs)
    load_s = time.perf_counter() - t0
    if spec["mode"] == "experts-sync":
        model.expert_cache.ahead = 0  # every expert read on the forward's own thread, when it is used
    after_load = _rss("VmRSS:") - before
    sync = torch.cuda.synchronize if spec["device"] != "cpu" else (lambda: None)
    tokens = (torch.arange(spec["tokens"]) * 7919 % model.cfg.d_vocab)[None].to(model.device)
    best_prefill, best_step = math.inf, math.inf
    with torch.inference_mode():
        for _ in range(spec["repeat"]):
            kv = v4lens.V4KVCache()
            sync()
            t0 = time.perf_counter()
            model(tokens, past_kv_cache=kv, logits_to_keep=1)
            sync()
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            snap = kv.snapshot()
            for _ in range(2):
                t0 = time.perf_counter()
                model(tokens[:, :1], past_kv_cache=kv, logits_to_keep=1)
                sync()
                best_step = min(best_step, time.perf_counter() - t0)
                kv.restore(snap)
    print(json.dumps({"load_s": load_s, "after_load": after_load, "peak": _rss("VmHWM:") - before,
                      "prefill_s": best_prefill, "step_s": best_step}))  # fmt: skip


# ---------------------------------------------------------------------- report
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/v4lens_full_size"))
    p.add_argument("--modes", default="resident,stored,experts,disk")
    p.add_argument("--expert-cache", default="2GB", help="expert_offload's device cache in the 'experts' mode")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import shutil

    from v4lens.cli_info import REFERENCE_MACHINES
    from v4lens.model.presets import preset
    from v4lens.weights.placement import plan_placement, weight_bytes

    ckpt, info, made_s = generated_checkpoint(args.workdir, args.layers, args.experts, args.vocab)
    results = {}
    for mode in args.modes.split(","):
        offload = args.workdir / "offload"
        shutil.rmtree(offload, ignore_errors=True)
        spec = {"mode": mode, "path": str(ckpt), "layers": args.layers, "tokens": args.tokens, "repeat": args.repeat,
                "threads": args.threads, "device": args.device, "offload": str(offload),
                "expert_cache": args.expert_cache}  # fmt: skip
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if run.returncode != 0:
            results[mode] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else str(run.returncode)}
        else:
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        shutil.rmtree(offload, ignore_errors=True)

    labels = {"resident": "resident bf16 (dequantised on load)", "stored": "as stored (keep_quantized=True)",
              "experts": "experts from disk (expert_offload='disk', the rest as stored)",
              "experts-sync": "experts from disk, no read-ahead (expert_cache.ahead = 0)",
              "disk": "layers on disk (device_map, offload_folder)"}  # fmt: skip
    lines = [f"# {args.layers} full-width V4-Flash layer(s), {args.experts} FP4 experts, on {args.device}", "",
             (f"Checkpoint: {info['bytes'] / 1e9:.2f} GB on disk ({info['params'] / 1e9:.2f}B parameters, vocabulary "
              f"{args.vocab}); generated in {made_s:.0f} s (0 if reused). Prefill of {args.tokens} tokens and one "
              f"decoding step, best of {args.repeat}; memory is RSS over the interpreter's, after loading and at peak."), "",
             "| mode | load | memory after load | peak | prefill tok/s | decoding step | step ÷ resident |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    base = results.get("resident", {}).get("step_s")
    for mode, r in results.items():
        if "error" in r:
            lines.append(f"| {labels[mode]} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['step_s'] / base:.2f}×" if base else "—"
        lines.append(f"| {labels[mode]} | {r['load_s']:.1f} s | {r['after_load'] / 1e9:.2f} GB | {r['peak'] / 1e9:.2f} GB "
                     f"| {args.tokens / r['prefill_s']:.1f} | {r['step_s'] * 1e3:.0f} ms | {ratio} |")  # fmt: skip

    lines += ["", "## Extrapolated to the releases (per-layer costs × layers, scaled by each release's per-layer bytes)", ""]
    layer = weight_bytes(preset("flash", draft=None, n_layers=1, compress_ratios=(4,), n_hash_layers=0,
                                d_vocab=args.vocab, n_routed_experts=args.experts))  # fmt: skip
    for release in ("flash-0731", "pro-0813"):
        cfg = preset(release)
        wb = weight_bytes(cfg)
        scale = (wb.total("stored") / cfg.n_layers) / layer.total("stored")  # per-layer bytes vs the measured layer
        lines.append(f"**{release}**: {wb.total('bf16') / 1e9:,.0f} GB bf16, {wb.total('stored') / 1e9:,.0f} GB as stored.")
        for mode, r in results.items():
            if "error" not in r:
                step = r["step_s"] / args.layers * scale * cfg.n_layers
                lines.append(f"- {labels[mode]}: ≈ {step:,.1f} s per decoding step on this machine")
        for machine, budget in REFERENCE_MACHINES.items():
            for mode in ("stored", "bf16"):
                try:
                    where = "; ".join(plan_placement(cfg, budget, mode).summary())
                except ValueError as e:
                    where = f"does not fit ({e})"
                lines.append(f"- {machine}, weights {mode}: {where}")
        lines.append("")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
