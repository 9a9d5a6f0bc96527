"""What each statistic reads (`HOOKS`, `names_filter`), and the layer / token selection they share."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..layout import require_hooks

# ----------------------------------------------------------------------------- hooks needed
# Block-relative hook names each statistic reads (prefix `blocks.{l}.` or `mtp.{i}.`).
_ROUTING = ("mlp.hook_expert_ids", "mlp.hook_expert_weights")
_HASH = ("mlp.hook_router_scores", "mlp.hook_expert_ids")
_COMB = ("attn_hc.hook_comb", "mlp_hc.hook_comb")
_MIXES = ("attn_hc.hook_mixes", "mlp_hc.hook_mixes")
_RECALL = ("attn.hook_q", "attn.compressor.hook_kv", "attn.indexer.hook_topk")
_SINK = ("attn.hook_sink",)
HOOKS: dict[str, tuple[str, ...]] = {
    "expert_counts": ("mlp.hook_expert_ids",),
    "expert_weight_mass": _ROUTING,
    "expert_usage": _ROUTING,
    "load_balance": _ROUTING,
    "hash_routing": _HASH,
    "hash_vs_learned": _HASH,
    "comb_stats": _COMB,
    "sinkhorn_errors": _MIXES,
    "sinkhorn_summary": _COMB + _MIXES,
    "indexer_recall": _RECALL,
    "indexer_recall_summary": _RECALL,
    "sink_mass": _SINK,
    "sink_mass_frame": _SINK,
    "sink_mass_by_segment": _SINK,
    "indexer_picks_by_segment": ("attn.indexer.hook_topk",),
    "expert_load_by_segment": ("mlp.hook_expert_ids",),
}


def names_filter(*stats: str | Callable) -> Callable[[str], bool]:
    """A `names_filter` for `run_with_cache` that keeps exactly the hooks the given statistics read.

    stats: function names (keys of `HOOKS`) or the functions themselves; none = all of them.
    MTP blocks' hooks match too (they are cached only when the run has mtp=True).

        _, cache = model.run_with_cache(tokens, names_filter=stats.names_filter(stats.indexer_recall))
    """
    keys = [s if isinstance(s, str) else s.__name__ for s in stats] or list(HOOKS)
    unknown = [k for k in keys if k not in HOOKS]
    if unknown:
        raise KeyError(f"no statistic named {unknown}; known: {sorted(HOOKS)}")
    suffixes = sorted({h for k in keys for h in HOOKS[k]})
    pattern = re.compile(r"^(blocks|mtp)\.\d+\.(" + "|".join(re.escape(s) for s in suffixes) + r")$")
    return lambda name: bool(pattern.match(name))


def _get(cache, name: str, stat: str) -> torch.Tensor:
    """cache[name], or a KeyError telling the caller which names_filter caches it."""
    why = (
        f"stats.{stat} needs it; cache it with model.run_with_cache(tokens, "
        f"names_filter=v4lens.stats.names_filter({stat!r})) (it reads {', '.join(HOOKS[stat])} of each block)"
    )
    return require_hooks(cache, [name], why)[name]


# ----------------------------------------------------------------------------- layers and tokens
def block_prefixes(model, cache=None) -> list[str]:
    """`blocks.0 .. blocks.{L-1}`, then `mtp.{i}` for every MTP block with hooks in `cache`.

    prefixes = stats.block_prefixes(model, cache)  # ['blocks.0', ..., 'mtp.0']
    """
    out = [f"blocks.{l}" for l in range(model.cfg.n_layers)]
    keys = getattr(cache, "cache_dict", cache) or {}
    for i in range(model.cfg.n_mtp_layers):
        if any(k.startswith(f"mtp.{i}.") for k in keys):
            out.append(f"mtp.{i}")
    return out


def _prefix(model, layer: int | str) -> str:
    if isinstance(layer, str):
        return layer.rstrip(".")
    n = model.cfg.n_layers
    return f"blocks.{layer}" if layer < n else f"mtp.{layer - n}"


def _layer_index(model, prefix: str) -> int:
    kind, i = prefix.split(".")
    return int(i) + (model.cfg.n_layers if kind == "mtp" else 0)


def _layers(model, cache, layers, keep: Callable[[int], bool] = lambda l: True) -> list[str]:
    prefixes = block_prefixes(model, cache) if layers is None else [_prefix(model, l) for l in layers]
    return [p for p in prefixes if keep(_layer_index(model, p))]


def _row(model, prefix: str) -> dict:
    """The label columns every per-layer DataFrame starts with."""
    l = _layer_index(model, prefix)
    return {"layer": l, "block": prefix, "layer_type": model.cfg.layer_type(l)}


def token_mask(mask, positions, b: int, p: int, device=None) -> torch.Tensor:
    """mask (bool [b,p] or [p], or None) AND positions (ints, or None) -> bool [b, p]."""
    keep = torch.ones(b, p, dtype=torch.bool, device=device)
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        keep = keep & (mask[None] if mask.ndim == 1 else mask)
    if positions is not None:
        at = torch.zeros(p, dtype=torch.bool, device=device)
        at[torch.as_tensor(positions, dtype=torch.long, device=device)] = True
        keep = keep & at[None]
    return keep


def _frame(rows: list[dict]):
    import pandas as pd  # lazily: only the DataFrame forms need pandas

    return pd.DataFrame(rows)
