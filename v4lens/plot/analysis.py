"""Figures of analysis results: the logit lens, logit attribution and activation patching.

Each takes the result object of the analysis (or, for the lens, a cache or prompt to run it on)
and returns a plotly Figure in the shared v4lens style.

    fig = logit_lens_table(cache, position=-1, k=5)  # or a LensResult
    fig = attribution_bars(decompose(model, tokens=tokens, target=answer_id, heads=True))
    fig = patching_heatmap(get_act_patch_attn_out(model, corrupted, clean_cache, metric), model, tokens)
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from . import style

POSITIVE, NEGATIVE, NEUTRAL, TOTAL = style.CATEGORICAL[3], style.CATEGORICAL[0], style.CATEGORICAL[7], "#222"


def _short(text: str, n: int = 12) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _str_tokens(model, ids: list[int]) -> list[str]:
    """Token text of each id via the model's tokenizer; the ids themselves without one."""
    try:
        return [s.replace("\n", "⏎") for s in model.to_str_tokens(torch.tensor(ids), prepend_bos=False)]
    except Exception:  # noqa: BLE001 -- no tokenizer (or an id it cannot decode): show ids
        return [str(i) for i in ids]


# ----------------------------------------------------------------------------- logit lens
@torch.no_grad()
def logit_lens_table(lens_or_source, model=None, batch: int = 0, position: int = -1, k: int = 5) -> go.Figure:
    """Logit-lens table at one position: what each block boundary predicts, and the target.

    Heatmap: y = boundaries ("embed", "0_post", …, the model's output at the top), x = "top 1" …
    "top k" and, when the lens has targets, "target"; z = probability, each cell printing the
    token and its probability (the target column: the next token's probability at that boundary,
    hover adds its rank). lens_or_source: a `LensResult` (position indexes the positions it read),
    a cache (its `logit_lens` is run at `position` only), or a prompt / tokens with `model`.

        fig = logit_lens_table(cache, position=-1, k=5)
    """
    from ..analysis.cache import V4ActivationCache
    from ..analysis.layout import is_stream_name
    from ..analysis.lens import LensResult, _index_nested

    if isinstance(lens_or_source, LensResult):
        lens = lens_or_source
    else:
        if not isinstance(lens_or_source, V4ActivationCache):
            if model is None:
                raise TypeError("logit_lens_table needs a LensResult, a cache, or a prompt / tokens with model=")
            lens_or_source = style.as_cache(model, lens_or_source, names_filter=is_stream_name)
        model = model or lens_or_source.model
        lens, position = lens_or_source.logit_lens(k=k, positions=[position], per_stream=False), 0

    idx = (slice(None), batch, position) if lens.top_ids.ndim == 4 else (slice(None), position)
    probs = lens.top_probs[idx][:, :k].float().cpu()  # [B, k]
    ids = lens.top_ids[idx][:, :k].cpu()
    if lens.top_strs is not None:
        strs = [row[:k] for row in _index_nested(lens.top_strs, idx[1:])]
    else:
        distinct = ids.unique().tolist()
        text = dict(zip(distinct, _str_tokens(model, distinct)))
        strs = [[text[i] for i in row] for row in ids.tolist()]
    B, k = probs.shape
    where = int(lens.positions[position])
    xlabels = [f"top {r + 1}" for r in range(k)]
    z = probs.tolist()
    cells = [[f"{_short(s)}<br>{p:.2f}" for s, p in zip(ss, pp)] for ss, pp in zip(strs, z)]
    hover = [[f"{lens.labels[b]} · top {r + 1}<br>{strs[b][r]!r} (id {int(ids[b, r])})<br>p = {z[b][r]:.4f}"
              for r in range(k)] for b in range(B)]  # fmt: skip

    target = int(lens.targets[idx[1:]]) if lens.targets is not None else -1
    title = f"Logit lens · position {where}"
    if target >= 0:
        tstr = _str_tokens(model, [target])[0] if model is not None else str(target)
        tprob = lens.target_probs[idx].float().cpu().tolist()
        trank = lens.target_ranks[idx].cpu().tolist()
        xlabels.append("target")
        for b in range(B):
            z[b].append(tprob[b])
            cells[b].append(f"{_short(tstr)}<br>{tprob[b]:.2f}")
            hover[b].append(f"{lens.labels[b]} · target<br>{tstr!r} (id {target})<br>p = {tprob[b]:.4f}, "
                            f"rank {trank[b] + 1}")  # fmt: skip
        title += f" · target {tstr!r}"

    fig = style.figure(title, height=max(360, 30 * B + 180), xaxis_title="prediction", yaxis_title="boundary")
    fig.add_heatmap(
        z=z, x=xlabels, y=list(lens.labels), text=cells, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
        colorscale=style.SEQUENTIAL, zmin=0, zmax=1, colorbar={"title": "p"}, name="probability",
    )  # fmt: skip
    if target >= 0:
        fig.add_vline(x=k - 0.5, line={"color": "white", "width": 3})
    fig.update_yaxes(type="category")
    fig.update_xaxes(type="category", side="top")
    return fig


