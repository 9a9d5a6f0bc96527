"""Building models: the seeded random-init scaffold and local safetensors checkpoints.

Nothing here downloads anything. Only safetensors files are read (never pickles).
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .config import PRESETS, V4Config, preset, resolve_dtype
from .model import HookedV4


# ---------------------------------------------------------------------- public entry point
def load(name_or_path: str | Path, device=None, dtype=None, seed: int = 0, **overrides) -> HookedV4:
    """A model in eval mode.

    name_or_path: a preset (`"mini-3b"`, `"tiny"`: random-init scaffold, the same weights for
    the same seed on every machine) or a local directory of safetensors (transformers'
    `DeepseekV4ForCausalLM.save_pretrained` layout, or DeepSeek's official names).
    device / dtype: where and in what (fp32 default, or bf16 with fp32 islands) to build it.
    overrides: V4Config fields for a preset (e.g. `use_attn_result=True`).
    """
    path = Path(name_or_path)
    if str(name_or_path) in PRESETS:
        cfg = preset(str(name_or_path), dtype=resolve_dtype(dtype), device=device, **overrides)
        model = build_empty(cfg, device)
        init_weights(model, seed)
    elif path.is_dir():
        model = load_checkpoint(path, device=device, dtype=dtype, **overrides)
    else:
        raise ValueError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a local checkpoint directory"
        )
    return model.eval()


def build_empty(cfg: V4Config, device=None) -> HookedV4:
    """Allocate the model once on `device` (no initialisation, no second copy)."""
    with torch.device("meta"):
        model = HookedV4(cfg)
    model.to_empty(device=device or "cpu")
    cfg.device = model.device
    return model


# ---------------------------------------------------------------------- random init
_ONES = re.compile(r"(\.w|\.scale)$")
_ZEROS = re.compile(r"(\.base|attn_sink|\.ape|gate\.bias)$")


def init_weights(model: HookedV4, seed: int = 0) -> None:
    """Initialise like the reference / HF: N(0, initializer_range) for matrices, ones for norm weights
    and mHC scales, zeros for biases, sinks and position biases, and a random tid2eid whose rows
    hold distinct experts.

    Each tensor draws from its own CPU generator seeded by (seed, name), so a weight does not
    depend on the device, on the dtype or on which other modules exist.
    """
    std = model.cfg.initializer_range

    @torch.no_grad()  # grad mode is per thread
    def fill(name: str, p: torch.Tensor) -> None:
        if _ONES.search(name):
            p.fill_(1.0)
        elif _ZEROS.search(name):
            p.zero_()
        else:
            gen = _generator(seed, name)
            # fp32 draws (so bf16 weights are the rounded fp32 ones), one expert slice at a time
            for dst in (p.unbind(0) if p.ndim == 3 else [p]):
                dst.copy_(torch.empty(dst.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

    with torch.no_grad():
        params = sorted(model.named_parameters(), key=lambda kv: -kv[1].numel())
        # torch kernels release the GIL: filling tensors from two threads halves the build time
        # without changing any value (each tensor has its own generator).
        with ThreadPoolExecutor(max_workers=max(1, min(4, torch.get_num_threads()))) as pool:
            list(pool.map(lambda kv: fill(*kv), params))
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                gen = _generator(seed, name)
                V, k = buf.shape
                rows = torch.rand(V, model.cfg.n_routed_experts, generator=gen).argsort(dim=-1)[:, :k]
                buf.copy_(rows)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 0x9E3779B1 + zlib.crc32(name.encode()))


# ---------------------------------------------------------------------- checkpoints
def detect_format(path: Path) -> str:
    """'hf' (transformers config.json) or 'official' (DeepSeek ModelArgs config.json)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a transformers or DeepSeek checkpoint directory")
    d = json.loads(cfg_file.read_text())
    if d.get("model_type") == "deepseek_v4" or "hidden_size" in d:
        return "hf"
    if "dim" in d and "n_layers" in d:
        return "official"
    raise ValueError(
        f"{cfg_file}: neither a transformers DeepseekV4 config (model_type 'deepseek_v4', hidden_size, ...) "
        "nor DeepSeek's ModelArgs config (dim, n_layers, ...)"
    )


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (from the index if there is one). Pickles are refused."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); v4lens loads safetensors only, because "
                "unpickling can run arbitrary code. Convert them with safetensors.torch.save_file first."
            )
        raise FileNotFoundError(f"{path} has no .safetensors files")
    return files


