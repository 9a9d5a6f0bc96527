"""`v4lens info MODEL`: a model's config, parameter counts, draft module, official tensor count and layer
types, computed from the config alone (no weights are built).
"""

from __future__ import annotations

import json


def config_of(model: str):
    """The V4Config of a preset name or a checkpoint directory (without MTP when it holds no mtp.* tensors)."""
    from pathlib import Path

    from .model.presets import PRESETS, preset
    from .weights.loading import Checkpoint

    if model in PRESETS:
        return preset(model)
    if Path(model).is_dir():
        with Checkpoint(model) as ckpt:
            cfg = ckpt.config()
            return cfg if ckpt.has_mtp() else cfg.without_mtp()
    raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


def draft_summary(cfg) -> str:
    """One phrase for the draft module: "1 MTP block", "DSpark, 3 stages (...)" or "no draft module"."""
    if cfg.draft == "mtp":
        return f"{cfg.n_mtp_layers} MTP block{'s' if cfg.n_mtp_layers > 1 else ''}"
    if cfg.draft == "dspark":
        return (f"DSpark, {cfg.n_mtp_layers} stages (blocks of {cfg.dspark_block_size}, noise token "
                f"{cfg.dspark_noise_token_id}, taps layers {', '.join(map(str, cfg.dspark_target_layer_ids))}, "
                f"Markov rank {cfg.dspark_markov_rank})")  # fmt: skip
    return "no draft module"


def info(args) -> int:
    from .weights.official_layout import official_tensor_count

    cfg = config_of(args.model)
    if args.json:
        print(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("device",)}, indent=1, default=str))
        return 0
    counts = cfg.param_counts()
    kinds = cfg.layer_types()
    print(f"{cfg.name}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.d_vocab}")
    size = f"{counts['total'] / 1e9:.2f}B" if counts["total"] >= 1e8 else f"{counts['total'] / 1e6:.2f}M"
    without = {"mtp": "without MTP", "dspark": "without DSpark"}.get(cfg.draft, "without a draft module")
    print(f"parameters: {counts['total']:,} total ({size}), "
          f"{counts['total_without_mtp']:,} {without}, {counts['active']:,} active per token")  # fmt: skip
    print(f"draft module: {draft_summary(cfg)}")
    print(f"official checkpoint: {official_tensor_count(cfg):,} tensors (FP8 / FP4 matrices with their block scales)")
    print(f"attention: {cfg.n_heads} heads × {cfg.head_dim} (rope {cfg.rope_head_dim}), 1 shared KV head, "
          f"{cfg.o_groups} output groups, window {cfg.window_size}; indexer {cfg.index_n_heads} × "
          f"{cfg.index_head_dim}, top-{cfg.index_topk}")  # fmt: skip
    print(f"MoE: {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared experts, top-{cfg.n_activated_experts}, "
          f"inner {cfg.moe_inter_dim}, {cfg.n_hash_layers} hash-routed layers; mHC {cfg.hc_mult} streams")  # fmt: skip
    letters = {"sliding": "S", "csa": "C", "hca": "H"}
    print("layer types (S sliding, C CSA ratio 4, H HCA; * hash-routed):")
    print("  " + " ".join(f"{i}:{letters[k]}{'' if k != 'hca' else cfg.compress_ratio(i)}{'*' if cfg.is_hash_layer(i) else ''}"
                          for i, k in enumerate(kinds)))  # fmt: skip
    for k in ("sliding", "csa", "hca"):
        print(f"  {k}: {kinds.count(k)}")
    if getattr(args, "memory", False):
        memory(cfg, args.max_memory)
    elif getattr(args, "max_memory", None):
        raise ValueError("--max-memory goes with --memory")
    return 0


# the machines a full-size V4 is run on (placements printed by `v4lens info MODEL --memory`)
REFERENCE_MACHINES = {
    "1×H200 (141 GB) + 512 GB host RAM": {0: "141GB", "cpu": "512GB"},
    "8×H200 (141 GB each)": {i: "141GB" for i in range(8)},
    "CPU box, 256 GB RAM + 4 TB NVMe": {"cpu": "256GB", "disk": "4TB"},
}


def parse_max_memory(text: str) -> dict:
    """'0=141GB,cpu=512GB,disk=4TB' -> {0: '141GB', 'cpu': '512GB', 'disk': '4TB'}."""
    out = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ValueError(f"--max-memory: {part!r} is not DEVICE=SIZE (e.g. '0=141GB,cpu=512GB,disk=4TB')")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


def memory(cfg, max_memory: str | None) -> None:
    """Print the weights' bytes per mode and accelerate's placement on the given (or reference) machines."""
    from .weights.placement import plan_placement, weight_bytes

    wb = weight_bytes(cfg)
    print("weights (routed experts + everything else):")
    for mode, what in (("fp32", "fp32 (fp32 islands kept)"), ("bf16", "bf16 (as v4lens.load builds it)"),
                       ("stored", "as stored (FP8 matrices, FP4 experts, scales)")):  # fmt: skip
        print(f"  {what}: {wb.total(mode) / 1e9:,.1f} GB = {wb.experts[mode] / 1e9:,.1f} + {wb.other[mode] / 1e9:,.1f}")
    print("(a plan from the config; v4lens.load(path, keep_quantized=True, device_map='auto', max_memory={...}) "
          "places a model this way)")
    machines = {"--max-memory": parse_max_memory(max_memory)} if max_memory else REFERENCE_MACHINES
    for label, budget in machines.items():
        for mode in ("stored", "bf16"):
            try:
                lines = plan_placement(cfg, budget, mode).summary()
            except ValueError as e:
                lines = [f"does not fit: {e}"]
            print(f"placement on {label}, weights {mode}:")
            print("\n".join("  " + line for line in lines))
