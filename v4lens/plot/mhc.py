"""Manifold-constrained hyper-connection (mHC) figures: how the n residual streams are mixed.

Each block has two mHCs, `attn_hc` (before attention) and `mlp_hc` (before the MoE), each with
pre weights [n] (collapse the streams into the sub-layer input), post weights [n] (expand its
output back) and a doubly stochastic comb [n, n] (comb[j, k] = weight of input stream j in output
stream k). Each function takes the model and a `source` (a cache, or a prompt / tokens, run
caching only the hooks it reads) and returns a plotly Figure.

    fig = comb_grid(model, "The quick brown fox")          # slider over positions
    fig = stream_norms(model, cache)
    fig = sinkhorn_convergence(model, cache, layer=2, hc="mlp_hc")
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from ..analysis import stats
from . import style

HALVES = ("attn_hc", "mlp_hc")


# ----------------------------------------------------------------------------- shared helpers
def _short(prefix: str) -> str:
    """Tick label of a block: "blocks.3" -> "L3", "mtp.0" -> "MTP0"."""
    kind, i = prefix.split(".")
    return f"L{i}" if kind == "blocks" else f"MTP{i}"


def _sites(prefixes: list[str]) -> list[tuple[str, str]]:
    """Every mHC in forward order: (block prefix, "attn_hc" | "mlp_hc")."""
    return [(prefix, hc) for prefix in prefixes for hc in HALVES]


def _at(x: torch.Tensor, batch: int, position: int | None) -> torch.Tensor:
    """x [b, p, ...] -> x[batch, position] (fp32), or the mean over positions when position is None."""
    x = x[batch].float()
    return x.mean(0) if position is None else x[position]


def _where(model, cache, batch: int, position: int | None) -> tuple[int | None, str]:
    """Resolve `position` against the cache and describe it for titles and hover: "5·fox" or
    "mean over 40 positions"."""
    n = cache.tokens.shape[-1]
    if position is None:
        return None, f"mean over {n} positions"
    position = style.resolve_position(position, n)
    return position, style.token_labels(model, cache, batch=batch)[position]


def _stream_lines(fig: go.Figure, x: list[str], values: torch.Tensor, what: str, where: str, **where_kw) -> None:
    """One line per stream: values [len(x), n]; the same colour (and legend entry) per stream in every panel."""
    first = not where_kw or where_kw.get("row", 1) == 1
    for i in range(values.shape[1]):
        colour = style.CATEGORICAL[i % len(style.CATEGORICAL)]
        fig.add_scatter(
            x=x, y=values[:, i].tolist(), mode="lines+markers", name=f"stream {i}", legendgroup=f"stream {i}",
            showlegend=first, line={"color": colour}, marker={"color": colour, "size": 6},
            hovertemplate=f"{where}<br>%{{x}}<br>stream {i} {what}: %{{y:.4g}}<extra></extra>", **where_kw,
        )  # fmt: skip


# ----------------------------------------------------------------------------- figures
@torch.no_grad()
def comb_grid(model, source, position: int = -1, batch: int = 0, layers=None, slider: bool = True,
              max_positions: int = style.MAX_POSITIONS) -> go.Figure:  # fmt: skip
    """The comb matrices of every mHC for one token: a grid of n x n heatmaps.

    Rows: `attn_hc` (top), `mlp_hc` (bottom); columns: layers (`layers`: ints or prefixes;
    default every block, MTP blocks too when cached). In each panel y = input stream j, x =
    output stream k, colour = comb[j, k] (`{hc}.hook_comb`, one colour scale 0..1). The slider
    (slider=True) moves the token: its steps restyle every panel's z for the positions of
    `style.pick_positions(S, max_positions, focus=position)`; the title and hover name the token.

        fig = comb_grid(model, "The quick brown fox", position=-1)
    """
    prefixes = None if layers is None else [style.block_prefix(model, l) for l in layers]
    hooks = style.hook_filter(*(f"{hc}.hook_comb" for hc in HALVES), blocks=prefixes)
    cache = style.as_cache(model, source, names_filter=hooks)
    prefixes = prefixes or stats.block_prefixes(model, cache)
    grid = [(hc, p) for hc in HALVES for p in prefixes]  # trace order: row-major over the panels
    combs = [style.cached(cache, f"{p}.{hc}.hook_comb", "comb_grid")[batch].float().cpu() for hc, p in grid]
    position = style.resolve_position(position, combs[0].shape[0])
    labels = style.token_labels(model, cache, batch=batch)
    n = combs[0].shape[-1]
    streams = [f"s{j}" for j in range(n)]

    def title(p: int) -> str:
        return f"mHC comb[input j, output k] · token {labels[p]}"

    fig = style.figure(title(position), width=max(700, 150 * len(prefixes) + 160), height=480)
    fig.set_subplots(
        rows=2, cols=len(prefixes), shared_xaxes=True, shared_yaxes=True, horizontal_spacing=0.02,
        vertical_spacing=0.12, subplot_titles=[f"{_short(p)} {hc[:-3]}" for hc, p in grid],
    )  # fmt: skip
    for t, ((hc, prefix), comb) in enumerate(zip(grid, combs)):
        fig.add_heatmap(
            z=comb[position].tolist(), x=streams, y=streams, coloraxis="coloraxis", meta=labels[position],
            hovertemplate=f"%{{meta}}<br>{prefix}.{hc}<br>input %{{y}} → output %{{x}}: %{{z:.4f}}<extra></extra>",
            row=t // len(prefixes) + 1, col=t % len(prefixes) + 1,
        )  # fmt: skip
    fig.update_layout(coloraxis={"colorscale": style.SEQUENTIAL, "cmin": 0, "cmax": 1, "colorbar": {"title": "comb"}})
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="attn_hc · input stream j", row=1, col=1)
    fig.update_yaxes(title_text="mlp_hc · input stream j", row=2, col=1)
    if slider:
        picks = style.pick_positions(combs[0].shape[0], max_positions, focus=position)  # ends at `position`
        steps = []
        for p in picks:  # each step restyles every panel (z, hover token) and retitles the figure
            data = {"z": [c[p].tolist() for c in combs], "meta": [labels[p]] * len(combs)}
            steps.append({"method": "update", "label": labels[p], "args": [data, {"title.text": title(p)}]})
        bar = {"active": picks.index(position), "steps": steps, "currentvalue": {"prefix": "token: "}, "pad": {"t": 30}}
        fig.update_layout(sliders=[bar])
    return fig


@torch.no_grad()
def pre_post_weights(model, source, position: int | None = -1, batch: int = 0) -> go.Figure:
    """The mHC pre (collapse) and post (expand) weights of each stream through depth.

    Two panels: top `hook_pre` (sigmoid + eps, in (0, 1]), bottom `hook_post` (2·sigmoid, in
    (0, 2)); x = mHC sites in forward order ("L0 attn", "L0 mlp", ...), y = the weight; one line
    per stream (n lines per panel). At one token (`position`) or, position=None, the mean over
    positions.

        fig = pre_post_weights(model, "The quick brown fox", position=-1)
    """
    names = [f"{hc}.{h}" for hc in HALVES for h in ("hook_pre", "hook_post")]
    cache = style.as_cache(model, source, names_filter=style.hook_filter(*names))
    sites = _sites(stats.block_prefixes(model, cache))
    position, where = _where(model, cache, batch, position)
    x = [f"{_short(p)} {hc[:-3]}" for p, hc in sites]
    fig = style.figure(f"mHC pre / post weights · {where}", height=620)
    fig.set_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for row, hook in enumerate(("hook_pre", "hook_post"), start=1):
        values = torch.stack([_at(style.cached(cache, f"{p}.{hc}.{hook}", "pre_post_weights"), batch, position)
                              for p, hc in sites]).cpu()  # fmt: skip  # [sites, n]
        _stream_lines(fig, x, values, hook.removeprefix("hook_"), where, row=row, col=1)
        fig.update_yaxes(title_text=f"{hook.removeprefix('hook_')} weight", row=row, col=1)
    fig.update_xaxes(title_text="mHC (forward order)", row=2, col=1)
    return fig


@torch.no_grad()
def stream_norms(model, source, batch: int = 0, position: int | None = None) -> go.Figure:
    """The L2 norm (over d) of each residual stream through depth, one line per stream.

    x = points in depth: "embed" (`blocks.0.hook_streams_pre`, the embedding copied into the n
    streams), then after each half of each block ("L0 attn" = `blocks.0.hook_streams_mid`,
    "L0 mlp" = `blocks.0.hook_streams_post`, ...): 2·n_layers + 1 points; y = ||stream||, the mean
    over positions (position=None) or at one position. MTP blocks are not included.

        fig = stream_norms(model, cache)
    """
    prefixes = [f"blocks.{l}" for l in range(model.cfg.n_layers)]
    names = ["blocks.0.hook_streams_pre"] + [f"{p}.hook_streams_{s}" for p in prefixes for s in ("mid", "post")]
    cache = style.as_cache(model, source, names_filter=lambda name: name in names)
    position, where = _where(model, cache, batch, position)
    norms = torch.stack([_at(style.cached(cache, name, "stream_norms").float().norm(dim=-1), batch, position)
                         for name in names]).cpu()  # fmt: skip  # [2L+1, n]
    x = ["embed"] + [f"{_short(p)} {half}" for p in prefixes for half in ("attn", "mlp")]
    fig = style.figure(f"Stream norms through depth · {where}", xaxis_title="after", yaxis_title="||stream||")
    _stream_lines(fig, x, norms, "norm", where)
    return fig


@torch.no_grad()
def sinkhorn_convergence(model, source, layer: int | str, hc: str = "attn_hc", position: int | None = -1,
                         batch: int = 0) -> go.Figure:  # fmt: skip
    """Sinkhorn convergence of one mHC's comb: row and column errors per iteration, log y axis.

    From `stats.sinkhorn_errors` (re-runs the projection from `{hc}.hook_mixes`): x = iteration
    1..hc_sinkhorn_iters, y = max_j |Σ_k comb[j,k] - 1| (row error) and max_k |Σ_j comb[j,k] - 1|
    (column error, ~eps: each iteration ends with a column step). At one token (`position`) or,
    position=None, the worst token (max over positions).

        fig = sinkhorn_convergence(model, "The quick brown fox", layer=1, hc="mlp_hc")
    """
    if hc not in HALVES:
        raise ValueError(f"hc must be one of {HALVES}, got {hc!r}")
    site = f"{style.block_prefix(model, layer)}.{hc}"
    cache = style.as_cache(model, source, names_filter=lambda name: name == f"{site}.hook_mixes")
    style.cached(cache, f"{site}.hook_mixes", "sinkhorn_convergence")
    trace = stats.sinkhorn_errors(model, cache, site)
    position, where = _where(model, cache, batch, position)
    where = "max over positions" if position is None else where
    iters = list(range(1, trace.row_err.shape[0] + 1))
    fig = style.figure(f"Sinkhorn convergence · {site} · {where}", xaxis_title="iteration",
                       yaxis_title="max |line sum − 1|", yaxis_type="log")  # fmt: skip
    for name, err in (("row error", trace.row_err), ("column error", trace.col_err)):
        err = err[:, batch].float()
        y = err.amax(-1) if position is None else err[:, position]
        fig.add_scatter(x=iters, y=y.cpu().tolist(), mode="lines+markers", name=name,
                        hovertemplate=f"{where}<br>iteration %{{x}}<br>{name}: %{{y:.3e}}<extra></extra>")  # fmt: skip
    return fig
