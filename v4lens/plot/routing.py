"""MoE routing figures: which experts each token uses, how load spreads, routed vs shared output.

Each function takes the model and a `source` (a cache from `model.run_with_cache`, or a prompt /
tokens, which are run caching only the hooks the figure reads) and returns a plotly Figure.

    fig = router_heatmap(model, "The quick brown fox", layer=3)
    fig = expert_load(model, cache, metric="weight_mass")
    fig = routed_vs_shared(model, tokens)
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from ..analysis import stats
from . import style

_ROUTER_HOOKS = ("mlp.hook_expert_ids", "mlp.hook_expert_weights", "mlp.hook_router_scores")


def _weights_per_expert(ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids, weights [..., k] (-1 = empty slot) -> the weight each token gives each expert [..., E] (0 if unused)."""
    dense = weights.new_zeros(*ids.shape[:-1], n_experts + 1)
    dense.scatter_add_(-1, torch.where(ids >= 0, ids, n_experts), weights.float())  # empties -> spare column
    return dense[..., :n_experts]


def _fmt(ids) -> str:
    return "[" + ", ".join(str(int(i)) for i in ids) + "]"


@torch.no_grad()
def router_heatmap(model, source, layer: int | str, batch: int = 0, max_positions: int = style.MAX_POSITIONS,
                   focus: int | None = None, segments=None, segment_field="part") -> go.Figure:  # fmt: skip
    """Token x expert heatmap of one layer's routing weights, chosen experts marked.

    Heatmap: x = routed experts 0..E-1, y = positions (labelled "pos·token", first at the top),
    z[p, e] = the weight token p gives expert e (`mlp.hook_expert_weights` summed over the slots
    of `mlp.hook_expert_ids` that pick e; 0 where e is not chosen). Hover: token, weight, router
    score (`mlp.hook_router_scores`) and, on hash layers, the table route "tid2eid[token] = [..]".
    A scatter of open circles marks every chosen (position, expert) slot. Hash layers say so in
    the title. Long inputs draw `max_positions` positions ending at `focus` (default: the last).
    segments: `v4lens.chat.segments(...)` of the prompt colours the position labels by
    `segment_field` ("part", "role", "turn", ...), with a legend (`style.mark_segments`).

        fig = router_heatmap(model, "The quick brown fox", layer=0)
        fig = router_heatmap(model, seg.tokens(), layer=3, segments=seg)
    """
    prefix = style.block_prefix(model, layer)
    cache = style.as_cache(model, source, names_filter=style.hook_filter(*_ROUTER_HOOKS, blocks=[prefix]))
    name = "router_heatmap"
    ids = style.cached(cache, f"{prefix}.mlp.hook_expert_ids", name)[batch].cpu()  # [p,k]
    weights = style.cached(cache, f"{prefix}.mlp.hook_expert_weights", name)[batch].float().cpu()
    scores = style.cached(cache, f"{prefix}.mlp.hook_router_scores", name)[batch].float().cpu()  # [p,E]
    E = scores.shape[-1]
    positions = style.pick_positions(ids.shape[0], max_positions, focus)
    labels = style.token_labels(model, cache, batch=batch)
    ylabels = [labels[p] for p in positions]
    z = _weights_per_expert(ids, weights, E)[positions]  # [P,E]

    mlp = model.get_submodule(f"{prefix}.mlp")
    hashed = getattr(mlp, "hashed", False)
    routes = mlp.gate.tid2eid[cache.tokens[batch]].cpu() if hashed else None  # [p,k]
    hover = []
    for i, p in enumerate(positions):
        route = f"<br>hash route: tid2eid[token] = {_fmt(routes[p])}" if hashed else ""
        hover.append([
            f"{labels[p]}<br>expert {e}: weight {float(z[i, e]):.4f}<br>router score {float(scores[p, e]):.4f}"
            f"<br>experts used: {_fmt(ids[p])}{route}"
            for e in range(E)
        ])  # fmt: skip

    kind = "routes from tid2eid" if hashed else "learned top-k"
    fig = style.figure(
        f"Routing weights · {style.layer_label(model, prefix)} · {kind}",
        height=min(2400, max(420, 16 * len(positions) + 160)),
        xaxis_title="expert",
        yaxis_title="position·token",
    )
    fig.add_heatmap(
        z=z.tolist(), x=list(range(E)), y=ylabels, text=hover, hoverinfo="text",
        colorscale=style.SEQUENTIAL, zmin=0, colorbar={"title": "weight"}, name="weight",
    )  # fmt: skip
    chosen = [(e, i, s) for i, p in enumerate(positions) for s, e in enumerate(ids[p].tolist()) if e >= 0]
    fig.add_scatter(
        x=[e for e, _, _ in chosen], y=[ylabels[i] for _, i, _ in chosen], mode="markers", name="chosen",
        marker={"symbol": "circle-open", "size": 9, "color": "white", "line": {"width": 2}},
        text=[f"{ylabels[i]}<br>slot {s}: expert {e}" for e, i, s in chosen], hoverinfo="text",
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    if E <= 64:  # label every expert; plotly's automatic ticks beyond that
        fig.update_xaxes(tickmode="array", tickvals=list(range(E)))
    fig.update_layout(showlegend=False)
    if segments is not None:
        fig.update_traces(showlegend=False, selector={"name": "chosen"})
        style.mark_segments(fig, segments, "y", ylabels, positions, segment_field, n_tokens=len(labels))
    return fig


@torch.no_grad()
def expert_load(model, source, metric: str = "count", normalize: bool = False, mask=None, positions=None) -> go.Figure:
    """Expert load across layers: heatmap, y = layers (hash layers labelled "· hash", MTP blocks
    when the cache has them), x = experts, z = tokens routed to each expert (metric="count",
    `stats.expert_counts`) or routing weight received (metric="weight_mass",
    `stats.expert_weight_mass`); normalize=True divides each layer's row by its total (a share).
    mask / positions select tokens as in `v4lens.stats`.

        fig = expert_load(model, cache, metric="weight_mass", normalize=True)
    """
    measures = {"count": stats.expert_counts, "weight_mass": stats.expert_weight_mass}
    if metric not in measures:
        raise ValueError(f"metric must be one of {sorted(measures)}, got {metric!r}")
    cache = style.as_cache(model, source, names_filter=stats.names_filter("expert_weight_mass"))
    prefixes = stats.block_prefixes(model, cache)
    load = measures[metric](model, cache, mask=mask, positions=positions, layers=prefixes).float()  # [L,E]
    share = load / load.sum(-1, keepdim=True).clamp(min=1e-30)
    z = share if normalize else load
    rows = [style.layer_label(model, p) for p in prefixes]
    hover = [
        [f"{rows[l]}<br>expert {e}<br>{metric}: {float(load[l, e]):.4g}<br>share: {float(share[l, e]):.3f}"
         for e in range(load.shape[1])]
        for l in range(len(rows))
    ]  # fmt: skip
    what = {"count": "tokens routed", "weight_mass": "routing weight received"}[metric]
    fig = style.figure(
        f"Expert load · {what}" + (" (share of layer)" if normalize else ""),
        height=max(360, 28 * len(rows) + 160),
        xaxis_title="expert",
        yaxis_title="layer",
    )
    fig.add_heatmap(
        z=z.tolist(), x=list(range(load.shape[1])), y=rows, text=hover, hoverinfo="text",
        colorscale=style.SEQUENTIAL, zmin=0, colorbar={"title": "share" if normalize else metric},
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


@torch.no_grad()
def routed_vs_shared(model, source, batch: int | None = None) -> go.Figure:
    """Per layer, how much of the MoE output comes from the routed experts vs the shared expert.

    share_shared = mean over tokens of ||shared|| / (||routed|| + ||shared||), with shared =
    `mlp.hook_shared_out`, routed = `hook_mlp_out` - shared and ||.|| the L2 norm over d (per token);
    share_routed = 1 - share_shared. (Norm shares, not variance: the two outputs need not be
    orthogonal.) Tokens: every position of every prompt, or of prompt `batch` only.
    Stacked bars: x = layers (hash layers labelled), y = share (0..1), routed below, shared above;
    hover also gives the mean norms.

        fig = routed_vs_shared(model, "The quick brown fox")
    """
    cache = style.as_cache(model, source, names_filter=style.hook_filter("hook_mlp_out", "mlp.hook_shared_out"))
    prefixes = stats.block_prefixes(model, cache)
    shared_share, routed_norm, shared_norm = [], [], []
    for prefix in prefixes:
        out = style.cached(cache, f"{prefix}.hook_mlp_out", "routed_vs_shared").float()
        shared = style.cached(cache, f"{prefix}.mlp.hook_shared_out", "routed_vs_shared").float()
        if batch is not None:
            out, shared = out[batch : batch + 1], shared[batch : batch + 1]
        r, s = (out - shared).norm(dim=-1), shared.norm(dim=-1)  # [b,p]
        shared_share.append(float((s / (r + s).clamp(min=1e-30)).mean()))
        routed_norm.append(float(r.mean()))
        shared_norm.append(float(s.mean()))
    x = [style.layer_label(model, p) for p in prefixes]
    fig = style.figure("MoE output: routed experts vs shared expert", barmode="stack",
                       xaxis_title="layer", yaxis_title="share of output norm")  # fmt: skip
    for name, share, norm, colour in (
        ("routed", [1 - s for s in shared_share], routed_norm, style.CATEGORICAL[0]),
        ("shared", shared_share, shared_norm, style.CATEGORICAL[1]),
    ):
        fig.add_bar(
            x=x, y=share, name=name, marker_color=colour, hoverinfo="text",
            text=[f"{l}<br>{name} share {v:.3f}<br>mean ||{name}|| = {n:.4g}" for l, v, n in zip(x, share, norm)],
            textposition="none",
        )  # fmt: skip
    fig.update_yaxes(range=[0, 1])
    return fig
