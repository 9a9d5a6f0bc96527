"""The one look every v4lens figure shares, and the helpers that keep figures small.

- `figure(...)` starts a `go.Figure` with the v4lens template (font, margins, colours);
- `token_labels(model, cache)` gives "pos·token" strings for axes and hover text (a token longer
  than `MAX_TOKEN_CHARS` is cut with "…"; the margins grow to fit the labels: nothing is clipped);
- `pick_positions(n, max_positions, focus)` chooses which positions to draw when a sequence is
  long: a window ending at `focus` (default: the last position), never an S×S matrix;
- `mark_segments(fig, segments, axis, ...)` colours a token axis by the part of a conversation each
  token belongs to (`v4lens.chat.segments`), with a legend.

Colour conventions: `SEQUENTIAL` for weights and probabilities (0 … 1), `DIVERGING` (centred on 0)
for signed quantities (logit contributions, patching effects), `CATEGORICAL` for discrete
series (layers, streams, experts).
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
import torch

from ..analysis.layout import require_hooks

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
CATEGORICAL = [
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD",
]  # fmt: skip
MAX_POSITIONS = 128  # default cap on positions drawn along an axis
MAX_TOKEN_CHARS = 24  # longer token text is cut in labels: a whole line of code would squeeze the plot away
LEGEND_PX, COLORBAR_PX = 150, 100  # room right of a plot for a segment legend and a colour bar
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=12, color="#222")

pio.templates["v4lens"] = go.layout.Template(
    layout=go.Layout(
        font=FONT,
        colorway=CATEGORICAL,
        paper_bgcolor="white",
        plot_bgcolor="white",
        margin=dict(l=70, r=30, t=60, b=60),  # the least margins: automargin widens them to fit tick labels
        title=dict(x=0.02, xanchor="left", font=dict(size=15)),
        xaxis=dict(showgrid=False, zeroline=False, linecolor="#888", ticks="outside", automargin=True),
        yaxis=dict(showgrid=False, zeroline=False, linecolor="#888", ticks="outside", automargin=True),
        hoverlabel=dict(font_family=FONT["family"]),
    )
)


def figure(title: str, width: int = 900, height: int = 520, **layout) -> go.Figure:
    """A new figure in the v4lens style."""
    fig = go.Figure()
    fig.update_layout(template="v4lens", title=title, width=width, height=height, **layout)
    return fig


def token_labels(model, cache=None, tokens: torch.Tensor | None = None, batch: int = 0) -> list[str]:
    """'pos·token' for every position of one prompt (token text via the model's tokenizer), with
    control characters shown as their Unicode pictures (plotly.js refuses to draw them).

    tokens: [b, S] or [S]; default `cache.tokens`. Positions are absolute (a position-sliced
    cache keeps only its positions). Without a tokenizer the ids are shown.
    """
    if tokens is None:
        tokens = getattr(cache, "tokens", None)
        if tokens is None:
            raise ValueError("token labels need the input tokens: pass tokens= or a cache from model.run_with_cache")
    tokens = tokens[batch] if tokens.ndim == 2 else tokens
    try:
        strings = model.to_str_tokens(tokens.cpu(), prepend_bos=False)
    except Exception:  # no tokenizer available: show ids
        strings = [str(int(t)) for t in tokens]
    return [f"{p}·{shorten(printable(s))}" for p, s in enumerate(strings)]


def shorten(text: str, n: int = MAX_TOKEN_CHARS) -> str:
    """`text` cut to n characters with "…" at the end when longer."""
    return text if len(text) <= n else text[: n - 1] + "…"


def pick_positions(n: int, max_positions: int = MAX_POSITIONS, focus: int | None = None) -> list[int]:
    """Which of n positions to draw: all if n <= max_positions, else a window ending at `focus`."""
    if n <= max_positions:
        return list(range(n))
    end = n if focus is None else min(n, (focus % n) + 1)
    start = max(0, end - max_positions)
    return list(range(start, start + max_positions))


def as_cache(model, source, names_filter=None):
    """A cache from `source`: a cache is returned as is; a prompt (text) or tokens are run through
    `model.run_with_cache` (caching only `names_filter`), so every plot takes either."""
    from ..analysis.cache import V4ActivationCache

    if isinstance(source, V4ActivationCache):
        return source
    with torch.no_grad():
        _, cache = model.run_with_cache(source, names_filter=names_filter)
    return cache


# ----------------------------------------------------------------------------- hooks, layers, positions
def hook_filter(*suffixes: str, blocks=None):
    """A `names_filter` keeping `{block}.{suffix}` for the given block-relative hook names.

    blocks: prefixes such as "blocks.3" / "mtp.0" (default: every block and MTP block).

        cache = as_cache(model, tokens, names_filter=hook_filter("mlp.hook_expert_ids", blocks=["blocks.0"]))
    """
    import re

    if blocks is not None:
        names = {f"{b}.{s}" for b in blocks for s in suffixes}
        return lambda name: name in names
    pattern = re.compile(r"^(blocks|mtp)\.\d+\.(" + "|".join(re.escape(s) for s in suffixes) + r")$")
    return lambda name: bool(pattern.match(name))


def block_prefix(model, layer: int | str) -> str:
    """Layer index (n_layers + i for MTP block i, as in `V4Config`) or prefix -> "blocks.l" / "mtp.i"."""
    if isinstance(layer, str):
        if layer.startswith("dspark"):  # its queries are the draft block, not the prompt: other axes
            raise ValueError(
                f"{layer!r}: the block figures draw main-model blocks and MTP blocks; for a DSpark stage use "
                "plot.draft_attention(model, cache, stage=s) or read cache['dspark.stages.{s}.<hook>'] "
                "(one row per draft-block position)"
            )
        return layer.rstrip(".")
    n = model.cfg.n_layers
    layer = layer % n if layer < 0 else layer
    return f"blocks.{layer}" if layer < n else f"mtp.{layer - n}"


def layer_label(model, prefix: str) -> str:
    """Short axis label of a block: "L0 sliding · hash", "L1 csa", "MTP0"."""
    kind, i = prefix.split(".")
    if kind == "mtp":
        return f"MTP{i}"
    l = int(i)
    return f"L{l} {model.cfg.layer_type(l)}" + (" · hash" if model.cfg.is_hash_layer(l) else "")


def cached(cache, name: str, plot: str) -> torch.Tensor:
    """cache[name], or a KeyError naming the missing hook and the figure that needs it."""
    why = (
        f"{plot} needs it; pass the prompt or tokens instead (the figure then caches what it needs) "
        "or a cache that includes it"
    )
    return require_hooks(cache, [name], why)[name]


def resolve_position(position: int, n: int) -> int:
    """A position index (negative counts from the end) -> 0 .. n-1, or IndexError."""
    if not -n <= position < n:
        raise IndexError(f"position {position} out of range for a sequence of {n} tokens")
    return position % n


def printable(text: str) -> str:
    """Control characters shown as their Unicode pictures ("\\x04" -> "␄"): plotly.js refuses to
    draw titles, axis labels and hover text that contain them (byte-level tokens can). Idempotent."""
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 0x20 else "␡" if c == "\x7f" else c for c in text)


# ----------------------------------------------------------------------------- token axes coloured by segment
# Fixed colours for the parts and roles of a conversation (`v4lens.chat.segments`), so every figure of
# a transcript colours the same part alike; other labels (turns, tools, ...) take CATEGORICAL in turn.
SEGMENT_COLOURS = {
    "system": "#4C72B0", "tools": "#64B5CD", "tool_schema": "#3A8FB7", "response_format": "#9FC5D9",
    "user": "#55A868", "developer": "#2E7D5B", "reminder": "#8172B3", "latest_reminder": "#8172B3", "task": "#5B4A9B",
    "thinking": "#DA8BC3", "content": "#937860", "assistant": "#937860",
    "tool_name": "#DD8452", "argument_name": "#B8860B", "argument": "#CCB974",
    "tool_result": "#C44E52", "tool": "#C44E52",
    "marker": "#A8A8A8", "opening": "#6E6E6E", "template": "#A8A8A8", "reasoning_effort": "#6E6E6E",
}  # fmt: skip


def segment_labels(segments, field="part", n_tokens: int | None = None) -> list:
    """One label per token from `segments` (`v4lens.chat.segments(...)`, anything with `labels(field)`,
    or a list of labels); n_tokens: the axis's token count, which the segments must cover."""
    from ..analysis.stats.segments import token_labels

    labels = token_labels(segments, field)
    if n_tokens is not None and len(labels) > n_tokens:
        raise ValueError(f"segments label {len(labels)} tokens but the figure's input has {n_tokens}: pass the "
                         "segments of the conversation that was run (model.run_with_cache(seg.tokens()))")  # fmt: skip
    return labels


def segment_colours(labels: list) -> dict:
    """label -> colour, in order of first appearance (None has no colour)."""
    out, spare = {}, iter(CATEGORICAL * (1 + len(set(labels)) // len(CATEGORICAL)))
    for label in labels:
        if label is not None and label not in out:
            out[label] = SEGMENT_COLOURS[label] if label in SEGMENT_COLOURS else next(spare)
    return out


def mark_segments(fig: go.Figure, segments, axis: str, categories: list[str], spans: list, field="part",
                  n_tokens: int | None = None, max_ticks: int | None = None) -> None:  # fmt: skip
    """Colour the tick labels of a token axis by segment, with a legend of the segments shown.

    axis: "x" or "y" (a category axis); categories: its labels, in order; spans: what each
    category is — a token position, a (start, stop) span of tokens (it takes the label most of
    them have: a compressed entry), or None (a column that is no token: "sink", "other ...").
    The legend lists each segment once, however many axes are marked. max_ticks: at most this many
    labels (default: one per ~14 pixels of the axis), every k-th when there are more.
    """
    labels = segment_labels(segments, field, n_tokens)
    colours = segment_colours(labels)

    def label_of(span):
        if span is None:
            return None
        a, b = (span, span + 1) if isinstance(span, int) else span
        inside = [l for l in labels[max(0, a) : b] if l is not None]
        return max(inside, key=inside.count) if inside else None  # the label most of its tokens have

    marks = [label_of(s) for s in spans]
    if max_ticks is None:  # the labels' own spacing: plotly thins its automatic ticks likewise
        width = (fig.layout.width or 900) - LEGEND_PX - COLORBAR_PX - 150
        size = (fig.layout.height or 520) - 120 if axis == "y" else width
        max_ticks = max(2, size // 14)
    step = max(1, -(-len(categories) // max_ticks))
    shown = [i for i in range(len(categories)) if i % step == 0 or spans[i] is None]  # "sink" etc. always
    text = [f'<span style="color:{colours[marks[i]]}">{categories[i]}</span>' if marks[i] is not None
            else categories[i] for i in shown]  # fmt: skip
    getattr(fig, f"update_{axis}axes")(tickmode="array", tickvals=[categories[i] for i in shown], ticktext=text)
    listed = {t.name for t in fig.data if t.legendgroup == "segments"}
    for label in [l for l in colours if l in set(marks) and str(l) not in listed]:  # one entry per segment shown
        fig.add_scatter(x=[None], y=[None], mode="markers", name=str(label), legendgroup="segments",
                        legendgrouptitle_text=field if isinstance(field, str) else "segment",
                        marker={"symbol": "square", "size": 11, "color": colours[label]}, showlegend=True)  # fmt: skip
    # the legend right of the plot, the colour bar between them: both placed in pixels from the right edge
    width = fig.layout.width or 900
    legend = {"xref": "container", "x": 1 - LEGEND_PX / width, "xanchor": "left", "y": 1.0}
    fig.update_layout(showlegend=True, margin={"r": LEGEND_PX + COLORBAR_PX}, legend=legend)
    fig.update_traces(colorbar={"xref": "container", "x": 1 - (LEGEND_PX + COLORBAR_PX - 10) / width,
                                "xanchor": "left"}, selector={"type": "heatmap"})  # fmt: skip
