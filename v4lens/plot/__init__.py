"""Plotly figures of V4's decisions, and their export.

Every figure function takes `(model, source, ...)` — a cache from `model.run_with_cache`, or a
prompt / tokens (then only the hooks it needs are cached) — and returns a `plotly.graph_objects.Figure`
in one style (`v4lens.plot.style`), with token strings in hover text and long inputs windowed.

- routing: `router_heatmap`, `expert_load`, `routed_vs_shared`
- mHC: `comb_grid`, `pre_post_weights`, `stream_norms`, `sinkhorn_convergence`
- retrieval: `indexer_scores`, `compressed_entries`
- attention: `attention_pattern`, `sink_mass`
- analysis results: `logit_lens_table`, `attribution_bars`, `patching_heatmap`
- the DSpark drafter: `draft_attention`, `draft_calibration_plot`, `draft_sources_bars`
- export: `save(fig, "x.html" | "x.png" | ...)`, `export_session()`

The figures with a token axis (`router_heatmap`, `indexer_scores`, `compressed_entries`,
`attention_pattern`, `patching_heatmap`) take `segments=v4lens.chat.segments(...)` of the prompt and
colour its token labels by part (or `segment_field="role"`, `"turn"`, ...), with a legend.
"""

from . import style
from .analysis import attribution_bars, logit_lens_table, patching_heatmap
from .attention import attention_pattern, sink_mass
from .drafts import draft_attention, draft_calibration_plot, draft_sources_bars
from .export import ExportError, export_session, find_browser, save
from .mhc import comb_grid, pre_post_weights, sinkhorn_convergence, stream_norms
from .retrieval import compressed_entries, indexer_scores
from .routing import expert_load, routed_vs_shared, router_heatmap

__all__ = [
    "ExportError", "attention_pattern", "attribution_bars", "comb_grid", "compressed_entries", "draft_attention",
    "draft_calibration_plot", "draft_sources_bars", "expert_load",
    "export_session", "find_browser", "indexer_scores", "logit_lens_table", "patching_heatmap", "pre_post_weights",
    "routed_vs_shared", "router_heatmap", "save", "sink_mass", "sinkhorn_convergence", "stream_norms", "style",
]  # fmt: skip