# ----------------------------------------------------------------------------- attribution
def attribution_bars(decomposition, batch: int = 0, position: int = -1, top: int = 20) -> go.Figure:
    """Horizontal bars of the largest contributions of a `Decomposition` at one (batch, position).

    Bars, largest |contribution| at the top: the `top` components (red positive, blue negative),
    then "others (n)" summing the rest (grey), and the model's value as a "total" bar (black),
    also marked by a dashed line. Hover: value and share of the total. position indexes
    `decomposition.positions`.

        fig = attribution_bars(decompose(model, tokens=tokens, target=answer_id, heads=True), top=15)
    """
    values = decomposition.values[:, batch, position].float().cpu()  # [C]
    total = float(decomposition.total[batch, position])
    order = values.abs().argsort(descending=True)[:top].tolist()
    labels = [decomposition.labels[i] for i in order]
    shown = [float(values[i]) for i in order]
    colours = [POSITIVE if v >= 0 else NEGATIVE for v in shown]
    rest = len(values) - len(order)
    if rest:
        labels.append(f"others ({rest})")
        shown.append(float(values.sum()) - sum(shown))
        colours.append(NEUTRAL)

    def share(v: float) -> str:
        return f"{100 * v / total:.1f}% of total" if total else ""

    where = decomposition.positions[position]
    fig = style.figure(
        f"Logit attribution · position {where} · total {total:.4g}",
        height=max(360, 22 * (len(labels) + 1) + 160), xaxis_title="contribution to the logit", yaxis_title="component",
    )  # fmt: skip
    fig.add_bar(
        x=[total], y=["total"], orientation="h", marker_color=TOTAL, name="total",
        hovertext=[f"total (the model's value) {total:+.4f}"], hoverinfo="text",
    )  # fmt: skip
    fig.add_bar(
        x=shown, y=labels, orientation="h", marker_color=colours, name="contribution",
        hovertext=[f"{l}<br>{v:+.4f}<br>{share(v)}" for l, v in zip(labels, shown)], hoverinfo="text",
    )  # fmt: skip
    fig.add_vline(x=0, line={"color": "#888", "width": 1})
    fig.add_vline(x=total, line={"color": TOTAL, "width": 1.5, "dash": "dash"},
                  annotation_text=f"total {total:.3g}", annotation_position="top")  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_layout(showlegend=False, barmode="overlay")
    return fig


