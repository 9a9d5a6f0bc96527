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
`batch_size=n` runs n swept indices per forward (the corrupted batch repeated n times along the
batch axis, each copy patched at its own index: the same values up to float rounding, n times the
activation memory); `progress=True` shows a progress bar over the forwards.

Attention patterns are patched keyed by candidate (`pattern.py`): the last axis of a pattern is
each query's candidate slots, and on a CSA layer the corrupted run's indexer may hold other keys
in them than the clean run's. `get_act_patch_attn_head_pattern_all_pos` / `_by_pos` /
`_dest_src_pos` and `pattern_patch_hooks` move each clean probability with its key
(`align_pattern`; `missing=` says what becomes of clean probability on keys the corrupted query
does not attend). TransformerLens's functions of the same names, which paste by column, are
refused where the candidates differ.

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
order. `steps=N` integrates the gradient along the straight path from the corrupted activations
to the target (integrated gradients): one layer's activations at a time are set to
act + α·(target − act) for α = 0, 1/N, …, (N−1)/N (N copies of the batch in one forward + backward
per layer, N times the memory of one), and each cell uses the mean gradient. steps=1 is plain
AtP. The path moves every cell of the layer at once, so a cell gets its share of the whole layer's
patch (exact as N grows for a family with one cell per layer, unless an expert or indexer choice
flips along the path); where the metric saturates or
switches (a probability, a sharp logit difference) and the gradient at the corrupted run alone
is 10–100× off, this follows the real sweep much more closely (tiny-recall, the answer's
probability, attention and MoE outputs per position: relative error ~100% at steps=1, ~20% at 16).

Hook helpers (`hash_route_hooks` / `override_hash_routes`, `indexer_pick_hooks` /
`force_indexer_picks`, `sink_hooks`, `comb_hooks`, `pattern_patch_hooks`) return `(name, fn)` lists for
`model.run_with_hooks(fwd_hooks=...)` / `model.hooks(...)` or are context managers; they never
modify a parameter or buffer.

Modules: `sweeps` (real patching), `pattern` (pattern patching by candidate), `attribution` (AtP),
`edits` (hook helpers), over the shared `engine` (families of hook points, patched forwards, AtP).
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
from .pattern import (
    align_pattern,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    pattern_patch_hooks,
)  # fmt: skip
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
    "align_pattern",
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
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
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
    "pattern_patch_hooks",
    "sink_hooks",
]  # fmt: skip
