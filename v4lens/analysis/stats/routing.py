"""Expert usage and load balance; hash routes against the router's own choice."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .common import _frame, _get, _layer_index, _layers, _prefix, _row, token_mask


# ----------------------------------------------------------------------------- 1. expert usage
@torch.no_grad()
def expert_counts(model, cache, mask=None, positions=None, layers=None) -> torch.Tensor:
    """Tokens routed to each expert, per layer: int64 [L, E] (empty slots, -1, are ignored).

    Reads `mlp.hook_expert_ids` (the experts actually used: hash ids on hash layers). Each row
    sums to the number of selected tokens x k when no slot is empty.

        counts = stats.expert_counts(model, cache)  # [L, E]
    """
    rows = []
    for prefix in _layers(model, cache, layers):
        ids = _get(cache, f"{prefix}.mlp.hook_expert_ids", "expert_counts")  # [b,p,k]
        keep = (ids >= 0) & token_mask(mask, positions, *ids.shape[:2], ids.device)[..., None]
        rows.append(torch.bincount(ids[keep], minlength=model.cfg.n_routed_experts))
    return torch.stack(rows)


@torch.no_grad()
def expert_weight_mass(model, cache, mask=None, positions=None, layers=None) -> torch.Tensor:
    """Routing weight each expert received, summed over tokens, per layer: fp32 [L, E].

    Reads `mlp.hook_expert_ids` and `mlp.hook_expert_weights` (normalised weights x route_scale,
    so a row sums to tokens x route_scale). Counts say how often an expert runs; this says how
    much its output counts.

        mass = stats.expert_weight_mass(model, cache)  # [L, E]
    """
    rows = []
    for prefix in _layers(model, cache, layers):
        ids = _get(cache, f"{prefix}.mlp.hook_expert_ids", "expert_weight_mass")
        weights = _get(cache, f"{prefix}.mlp.hook_expert_weights", "expert_weight_mass")
        keep = (ids >= 0) & token_mask(mask, positions, *ids.shape[:2], ids.device)[..., None]
        mass = torch.zeros(model.cfg.n_routed_experts, device=ids.device)
        rows.append(mass.index_add(0, ids[keep], weights[keep].float()))
    return torch.stack(rows)


def balance_metrics(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load-balance measures of per-expert loads [..., E] -> dict of [...] tensors.

    cv: std/mean (population std; 0 = perfectly even); max_over_mean: the busiest expert's load
    over the mean (what bounds expert-parallel step time; 1 = even, E = one expert takes all);
    entropy: of the usage distribution, in nats; entropy_norm: entropy / log E (1 = uniform);
    frac_unused: share of experts with zero load.

        m = stats.balance_metrics(stats.expert_counts(model, cache))  # m["cv"]: [L]
    """
    load = load.float()
    E = load.shape[-1]
    mean = load.mean(-1)
    share = load / load.sum(-1, keepdim=True)
    entropy = -torch.xlogy(share, share).sum(-1)  # xlogy: 0 log 0 = 0 for unused experts
    return {
        "cv": load.std(-1, unbiased=False) / mean,
        "max_over_mean": load.amax(-1) / mean,
        "entropy": entropy,
        "entropy_norm": entropy / math.log(E) if E > 1 else torch.ones_like(entropy),
        "frac_unused": (load == 0).float().mean(-1),
    }


def load_balance(model, cache, mask=None, positions=None, layers=None):
    """One row per layer: routing ("hash"/"learned"), token-count balance and weight-mass balance.

    Columns: layer, block, layer_type, routing, assignments (non-empty slots counted), cv,
    max_over_mean, entropy, entropy_norm, frac_unused (see `balance_metrics`, on counts), and
    weight_cv, weight_max_over_mean, weight_entropy_norm (the same on `expert_weight_mass`).
    Reads `mlp.hook_expert_ids`, `mlp.hook_expert_weights`.

        df = stats.load_balance(model, cache)
    """
    prefixes = _layers(model, cache, layers)
    counts = expert_counts(model, cache, mask, positions, prefixes)
    mass = expert_weight_mass(model, cache, mask, positions, prefixes)
    by_count, by_mass = balance_metrics(counts), balance_metrics(mass)
    rows = []
    for i, prefix in enumerate(prefixes):
        row = _row(model, prefix)
        row["routing"] = "hash" if model.cfg.is_hash_layer(row["layer"]) else "learned"
        row["assignments"] = int(counts[i].sum())
        row.update({k: float(v[i]) for k, v in by_count.items()})
        row.update({f"weight_{k}": float(by_mass[k][i]) for k in ("cv", "max_over_mean", "entropy_norm")})
        rows.append(row)
    return _frame(rows)