# ----------------------------------------------------------------------------- patching
def _patching_values(result) -> tuple[torch.Tensor, float | None]:
    """A patching result (tensor or TransformerLens `PatchingResult`) -> (values [layer, x], its baseline)."""
    baseline = None
    if hasattr(result, "values") and hasattr(result, "axis_names"):  # a PatchingResult
        values = result.values
        if result.has_metric_axis:
            values = values[0]
        if not result.reduced:
            values = values.float().mean(-1)
        if result.baseline is not None and result.reduced and result.baseline.numel() == 1:
            baseline = float(result.baseline)
    else:
        values = torch.as_tensor(result)
    values = values.detach().float().cpu()
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"patching_heatmap draws a [layer, x] result; got shape {tuple(values.shape)} "
                         f"(select one index of the other axes first)")  # fmt: skip
    return values, baseline


def patching_heatmap(result, model=None, tokens=None, x: str = "pos", title: str | None = None,
                     baseline: float | None = None, batch: int = 0, max_positions: int = style.MAX_POSITIONS,
                     focus: int | None = None, segments=None, segment_field="part") -> go.Figure:  # fmt: skip
    """Heatmap of an activation-patching result: y = layers, x = positions or heads.

    result: a [layer, pos] / [layer, head] (or [layer]) tensor from `v4lens.patching`, or a
    `PatchingResult` (the first metric; the batch mean when not reduced). x: "pos" labels the
    columns with `tokens` ("pos·token"; needs `model` for the text), "head" with "h0" …, other
    axes by index. Colours diverge around `baseline` (default: the result's own baseline, else 0);
    NaN cells (layers without the mechanism) stay blank. More than max_positions positions are
    windowed, ending at `focus` (default: the last). segments: `v4lens.chat.segments(...)` of the
    prompt colours the position labels by `segment_field` ("part", "role", ...), with a legend.

        fig = patching_heatmap(get_act_patch_attn_out(model, corrupted, clean_cache, metric), model, tokens)
    """
    values, own_baseline = _patching_values(result)
    centre = baseline if baseline is not None else own_baseline if own_baseline is not None else 0.0
    L, N = values.shape
    cols = style.pick_positions(N, max_positions, focus) if x == "pos" else list(range(N))
    if x == "pos" and tokens is not None:
        if model is None:
            raise ValueError("patching_heatmap: token labels need model= (its tokenizer) as well as tokens=")
        tokens = model.to_tokens(tokens) if isinstance(tokens, str) else torch.as_tensor(tokens)
        names = style.token_labels(model, tokens=tokens, batch=batch)
        if len(names) != N:
            raise ValueError(f"tokens have {len(names)} positions, the result {N}")
        xlabels = [names[c] for c in cols]
    else:
        xlabels = [{"pos": f"{c}", "head": f"h{c}"}.get(x, f"{x} {c}") for c in cols]
    ylabels = [style.layer_label(model, f"blocks.{l}") if model is not None and l < model.cfg.n_layers else f"L{l}"
               for l in range(L)]  # fmt: skip
    z = values[:, cols]
    hover = [[f"{ylabels[l]} · {xlabels[j]}<br>value {float(z[l, j]):.4g}"
              + ("" if math.isnan(z[l, j]) else f" ({float(z[l, j]) - centre:+.4g} vs {centre:.4g})")
              for j in range(len(cols))] for l in range(L)]  # fmt: skip
    spread = float(z.nan_to_num(nan=centre).sub(centre).abs().max()) or 1.0
    fig = style.figure(title or f"Activation patching · layer × {x}", height=max(360, 30 * L + 200),
                       xaxis_title={"pos": "position·token", "head": "head"}.get(x, x), yaxis_title="layer")  # fmt: skip
    fig.add_heatmap(
        z=z.numpy(), x=xlabels, y=ylabels, hovertext=hover, hoverinfo="text", colorscale=style.DIVERGING,
        zmid=centre, zmin=centre - spread, zmax=centre + spread, colorbar={"title": "metric"}, name="patched metric",
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45 if x == "pos" else 0)
    if segments is not None:
        if x != "pos":
            raise ValueError(f"patching_heatmap: segments colour a position axis; this one is x={x!r}")
        style.mark_segments(fig, segments, "x", xlabels, cols, segment_field, n_tokens=N)
    return fig
