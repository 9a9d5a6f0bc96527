"""Routing, stream-mixing and attention statistics read from a cache.

Every function takes the model and a cache from `model.run_with_cache(...)` and returns
torch tensors (per token / per layer) or a pandas DataFrame (one row per layer, or per
layer x expert / head). Each reads only the hooks listed in `HOOKS` under its own name, so
cache just those:

    _, cache = model.run_with_cache(tokens, names_filter=stats.names_filter("load_balance", "sink_mass"))

A missing hook raises a KeyError that names it and the `names_filter` to use.

Layers: rows follow `block_prefixes(model, cache)`: `blocks.0 .. blocks.{L-1}`, then `mtp.i`
for each MTP block that ran (`run_with_cache(tokens, mtp=True, ...)`), whose layer index is
n_layers + i as in `V4Config`. Functions taking `layers` accept ints (that index) or prefixes.
Token selection: `mask` (bool [b, p] or [p]) and/or `positions` (ints) restrict which query
tokens are counted; both apply when both are given. The cache must keep its batch axis.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import einsum

from .cache import require_hooks
from .indexer import visible_entries

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


# ----------------------------------------------------------------------------- 3. Sinkhorn / mHC
def hc_prefixes(model, cache=None, layers=None) -> list[str]:
    """Every mHC in forward order: `blocks.0.attn_hc`, `blocks.0.mlp_hc`, ..., then MTP blocks'."""
    return [f"{p}.{hc}" for p in _layers(model, cache, layers) for hc in ("attn_hc", "mlp_hc")]


