"""Statistics and figures per part of a conversation (v4lens.chat.segments): per-segment means, sink
mass, where the indexer's picks land, expert load; token axes coloured by segment; selecting the
positions of a segment in run_with_cache and the activation store.

Each statistic is checked against a loop over the tokens of each segment, and against a value
forced by a hook edit (all picks in a tool result, all tool-result tokens routed to two experts).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_chat_format import AGENT, asst, sys_, user

import v4lens
import v4lens.activations as acts
from v4lens import chat, plot, stats
from v4lens.plot import style

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return v4lens.load("tiny")  # the real vocabulary: the rendered chat's token ids


@pytest.fixture(scope="module")
def seg(model):
    return chat.segments(AGENT, model, thinking=True)


@pytest.fixture(scope="module")
def cache(model, seg):
    _, cache = model.run_with_cache(seg.tokens())
    return cache


def parts_in_order(seg) -> list[str]:
    out = []
    for r in seg:
        if r.part not in out:
            out.append(r.part)
    return out


# ---------------------------------------------------------------------- per_segment
def test_per_segment_means_each_part(seg, cache):
    sink = cache["blocks.1.attn.hook_sink"][0]  # [h, S]
    means = stats.per_segment(sink.mean(0), seg)
    assert list(means.index) == parts_in_order(seg)  # conversation order
    for part in means.index:
        assert means[part] == pytest.approx(float(sink.mean(0)[seg.mask(part=part)].mean()), rel=1e-5)
    table = stats.per_segment(sink, seg, "role", index=[f"h{h}" for h in range(sink.shape[0])])  # [h, S] -> h x roles
    assert list(table.index) == ["h0", "h1", "h2", "h3"] and "tool" in table.columns
    assert table.loc["h2", "tool"] == pytest.approx(float(sink[2, seg.mask(role="tool")].mean()), rel=1e-5)


def test_per_segment_ignores_nan_unlabelled_and_takes_positions(seg):
    values = torch.arange(seg.n_tokens, dtype=torch.float)
    values[seg.positions("tool_result")[0]] = math.nan  # one tool-result token has no value
    means = stats.per_segment(values, seg)
    keep = seg.mask("tool_result").clone()
    keep[seg.positions("tool_result")[0]] = False
    assert means["tool_result"] == pytest.approx(float(values[keep].mean()))

    by_tool = stats.per_segment(values.nan_to_num(), seg, "tool")  # only tokens of a tool call / result / schema
    assert set(by_tool.index) == {"get_weather", "search"}
    by_fn = stats.per_segment(values.nan_to_num(), seg, lambda r: f"{r.role}:{r.part}")
    assert by_fn["tool:tool_result"] == pytest.approx(float(values.nan_to_num()[seg.mask("tool_result")].mean()))

    at = seg.positions("thinking")  # values held only at some positions (a position-sliced cache)
    sub = stats.per_segment(values[at], seg, positions=at)
    assert sub["thinking"] == pytest.approx(float(values[at].mean())) and math.isnan(sub["user"])
    with pytest.raises(ValueError, match="positions"):
        stats.per_segment(values[:-3], seg)


# ---------------------------------------------------------------------- sink mass
def test_sink_mass_by_segment(model, seg, cache):
    df = stats.sink_mass_by_segment(model, cache, seg)
    assert list(df.columns) == ["layer", "block", "layer_type", "segment", "tokens", "sink_mass"]
    assert len(df) == model.cfg.n_layers * len(parts_in_order(seg))
    for _, row in df[df.segment.isin(["tool_result", "thinking"])].iterrows():
        sink = cache[f"{row.block}.attn.hook_sink"][0]  # [h, S]
        mask = seg.mask(part=row.segment)
        assert row.tokens == int(mask.sum())
        assert row.sink_mass == pytest.approx(float(sink[:, mask].mean()), rel=1e-5)
    heads = stats.sink_mass_by_segment(model, cache, seg, "role", layers=[2], per_head=True)
    row = heads[(heads["head"] == 1) & (heads.segment == "user")].iloc[0]
    assert row.sink_mass == pytest.approx(float(cache["blocks.2.attn.hook_sink"][0, 1, seg.mask(role="user")].mean()))


def test_a_position_sliced_cache_counts_only_its_positions(model, seg, cache):
    at = seg.positions("tool_result")
    _, small = model.run_with_cache(seg.tokens(), names_filter=stats.names_filter("sink_mass_by_segment"), pos_slice=at)
    assert small["blocks.1.attn.hook_sink"].shape[-1] == len(at)
    full, part = stats.sink_mass_by_segment(model, cache, seg), stats.sink_mass_by_segment(model, small, seg)
    got = part[part.segment == "tool_result"].sink_mass.to_numpy()
    assert got == pytest.approx(full[full.segment == "tool_result"].sink_mass.to_numpy(), rel=1e-5)
    assert (part[part.segment != "tool_result"].tokens == 0).all()


def test_the_cache_must_be_the_conversation(model, seg):
    _, other = model.run_with_cache(seg.tokens()[:, :-5], names_filter=stats.names_filter("sink_mass_by_segment"))
    with pytest.raises(ValueError, match="does not start with the segments' 617 tokens"):
        stats.sink_mass_by_segment(model, other, seg)


# ---------------------------------------------------------------------- indexer picks
def brute_force_picks(model, cache, seg, layer: int) -> dict:
    """{(query part, picked part): (share, baseline)} by looping over queries and picks."""
    m, labels = model.cfg.compress_ratio(layer), seg.labels("part")
    picks = cache[f"blocks.{layer}.attn.indexer.hook_topk"][0]
    T = seg.n_tokens // m
    landed, base, n = {}, {}, {}
    for t in range(seg.n_tokens):
        q, good = labels[t], [int(w) for w in picks[t] if 0 <= w < T]
        if not good:
            continue
        n[q] = n.get(q, 0) + len(good)
        visible = (t + 1) // m
        for w in good:
            for tok in range(w * m, (w + 1) * m):
                landed[q, labels[tok]] = landed.get((q, labels[tok]), 0) + 1 / m
        for w in range(visible):
            for tok in range(w * m, (w + 1) * m):
                base[q, labels[tok]] = base.get((q, labels[tok]), 0) + len(good) / m / visible
    return {k: (landed.get(k, 0) / n[k[0]], base.get(k, 0) / n[k[0]]) for k in set(landed) | set(base)}


def test_indexer_picks_by_segment_against_brute_force(model, seg, cache):
    df = stats.indexer_picks_by_segment(model, cache, seg)
    assert sorted(set(df.layer)) == [1, 3]  # the CSA layers
    assert df.groupby(["layer", "query"]).share.sum().to_numpy() == pytest.approx(1.0)
    expected = brute_force_picks(model, cache, seg, 3)
    for _, row in df[df.layer == 3].iterrows():
        share, baseline = expected.get((row.query, row.segment), (0.0, 0.0))
        assert (row.share, row.baseline) == pytest.approx((share, baseline), abs=1e-6), (row.query, row.segment)
    thinking = df[(df.layer == 3) & (df["query"] == "thinking") & (df.segment == "system")].iloc[0]
    assert thinking.queries == int(seg.mask("thinking").sum()) and thinking.selective == thinking.queries


def test_forced_picks_land_in_a_tool_result(model, seg):
    result = seg.select("tool_result")[0]  # the first tool result: entry w covers tokens 4w .. 4w+3 inside it
    w = -(-result.start // 4)
    assert (w + 1) * 4 <= result.stop

    def into_the_result(picks, hook):  # every query that can see entry w picks it (once), nothing else
        t = torch.arange(picks.shape[1])[None, :, None]
        return torch.where(((t + 1) // 4 > w) & (torch.arange(picks.shape[-1]) == 0), w, -1).expand_as(picks)

    with model.hooks(fwd_hooks=[("blocks.1.attn.indexer.hook_topk", into_the_result)]):
        _, forced = model.run_with_cache(seg.tokens(), names_filter=stats.names_filter("indexer_picks_by_segment"))
    df = stats.indexer_picks_by_segment(model, forced, seg, layers=[1])
    later = df[df["query"] == "content"]  # the final answer comes after the first result
    assert later.set_index("segment").share["tool_result"] == pytest.approx(1.0)
    assert later.set_index("segment").baseline["tool_result"] < 0.2


# ---------------------------------------------------------------------- expert load
def test_expert_load_by_segment(model, seg, cache):
    df = stats.expert_load_by_segment(model, cache, seg, "role", layers=[0, 2])
    E = model.cfg.n_routed_experts
    assert len(df) == 2 * len(set(seg.labels("role"))) * E and set(df.routing) == {"hash", "learned"}
    assert df.groupby(["layer", "segment"]).frac.sum().to_numpy() == pytest.approx(1.0)
    ids = cache["blocks.2.mlp.hook_expert_ids"][0]  # [S, k]
    rows = df[(df.layer == 2) & (df.segment == "tool")]
    assert rows["count"].tolist() == torch.bincount(ids[seg.mask(role="tool")].flatten(), minlength=E).tolist()
    overall = torch.bincount(ids.flatten(), minlength=E).float() / ids.numel()
    assert rows.lift.to_numpy() == pytest.approx((rows.frac.to_numpy() / overall.numpy()), rel=1e-5)


def test_forced_routing_shows_in_the_tool_results(model, seg):
    mask = seg.mask("tool_result")

    def two_experts(ids, hook):  # every tool-result token to experts 0 and 1
        ids = ids.clone()
        ids[:, mask] = torch.tensor([0, 1])
        return ids

    with model.hooks(fwd_hooks=[("blocks.2.mlp.hook_expert_ids", two_experts)]):
        _, forced = model.run_with_cache(seg.tokens(), names_filter=stats.names_filter("expert_load_by_segment"))
    df = stats.expert_load_by_segment(model, forced, seg, layers=[2])
    frac = df[df.segment == "tool_result"].set_index("expert").frac
    assert frac[0] == frac[1] == 0.5 and frac[2:].sum() == 0


def test_names_filter_knows_the_segment_statistics():
    keep = stats.names_filter("indexer_picks_by_segment", "expert_load_by_segment", "sink_mass_by_segment")
    assert keep("blocks.1.attn.indexer.hook_topk") and keep("blocks.0.mlp.hook_expert_ids")
    assert keep("blocks.2.attn.hook_sink") and not keep("blocks.1.attn.indexer.hook_scores")


# ---------------------------------------------------------------------- figures
def tick_colours(axis) -> dict[str, str | None]:
    """category -> the colour its tick label is written in (None: plain)."""
    out = {}
    for value, text in zip(axis.tickvals, axis.ticktext):
        out[value] = text.split("color:")[1].split('"')[0] if text.startswith("<span") else None
    return out


def test_router_heatmap_colours_tokens_by_part(model, seg, cache):
    fig = plot.router_heatmap(model, cache, 1, segments=seg, max_positions=60, focus=500)
    colours, labels = tick_colours(fig.layout.yaxis), seg.labels("part")
    assert len(colours) == 60
    for category, colour in colours.items():
        assert colour == style.SEGMENT_COLOURS[labels[int(category.split("·")[0])]]
    legend = [t.name for t in fig.data if t.legendgroup == "segments"]
    assert legend == [p for p in parts_in_order(seg) if p in {labels[p] for p in range(441, 501)}]
    assert fig.layout.showlegend and "tool_result" in legend


def test_indexer_scores_colour_entries_by_their_window(model, seg, cache):
    fig = plot.indexer_scores(model, cache, 1, segments=seg, segment_field="role", max_positions=20)
    roles = seg.labels("role")
    for category, colour in tick_colours(fig.layout.xaxis).items():
        w = int(category.split(":")[0][1:])
        window = roles[4 * w : 4 * w + 4]
        assert colour == style.SEGMENT_COLOURS[max(window, key=window.count)]
    assert set(tick_colours(fig.layout.yaxis).values()) <= set(style.SEGMENT_COLOURS.values())


def test_token_space_and_patching_axes(model, seg, cache):
    fig = plot.attention_pattern(model, cache, 1, 0, segments=seg, space="tokens", max_positions=10)
    x = tick_colours(fig.layout.xaxis)
    assert x["sink"] is None and sum(c == style.SEGMENT_COLOURS["tool_result"] for c in x.values()) > 0
    legend = [t.name for t in fig.data if t.legendgroup == "segments"]
    assert len(legend) == len(set(legend))  # both axes marked, each part listed once
    result = torch.randn(model.cfg.n_layers, seg.n_tokens)
    fig = plot.patching_heatmap(result, model, seg.tokens(), segments=seg, segment_field="turn")
    assert [t.name for t in fig.data if t.legendgroup == "segments"] == ["2", "3", "4"]  # the last 128 positions
    short = chat.segments([sys_(), user("Hi")], model)
    with pytest.raises(ValueError, match="the figure's input has"):
        plot.router_heatmap(model, short.tokens()[:, :3], 0, segments=short)


# ---------------------------------------------------------------------- selecting positions by segment
def test_run_with_cache_at_every_tool_result_token(model, seg, cache):
    at = seg.positions("tool_result")
    _, small = model.run_with_cache(seg.tokens(), pos_slice=at, names_filter=lambda n: n.endswith("hook_streams_post"))
    assert small.positions.tolist() == at.tolist()
    assert torch.equal(small["blocks.2.hook_streams_post"][0], cache["blocks.2.hook_streams_post"][0, at])
    norm = small["blocks.2.hook_streams_post"][0].norm(dim=-1).mean(-1)  # [n_tool_tokens]
    norms = stats.per_segment(norm, seg, positions=small.positions)
    assert norms.notna().tolist() == [p == "tool_result" for p in norms.index]  # only what the cache holds


def test_activation_store_at_every_tool_result_token(model, seg, cache, tmp_path):
    other = chat.segments(AGENT[:4] + [asst("Paris.")], model, thinking=True)  # a shorter transcript
    convs = [seg, other]
    store = acts.collect(model, [s.ids for s in convs], ["blocks.1.hook_streams_post"], tmp_path / "tool",
                         positions=[s.mask("tool_result") for s in convs], progress=False)  # fmt: skip
    assert len(store) == sum(int(s.mask("tool_result").sum()) for s in convs)
    first = [store[i] for i in range(len(store)) if store[i]["row"] == 0]
    assert [int(x["position"]) for x in first] == seg.positions("tool_result").tolist()
    want = cache["blocks.1.hook_streams_post"][0, seg.positions("tool_result")]
    stored = torch.stack([x["blocks.1.hook_streams_post"] for x in first])  # [n_tool_tokens, n, d]
    assert torch.allclose(stored, want, atol=1e-5)
    by_tool = stats.per_segment(stored.norm(dim=-1).mean(-1), seg, "tool", positions=[x["position"] for x in first])
    assert list(by_tool.index) == ["get_weather", "search"] and by_tool.notna().all()  # the stored tokens, per tool
