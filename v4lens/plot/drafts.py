"""Figures of the DSpark drafter: is its confidence calibrated, and where do its drafts come from.

    out = model.generate(prompt, max_new_tokens=200, speculative=True, return_type="generation")
    fig = draft_calibration_plot(out)                 # or a DraftCalibration
    _, draft = model(tokens, draft=True)
    fig = draft_sources_bars(model, draft)           # stages vs Markov head, per draft position
    fig = draft_attention(model, cache, stage=0)     # a stage's block queries over [context ring, block]
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..analysis.drafts import DraftCalibration, draft_calibration, draft_sources
from . import style

OBSERVED, PREDICTED, STAGES, MARKOV = style.CATEGORICAL[0], style.CATEGORICAL[1], style.CATEGORICAL[2], style.CATEGORICAL[3]


def draft_calibration_plot(calibration, n_bins: int = 10) -> go.Figure:
    """Two panels. Left: per draft position k (x = "draft k+1"), bars of the observed survival (drafts
    0..k all kept) and of the predicted survival Π σ(c_j), hover with the number of drafts checked
    and the conditional rates (k kept given the earlier ones vs the mean σ(c_k)). Right: the
    reliability curve, observed vs predicted survival over bins of the prediction (marker size =
    drafts in the bin) against the diagonal of perfect calibration.

    calibration: a `DraftCalibration`, or a speculative `Generation` / its rounds (then computed here).
    """
    cal = calibration if isinstance(calibration, DraftCalibration) else draft_calibration(calibration, n_bins)
    K = cal.counts.shape[0]
    x = [f"draft {k + 1}" for k in range(K)]
    hover = [f"draft {k + 1}: {int(cal.counts[k])} checked<br>survival observed {float(cal.observed[k]):.3f}, "
             f"predicted {float(cal.predicted[k]):.3f}<br>kept given the earlier ones {float(cal.conditional_observed[k]):.3f}"
             f" vs mean σ(c) {float(cal.conditional_predicted[k]):.3f} ({int(cal.conditional_counts[k])} drafts)"
             for k in range(K)]  # fmt: skip
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Survival per draft position", "Reliability"))
    for name, values, color in (("observed", cal.observed, OBSERVED), ("predicted Π σ(c)", cal.predicted, PREDICTED)):
        fig.add_trace(go.Bar(x=x, y=values.tolist(), name=name, marker_color=color, hovertext=hover,
                             hoverinfo="text+name"), row=1, col=1)  # fmt: skip
    edges, predicted, observed, counts = cal.bins
    full = counts > 0
    size = (8 + 24 * (counts[full].double() / counts.max().clamp(min=1)).sqrt()).tolist()
    bin_hover = [f"predicted {float(lo):.1f}–{float(hi):.1f}: {int(n)} drafts<br>observed {float(o):.3f}"
                 for lo, hi, n, o, f in zip(edges[:-1], edges[1:], counts, observed, full) if f]  # fmt: skip
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                             name="calibrated", hoverinfo="skip"), row=1, col=2)  # fmt: skip
    fig.add_trace(go.Scatter(x=predicted[full].tolist(), y=observed[full].tolist(), mode="lines+markers",
                             marker=dict(size=size, color=OBSERVED), name="bins", hovertext=bin_hover,
                             hoverinfo="text"), row=1, col=2)  # fmt: skip
    styled = style.figure(f"DSpark confidence vs acceptance · {int(cal.counts[0])} drafts checked at position 1", width=1000, height=440)
    fig.update_layout(styled.layout, barmode="group")
    fig.update_yaxes(title_text="survival", range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(title_text="predicted survival Π σ(c)", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="observed survival", range=[0, 1.02], row=1, col=2)
    return fig


def draft_sources_bars(model, draft, batch: int = 0) -> go.Figure:
    """Per draft position (x = "k+1 · token"): the drafted token's logit split into the stages' part
    U_k[y] and the Markov bias at y (stacked bars), with the total ℓ_k[y] as a line. A ★ marks the
    drafts the Markov bias decided (the stages alone would have picked another token, named in the
    hover with both probabilities).

    draft: the `Draft` of `model(tokens, draft=True)`; batch: the row to draw.
    """
    src = draft_sources(draft)
    ids = src.tokens[batch].tolist()
    choice = src.stage_choice[batch].tolist()
    text = _token_text(model, sorted(set(ids) | set(choice)))
    K = len(ids)
    decided = src.markov_decided[batch].tolist()
    x = [f"{k + 1} · {style.printable(text[t])}{' ★' if decided[k] else ''}" for k, t in enumerate(ids)]
    stage, markov = src.stage_logit[batch].tolist(), src.markov_logit[batch].tolist()
    hover = [f"draft {k + 1}: {text[ids[k]]!r} (id {ids[k]})<br>stages {stage[k]:+.3f}, Markov {markov[k]:+.3f}"
             f"<br>p under the stages {float(src.stage_prob[batch, k]):.3f}, with the Markov bias "
             f"{float(src.draft_prob[batch, k]):.3f}" + (f"<br>the stages alone: {text[choice[k]]!r}" if decided[k] else "")
             for k in range(K)]  # fmt: skip
    fig = style.figure("DSpark drafts: stages vs Markov head (★ = the Markov bias decided)", width=760, height=440)
    fig.add_trace(go.Bar(x=x, y=stage, name="stages U[y]", marker_color=STAGES, hovertext=hover, hoverinfo="text"))
    fig.add_trace(go.Bar(x=x, y=markov, name="Markov bias", marker_color=MARKOV, hovertext=hover, hoverinfo="text"))
    fig.add_trace(go.Scatter(x=x, y=[s + m for s, m in zip(stage, markov)], mode="markers", name="ℓ[y]",
                             marker=dict(symbol="diamond", size=10, color="#222"), hoverinfo="skip"))  # fmt: skip
    fig.update_layout(barmode="relative", yaxis_title="logit of the drafted token", xaxis_title="draft · token")
    return fig


def draft_attention(model, source, stage: int = 0, head: int | None = None, batch: int = 0) -> go.Figure:
    """Heatmap of one DSpark stage's attention: y = the K block queries (positions p+1 … p+K: the
    anchor, then the noise tokens), x = their candidates, the same for every query: the context ring
    (main positions p−L+1 … p, labelled "position·token") then the K block keys, and the sink
    column; z = the attention probability of `head` (None: the mean over heads). A dotted line
    separates the ring from the block: the block is not causal, every query sees every block key.

    source: a cache of `model.run_with_cache(tokens, draft=True)`, or a prompt / tokens (then run so).
    """
    from ..analysis.cache import V4ActivationCache

    prefix = f"dspark.stages.{stage}.attn"
    if model.cfg.draft != "dspark" or not 0 <= stage < model.cfg.n_mtp_layers:
        raise ValueError(f"draft_attention needs a DSpark model and a stage in [0, {model.cfg.n_mtp_layers}), "
                         f"got stage {stage} on {model.cfg.name} (draft module: {model.cfg.draft})")  # fmt: skip
    names = [f"{prefix}.hook_key_index", f"{prefix}.hook_pattern", f"{prefix}.hook_sink"]
    cache = source
    if not isinstance(source, V4ActivationCache):
        _, cache = model.run_with_cache(source, draft=True, names_filter=names)
    index = style.cached(cache, names[0], "draft_attention")[batch, 0].tolist()  # [L+K] absolute positions
    pattern = style.cached(cache, names[1], "draft_attention")[batch].float().cpu()  # [h, K, L+K]
    sink = style.cached(cache, names[2], "draft_attention")[batch].float().cpu()  # [h, K]
    pattern, sink = (pattern.mean(0), sink.mean(0)) if head is None else (pattern[head], sink[head])
    K = model.cfg.dspark_block_size
    L, p = len(index) - K, index[-K] - 1  # p: the last main position
    strings = [style.printable(t) for t in model.to_str_tokens(cache.tokens[batch])] if cache.tokens is not None else None

    def label(j: int) -> str:
        if j > p:
            return f"{j}·{'anchor' if j == p + 1 else 'noise'}"
        return f"{j}·{strings[j]}" if strings is not None and j < len(strings) else str(j)

    x = [label(j) for j in index] + ["sink"]
    y = [label(j) for j in index[-K:]]
    z = torch.cat([pattern, sink[:, None]], dim=1)
    which = "mean over heads" if head is None else f"head {head}"
    fig = style.figure(f"DSpark stage {stage} · block queries over [context ring, block] ({which})",
                       width=max(700, 26 * len(x) + 240), height=380)  # fmt: skip
    fig.add_heatmap(z=z.tolist(), x=x, y=y, colorscale=style.SEQUENTIAL, colorbar_title="attention",
                    hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.4f}<extra></extra>")  # fmt: skip
    fig.add_vline(x=L - 0.5, line_dash="dot", line_color="white")
    fig.update_yaxes(autorange="reversed", title_text="block query (position)")
    fig.update_xaxes(title_text="candidate key (position·token)")
    return fig


def _token_text(model, ids: list[int]) -> dict[int, str]:
    try:
        return dict(zip(ids, model.to_str_tokens(torch.tensor(ids), prepend_bos=False)))
    except Exception:  # noqa: BLE001 -- no tokenizer (a synthetic vocabulary): show ids
        return {i: str(i) for i in ids}
