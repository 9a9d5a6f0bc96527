"""Activation patching and attribution patching (AtP) for DeepSeek-V4's own mechanisms.

Every sweep takes `(model, corrupted_tokens, clean_cache, patching_metric, ...)` like
`transformer_lens.patching`'s functions: it runs the corrupted tokens once per swept index with
one clean piece patched in, and returns the metric of each patched run in a tensor indexed by
the swept axes, layer first (the same values and layout as TransformerLens where the family
exists there, e.g. `get_act_patch_attn_out` -> [layer, pos]). Cells of a layer that lacks the
mechanism (the indexer on a sliding or HCA layer) are NaN. `reduce="mean"` / `"none"` and
`baseline=True` behave as in TransformerLens (`"none"` / `baseline` return its `PatchingResult`).
Clean and corrupted tokens must have the same shape; every prompt pair in the batch is patched
at the same index in the same forward. Only the main blocks are swept (not the MTP blocks).

The `atp_*` functions estimate the same sweeps with one forward and one backward pass
(attribution patching, node level): for each cell, Σ (target_act - corrupted_act) · ∂metric/∂act
over the cell's elements (and the batch), the gradient taken on the corrupted run. They return
*effects* (estimated patched metric minus the corrupted metric), with the same axes as the real
sweep of the family, so compare them with `sweep - patching_metric(model(corrupted_tokens))`.
The estimate is exact to first order: for a clean run close to the corrupted one, the error
shrinks quadratically with their distance. Integer decisions (expert ids, indexer picks) have no
gradient and no AtP, and AtP cannot see a patch flip one (a routing or indexer top-k choice
near a tie): hold them at the corrupted run's values (hooks returning the cached ids / picks)
when comparing AtP with real patching. No family here is linear in the metric (every path to
the logits crosses the final RMSNorm and mHC head), so AtP equals real patching only to first
order.

Hook helpers (`hash_route_hooks` / `override_hash_routes`, `indexer_pick_hooks` /
`force_indexer_picks`, `sink_hooks`, `comb_hooks`) return `(name, fn)` lists for
`model.run_with_hooks(fwd_hooks=...)` / `model.hooks(...)` or are context managers; they never
modify a parameter or buffer.

Modules: `sweeps` (real patching), `attribution` (AtP), `edits` (hook helpers), over the shared
`engine` (families of hook points, one patched forward per index).
"""

from __future__ import annotations

from .attribution import (
    atp_attn_head_out_all_pos,
    atp_attn_head_out_by_pos,
    atp_attn_out,
    atp_expert_out,
    atp_expert_weights,
    atp_hc,
    atp_hc_comb_fixed,
    atp_mlp_out,
    atp_sink,
    atp_streams,
)  # fmt: skip
from .edits import (
    comb_hooks,
    force_indexer_picks,
    hash_route_hooks,
    indexer_pick_hooks,
    override_hash_routes,
    sink_hooks,
)  # fmt: skip
from .engine import Hooks, MetricFn, Target
from .sweeps import (
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_out,
    get_act_patch_expert_out,
    get_act_patch_hc,
    get_act_patch_hc_comb_fixed,
    get_act_patch_indexer_topk,
    get_act_patch_mlp_out,
    get_act_patch_routing,
    get_act_patch_sink,
    get_act_patch_streams,
)  # fmt: skip

__all__ = [
    "Hooks",
    "MetricFn",
    "Target",
    "atp_attn_head_out_all_pos",
    "atp_attn_head_out_by_pos",
    "atp_attn_out",
    "atp_expert_out",
    "atp_expert_weights",
    "atp_hc",
    "atp_hc_comb_fixed",
    "atp_mlp_out",
    "atp_sink",
    "atp_streams",
    "comb_hooks",
    "force_indexer_picks",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_expert_out",
    "get_act_patch_hc",
    "get_act_patch_hc_comb_fixed",
    "get_act_patch_indexer_topk",
    "get_act_patch_mlp_out",
    "get_act_patch_routing",
    "get_act_patch_sink",
    "get_act_patch_streams",
    "hash_route_hooks",
    "indexer_pick_hooks",
    "override_hash_routes",
    "sink_hooks",
]  # fmt: skip