def load_checkpoint(path: Path, device=None, dtype=None, **overrides) -> HookedV4:
    """Load a transformers-layout or official-layout directory, streaming tensor by tensor."""
    from safetensors import safe_open

    fmt = detect_format(path)
    raw = json.loads((path / "config.json").read_text())
    files = safetensors_files(path)
    names: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    names[key] = f
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {f}: {e}") from e
    if any(k.endswith(".scale") for k in names) or any(k.endswith("_scale_inv") for k in names):
        raise NotImplementedError(f"{path}: quantised FP8/FP4 checkpoints are not supported yet")

    build = V4Config.from_hf if fmt == "hf" else V4Config.from_official
    cfg = build(raw, dtype=resolve_dtype(dtype), device=device, name=path.name, **overrides)
    if cfg.n_mtp_layers and not any(canonical_name(k).startswith("mtp.") for k in names):
        warnings.warn(f"{path} has no mtp.* tensors (transformers drops them): building the model without MTP")
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    model = build_empty(cfg, device)
    load_tensors(model, names)
    return model


def load_tensors(model: HookedV4, names: dict[str, Path]) -> None:
    """Copy every checkpoint tensor into its v4lens parameter; error on missing, extra or mis-shaped ones."""
    from safetensors import safe_open

    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    filled: set[str] = set()
    expert_rows: dict[str, set[int]] = {}
    unexpected = []
    handles = {}
    try:
        for key, file in names.items():
            target_name, expert = canonical_name(key, with_expert=True)
            if target_name is None:
                continue  # tensors v4lens deliberately ignores (e.g. mtp.*.embed)
            if target_name not in targets:
                unexpected.append(key)
                continue
            if file not in handles:
                handles[file] = safe_open(file, "pt")
            tensor = handles[file].get_tensor(key)
            dst = targets[target_name]
            if expert is not None:
                if dst.ndim != 3 or expert >= dst.shape[0]:
                    raise ValueError(f"checkpoint tensor {key}: expert {expert} does not exist in {target_name}")
                dst = dst[expert]
                expert_rows.setdefault(target_name, set()).add(expert)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(
                    f"checkpoint tensor {key} has shape {tuple(tensor.shape)} but v4lens {target_name}"
                    f"{'' if expert is None else f'[{expert}]'} expects {tuple(dst.shape)}"
                )
            with torch.no_grad():
                dst.copy_(tensor.to(dst.dtype))
            if expert is None:
                filled.add(target_name)
    finally:
        handles.clear()
    for name, rows in expert_rows.items():
        if len(rows) == targets[name].shape[0]:
            filled.add(name)
    missing = sorted(set(targets) - filled)
    if unexpected or missing:
        parts = []
        if missing:
            partial = {n: sorted(set(range(targets[n].shape[0])) - expert_rows[n]) for n in missing if n in expert_rows}
            parts.append(f"missing tensors for {missing[:20]}{' ...' if len(missing) > 20 else ''}")
            if partial:
                parts.append(f"missing experts {partial}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))


# ---------------------------------------------------------------------- names
# (pattern, replacement) applied in order to a name with any leading "model." removed.
# Left: transformers' module names (HF 5.23 internals) and the names its save_pretrained writes;
# right: DeepSeek's official names (SPEC §B2), which the second table maps to v4lens.
_HF_TO_OFFICIAL = [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),  # what HF 5.23's save_pretrained writes
]
_OFFICIAL_TO_V4LENS = [
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"^norm\.weight$", "ln_final.w"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.\1"),
    (r"^(mtp\.\d+)\.norm\.weight$", r"\1.ln_final.w"),
    (r"^(mtp\.\d+)\.hc_head_(fn|base|scale)$", r"\1.hc_head.\2"),
    (r"\.attn_norm\.weight$", ".ln1.w"),
    (r"\.ffn_norm\.weight$", ".ln2.w"),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)$", r".mlp_hc.\1"),
    (r"\.ffn\.", ".mlp."),
    (r"\.(q_norm|kv_norm|norm|enorm|hnorm)\.weight$", r".\1.w"),
    (r"\.(wq_a|wq_b|wkv|wgate|wo_a|wo_b|weights_proj|e_proj|h_proj|w1|w2|w3)\.weight$", r".\1"),
]
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(w[123])$")
_IGNORED = re.compile(r"^mtp\.\d+\.(emb|embed|head)\.")


def canonical_name(name: str, with_expert: bool = False):
    """Any known checkpoint name -> the v4lens parameter name (and the expert index for per-expert tensors).

    Returns None (or (None, None)) for tensors v4lens ignores on purpose.
    """
    n = re.sub(r"^model\.", "", name)
    for pattern, repl in _HF_TO_OFFICIAL:
        n = re.sub(pattern, repl, n)
    if _IGNORED.search(n):
        return (None, None) if with_expert else None
    for pattern, repl in _OFFICIAL_TO_V4LENS:
        n = re.sub(pattern, repl, n)
    expert = None
    match = _EXPERT.search(n)
    if match:
        expert = int(match.group(1))
        n = n[: match.start()] + f".mlp.experts.{match.group(2)}"
    return (n, expert) if with_expert else n