def comb_entropy(comb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy (nats) of each row (dim=-1) or column (dim=-2) of comb [..., n, n] -> [..., n].

    Each line is renormalised first (Sinkhorn leaves rows summing to 1 only approximately).
    0 = the stream goes to / comes from one place; log n = spread evenly.
    """
    share = comb / comb.sum(dim, keepdim=True)
    return -torch.xlogy(share, share).sum(dim)


def distance_to_identity(comb: torch.Tensor) -> torch.Tensor:
    """Frobenius ||comb - I|| per matrix: [..., n, n] -> [...]. 0 = each stream kept as it was."""
    eye = torch.eye(comb.shape[-1], dtype=comb.dtype, device=comb.device)
    return torch.linalg.matrix_norm(comb - eye)


def nearest_permutation(comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation matrix closest to each comb in Frobenius norm, and the distance.

    comb [..., n, n] -> (perm [..., n] int64 with P[j, perm[j]] = 1, distance [...]).
    ||C - P||² = ||C||² + n - 2 Σ_j C[j, σ(j)], so the nearest P maximises Σ_j C[j, σ(j)]: a
    linear assignment. For n <= 6 (V4 uses n = 4: 24 permutations) every permutation is scored
    at once, vectorised over tokens; larger n use scipy's `linear_sum_assignment` per matrix
    (scipy is optional and needed only then).
    """
    n = comb.shape[-1]
    if n <= 6:
        perms = torch.tensor(list(itertools.permutations(range(n))), device=comb.device)  # [n!, n]
        totals = comb[..., torch.arange(n, device=comb.device), perms].sum(-1)  # [..., n!]
        perm = perms[totals.argmax(-1)]
    else:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as e:
            raise ImportError(f"nearest_permutation for n = {n} > 6 needs scipy") from e
        flat = comb.detach().reshape(-1, n, n).cpu().double().numpy()
        perm = torch.tensor([linear_sum_assignment(-m)[1] for m in flat], device=comb.device)
        perm = perm.reshape(*comb.shape[:-1])
    P = torch.nn.functional.one_hot(perm, n).to(comb.dtype)
    return perm, torch.linalg.matrix_norm(comb - P)


class CombStats(NamedTuple):
    """Per token of one mHC ([b, p] unless noted)."""

    row_entropy: torch.Tensor  # [b,p,n]: how input stream j spreads over the outputs
    col_entropy: torch.Tensor  # [b,p,n]: how many inputs output stream k draws from
    dist_identity: torch.Tensor  # Frobenius distance to I
    dist_permutation: torch.Tensor  # Frobenius distance to the nearest permutation matrix
    permutation: torch.Tensor  # [b,p,n] int64: that permutation (input j -> output perm[j])


@torch.no_grad()
def comb_stats(model, cache, hc: str) -> CombStats:
    """Entropy and distances of the cached Sinkhorn mixing `{hc}.hook_comb` [b,p,n,n]
    (comb[j, k] = weight of input stream j in output stream k). hc: e.g. "blocks.1.attn_hc".

    Reads the cached value, so an edited comb is what is measured.

        s = stats.comb_stats(model, cache, "blocks.1.attn_hc")  # s.dist_identity: [b, p]
    """
    comb = _get(cache, f"{hc}.hook_comb", "comb_stats").float()
    perm, dist_perm = nearest_permutation(comb)
    return CombStats(comb_entropy(comb, -1), comb_entropy(comb, -2), distance_to_identity(comb), dist_perm, perm)


class SinkhornTrace(NamedTuple):
    """Convergence of one mHC's Sinkhorn projection, recomputed from its raw mixes."""

    row_err: torch.Tensor  # [iters, b, p]: max_j |Σ_k comb[j,k] - 1| after each iteration
    col_err: torch.Tensor  # [iters, b, p]: max_k |Σ_j comb[j,k] - 1| after each iteration
    comb: torch.Tensor  # [b,p,n,n]: the final matrix (equals the unedited hook_comb)


@torch.no_grad()
def sinkhorn_errors(model, cache, hc: str) -> SinkhornTrace:
    """Re-run the Sinkhorn projection of `{hc}` from `{hc}.hook_mixes`, recording the row- and
    column-sum errors after every iteration.

    Exactly `HyperConnection.mixings`: logits = mixes[2n:] * scale[2] + base[2n:] (as n x n),
    comb = softmax(logits, rows) + eps, then `hc_sinkhorn_iters` iterations; iteration 1 is the
    first column normalisation, iterations 2.. each a row then a column normalisation (each
    dividing by sum + eps). Errors are recorded after the column step, so col_err is ~eps
    throughout and row_err shows the convergence. If `hook_comb` was edited, `comb` here is
    still what Sinkhorn produced, not the edit.

        t = stats.sinkhorn_errors(model, cache, "blocks.0.mlp_hc")  # t.row_err: [iters, b, p]
    """
    module = model.get_submodule(hc)
    n, eps = module.n, module.hc_eps
    mixes = _get(cache, f"{hc}.hook_mixes", "sinkhorn_errors")
    m_comb, b_comb = mixes[..., 2 * n :], module.base[2 * n :]
    logits = (m_comb * module.scale[2] + b_comb).unflatten(-1, (n, n))

    def errors(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (c.sum(-1) - 1).abs().amax(-1), (c.sum(-2) - 1).abs().amax(-1)

    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    trace = [errors(comb)]
    for _ in range(module.iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        trace.append(errors(comb))
    row_err, col_err = (torch.stack(e) for e in zip(*trace))
    return SinkhornTrace(row_err, col_err, comb)


def sinkhorn_summary(model, cache, mask=None, positions=None, layers=None, errors: bool = True):
    """One row per mHC (`attn_hc`, `mlp_hc` of each block, MTP blocks included when cached).

    Columns: layer, block, layer_type, hc, then token means of row_entropy and col_entropy
    (nats, averaged over the n lines; max log n; the two means coincide for an exactly doubly
    stochastic comb, since both equal -Σ c log c / n, so only the per-line values in `comb_stats`
    tell rows from columns), dist_identity, dist_permutation, frac_identity
    (share of tokens whose nearest permutation is the identity); with errors=True (needs
    `hook_mixes` too) also row_err_first and row_err_final / col_err_final (max over tokens,
    after the first and the last Sinkhorn iteration).

        df = stats.sinkhorn_summary(model, cache)
    """
    rows = []
    for hc in hc_prefixes(model, cache, layers):
        s = comb_stats(model, cache, hc)
        keep = token_mask(mask, positions, *s.dist_identity.shape, s.dist_identity.device)
        n = s.permutation.shape[-1]
        is_identity = (s.permutation == torch.arange(n, device=keep.device)).all(-1)
        prefix, name = hc.rsplit(".", 1)
        row = {
            **_row(model, prefix), "hc": name,
            "row_entropy": float(s.row_entropy[keep].mean()), "col_entropy": float(s.col_entropy[keep].mean()),
            "dist_identity": float(s.dist_identity[keep].mean()),
            "dist_permutation": float(s.dist_permutation[keep].mean()),
            "frac_identity": float(is_identity[keep].float().mean()),
        }  # fmt: skip
        if errors:
            t = sinkhorn_errors(model, cache, hc)
            row["row_err_first"] = float(t.row_err[0][keep].max())
            row["row_err_final"] = float(t.row_err[-1][keep].max())
            row["col_err_final"] = float(t.col_err[-1][keep].max())
        rows.append(row)
    return _frame(rows)


# ----------------------------------------------------------------------------- 4. indexer recall
@torch.no_grad()
def indexer_recall(model, cache, layer: int | str, per_head: bool = False, chunk: int = 256) -> torch.Tensor:
    """How much dense compressed attention the Lightning Indexer's picks keep, per query.

    Definition: per head, take a softmax over ALL compressed entries visible to query t
    (w < (t+1)//4, see `visible_entries`) with logits q·kv / sqrt(c), from `attn.hook_q`
    [b,p,h,c] and `attn.compressor.hook_kv` [b,T,c]; recall = the probability it puts on
    the entries in `attn.indexer.hook_topk` (-1 and not-visible picks ignored, duplicates
    once). The sliding window and the sink are left out on purpose: this measures the
    indexer's choice among compressed entries only. 1 when the picks cover every visible
    entry; NaN for queries with no visible entry (nothing to choose).
    Returns [b, p] (mean over heads) or [b, h, p] with per_head=True. Memory O(b·h·chunk·T).

        r = stats.indexer_recall(model, cache, 1)  # [b, p]
    """
    prefix = _prefix(model, layer)
    if model.cfg.layer_type(_layer_index(model, prefix)) != "csa":
        raise ValueError(f"{prefix} is not a CSA layer: it has no indexer")
    q = _get(cache, f"{prefix}.attn.hook_q", "indexer_recall").float()  # [b,p,h,c]
    kv = _get(cache, f"{prefix}.attn.compressor.hook_kv", "indexer_recall").float()  # [b,T,c]
    picks = _get(cache, f"{prefix}.attn.indexer.hook_topk", "indexer_recall")  # [b,p,k]
    b, S, H, c = q.shape
    T = kv.shape[1]
    w = torch.arange(T, device=q.device)
    visible = w[None, :] < visible_entries(torch.arange(S, device=q.device), 4)[:, None]  # [p,T]
    picked = torch.zeros(b, S, T + 1, dtype=torch.bool, device=q.device)
    picked.scatter_(-1, torch.where((picks >= 0) & (picks < T), picks, T), True)  # -1 -> spare column
    picked = picked[..., :T] & visible  # what the attention really receives

    out = []
    for s0 in range(0, S, chunk):  # dense scores are [b,h,p,T]: build them a query chunk at a time
        s1 = min(S, s0 + chunk)
        logits = einsum(q[:, s0:s1], kv, "b p h c, b t c -> b h p t") * c**-0.5
        probs = logits.masked_fill(~visible[s0:s1], float("-inf")).softmax(-1)  # all -inf -> NaN row
        out.append((probs * picked[:, None, s0:s1]).sum(-1))  # [b,h,s]
    recall = torch.cat(out, dim=-1) if out else q.new_zeros(b, H, 0)
    return recall if per_head else recall.mean(1)


def indexer_recall_summary(model, cache, mask=None, positions=None, layers=None):
    """One row per CSA layer: token statistics of `indexer_recall` (head means).

    Columns: layer, block, layer_type, queries (selected queries with >= 1 visible entry),
    recall (mean), recall_min, selective_queries (those with more visible entries than
    index_topk, where the indexer actually drops some), recall_selective (mean over those;
    NaN if none).

        df = stats.indexer_recall_summary(model, cache)
    """
    rows = []
    for prefix in _layers(model, cache, layers, lambda l: model.cfg.layer_type(l) == "csa"):
        r = indexer_recall(model, cache, prefix)
        b, S = r.shape
        keep = token_mask(mask, positions, b, S, r.device) & ~r.isnan()
        selective = keep & (visible_entries(torch.arange(S, device=r.device), 4) > model.cfg.index_topk)[None]
        rows.append(
            {**_row(model, prefix), "queries": int(keep.sum()), "recall": float(r[keep].mean()),
             "recall_min": float(r[keep].min()) if keep.any() else float("nan"),
             "selective_queries": int(selective.sum()), "recall_selective": float(r[selective].mean())}
        )  # fmt: skip
    return _frame(rows)


# ----------------------------------------------------------------------------- 5. sink mass
@torch.no_grad()
def sink_mass(model, cache, per_position: bool = False, mask=None, positions=None, layers=None) -> torch.Tensor:
    """Mean attention-sink probability per layer and head, from `attn.hook_sink` [b,h,p].

    Returns [L, H] (mean over the selected tokens) or, with per_position=True, [L, H, p]
    (mean over the batch at each position; NaN where no token is selected).

        sink = stats.sink_mass(model, cache)  # [L, H]
    """
    out = []
    for prefix in _layers(model, cache, layers):
        sink = _get(cache, f"{prefix}.attn.hook_sink", "sink_mass").float()  # [b,h,p]
        keep = token_mask(mask, positions, sink.shape[0], sink.shape[2], sink.device)[:, None].float()  # [b,1,p]
        if per_position:
            out.append((sink * keep).sum(0) / keep.sum(0))  # [h,p]
        else:
            out.append(einsum(sink, keep, "b h p, b o p -> h") / keep.sum())
    return torch.stack(out)


def sink_mass_frame(model, cache, mask=None, positions=None, layers=None):
    """`sink_mass` in long form: one row per (layer, head) with layer, block, layer_type, head, sink_mass.

    df = stats.sink_mass_frame(model, cache)
    df.pivot(index="layer", columns="head", values="sink_mass")
    """
    prefixes = _layers(model, cache, layers)
    mass = sink_mass(model, cache, mask=mask, positions=positions, layers=prefixes)
    rows = [
        {**_row(model, prefix), "head": h, "sink_mass": float(mass[i, h])}
        for i, prefix in enumerate(prefixes)
        for h in range(mass.shape[1])
    ]
    return _frame(rows)
