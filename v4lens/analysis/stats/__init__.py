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

Modules: `common` (what each statistic reads, layer and token selection), `routing`, `mhc`,
`attention` (indexer recall and sink mass), `segments` (any of them per part of a conversation
labelled by `v4lens.chat.segments`: `per_segment`, and sink mass, indexer picks and expert load per
segment).
"""

from __future__ import annotations

from .attention import indexer_recall, indexer_recall_summary, sink_mass, sink_mass_frame
from .common import HOOKS, block_prefixes, names_filter, token_mask
from .mhc import (
    CombStats,
    SinkhornTrace,
    comb_entropy,
    comb_stats,
    distance_to_identity,
    hc_prefixes,
    nearest_permutation,
    sinkhorn_errors,
    sinkhorn_summary,
)  # fmt: skip
from .routing import (
    HashRouting,
    balance_metrics,
    expert_counts,
    expert_usage,
    expert_weight_mass,
    hash_routing,
    hash_vs_learned,
    load_balance,
)  # fmt: skip
from .segments import (
    expert_load_by_segment,
    indexer_picks_by_segment,
    per_segment,
    sink_mass_by_segment,
    token_groups,
)  # fmt: skip

__all__ = [
    "CombStats",
    "HOOKS",
    "HashRouting",
    "SinkhornTrace",
    "balance_metrics",
    "block_prefixes",
    "comb_entropy",
    "comb_stats",
    "distance_to_identity",
    "expert_counts",
    "expert_load_by_segment",
    "expert_usage",
    "expert_weight_mass",
    "hash_routing",
    "hash_vs_learned",
    "hc_prefixes",
    "indexer_picks_by_segment",
    "indexer_recall",
    "indexer_recall_summary",
    "load_balance",
    "names_filter",
    "nearest_permutation",
    "per_segment",
    "sink_mass",
    "sink_mass_by_segment",
    "sink_mass_frame",
    "sinkhorn_errors",
    "sinkhorn_summary",
    "token_groups",
    "token_mask",
]