def expert_usage(model, cache, mask=None, positions=None, layers=None):
    """Long form, one row per (layer, expert): count, frac (of the layer's assignments),
    weight_mass, weight_frac, plus layer, block, layer_type, routing. Reads as `load_balance`.

        usage = stats.expert_usage(model, cache)
        usage.pivot(index="layer", columns="expert", values="frac")  # a heat-map table
    """
    prefixes = _layers(model, cache, layers)
    counts = expert_counts(model, cache, mask, positions, prefixes)
    mass = expert_weight_mass(model, cache, mask, positions, prefixes)
    frac = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    weight_frac = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    rows = []
    for i, prefix in enumerate(prefixes):
        label = _row(model, prefix)
        label["routing"] = "hash" if model.cfg.is_hash_layer(label["layer"]) else "learned"
        for e in range(counts.shape[1]):
            rows.append(
                {**label, "expert": e, "count": int(counts[i, e]), "frac": float(frac[i, e]),
                 "weight_mass": float(mass[i, e]), "weight_frac": float(weight_frac[i, e])}
            )  # fmt: skip
    return _frame(rows)


# ----------------------------------------------------------------------------- 2. hash vs learned
class HashRouting(NamedTuple):
    """Per token of one hash layer ([b, p] unless noted)."""

    learned_ids: torch.Tensor  # [b,p,k] int64: top-k of the router scores (what a learned layer would pick)
    overlap: torch.Tensor  # int64: |hash experts ∩ learned top-k|
    jaccard: torch.Tensor  # |∩| / |∪| of the two expert sets
    hash_mass: torch.Tensor  # share of the token's total router score on the hash-chosen experts
    topk_mass: torch.Tensor  # share on the learned top-k (>= hash_mass: top-k maximises it)


def _expert_sets(ids: torch.Tensor, E: int) -> torch.Tensor:
    """ids [..., k] (-1 empty) -> bool membership [..., E]; duplicates count once."""
    member = torch.zeros(*ids.shape[:-1], E + 1, dtype=torch.bool, device=ids.device)
    member.scatter_(-1, torch.where(ids >= 0, ids, E), True)  # empties land in a spare column
    return member[..., :E]


@torch.no_grad()
def hash_routing(model, cache, layer: int | str) -> HashRouting:
    """Compare a hash layer's experts (`mlp.hook_expert_ids`, = tid2eid[token] unless edited) with
    the top-k the layer's own router would pick from `mlp.hook_router_scores`.

    Hash layers have no gate bias (it only steers selection on learned layers), so "would pick"
    is the top-k of the scores alone. Scores are sqrt(softplus(logits)) >= 0, so the masses are
    shares of a positive total.

        h = stats.hash_routing(model, cache, 0)  # h.jaccard: [b, p]
    """
    prefix = _prefix(model, layer)
    if not model.cfg.is_hash_layer(_layer_index(model, prefix)):
        raise ValueError(f"{prefix} is not a hash-routed layer (cfg.n_hash_layers = {model.cfg.n_hash_layers})")
    scores = _get(cache, f"{prefix}.mlp.hook_router_scores", "hash_routing").float()  # [b,p,E]
    used = _get(cache, f"{prefix}.mlp.hook_expert_ids", "hash_routing")  # [b,p,k]
    E, k = scores.shape[-1], model.cfg.n_activated_experts
    learned = scores.topk(k, dim=-1).indices
    a, b = _expert_sets(used, E), _expert_sets(learned, E)
    overlap = (a & b).sum(-1)
    total = scores.sum(-1)
    return HashRouting(
        learned_ids=learned,
        overlap=overlap,
        jaccard=overlap / (a | b).sum(-1).clamp(min=1),
        hash_mass=(scores * a).sum(-1) / total,
        topk_mass=(scores * b).sum(-1) / total,
    )


def hash_vs_learned(model, cache, mask=None, positions=None):
    """One row per hash layer, token means of `hash_routing`.

    Columns: layer, block, layer_type, tokens, overlap (mean experts in common), jaccard,
    agreement (share of used hash slots whose expert is in the router's top-k), exact_match
    (share of tokens whose two sets are equal), chance_agreement (k / E, what random hashing
    against any router gives in expectation), hash_mass, topk_mass, mass_ratio
    (hash_mass / topk_mass: how much router score the hash routing leaves on the table).

        df = stats.hash_vs_learned(model, cache)
    """
    cfg = model.cfg
    rows = []
    for prefix in _layers(model, cache, range(cfg.n_hash_layers)):
        h = hash_routing(model, cache, prefix)
        keep = token_mask(mask, positions, *h.overlap.shape, h.overlap.device)
        used = _get(cache, f"{prefix}.mlp.hook_expert_ids", "hash_vs_learned")
        n_used = _expert_sets(used, cfg.n_routed_experts).sum(-1)
        hash_mass, topk_mass = float(h.hash_mass[keep].mean()), float(h.topk_mass[keep].mean())
        rows.append(
            {**_row(model, prefix), "tokens": int(keep.sum()), "overlap": float(h.overlap[keep].float().mean()),
             "jaccard": float(h.jaccard[keep].mean()),
             "agreement": float(h.overlap[keep].sum() / n_used[keep].sum().clamp(min=1)),
             "exact_match": float((h.jaccard[keep] == 1).float().mean()),
             "chance_agreement": cfg.n_activated_experts / cfg.n_routed_experts,
             "hash_mass": hash_mass, "topk_mass": topk_mass, "mass_ratio": hash_mass / topk_mass}
        )  # fmt: skip
    return _frame(rows)
