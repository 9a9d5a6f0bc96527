"""Routing and mHC figures (v4lens.plot.routing, v4lens.plot.mhc) on the tiny model: trace types
and counts, axis sizes, values equal to the cache, token strings in hover, windowing, hash labels."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from v4lens import stats
from v4lens.plot import mhc, routing, style

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cache(tiny256, tokens_2x40):
    with torch.no_grad():
        return tiny256.run_with_cache(tokens_2x40)[1]


@pytest.fixture(scope="module")
def long_cache(tiny256):
    tokens = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return tiny256.run_with_cache(tokens)[1]


def labels(model, cache, batch=0):
    return style.token_labels(model, cache, batch=batch)


def of_type(fig, kind):
    return [t for t in fig.data if t.type == kind]


FIGURES = {
    "router_heatmap": lambda m, s: routing.router_heatmap(m, s, layer=2, batch=1),
    "expert_load": lambda m, s: routing.expert_load(m, s, metric="weight_mass"),
    "routed_vs_shared": lambda m, s: routing.routed_vs_shared(m, s),
    "comb_grid": lambda m, s: mhc.comb_grid(m, s, position=5),
    "pre_post_weights": lambda m, s: mhc.pre_post_weights(m, s),
    "stream_norms": lambda m, s: mhc.stream_norms(m, s, position=3),
    "sinkhorn_convergence": lambda m, s: mhc.sinkhorn_convergence(m, s, layer=2, hc="mlp_hc"),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_from_tokens_equals_figure_from_cache(tiny256, tokens_2x40, cache, name):
    from_cache = FIGURES[name](tiny256, cache)
    from_tokens = FIGURES[name](tiny256, tokens_2x40)  # runs the model, caching only what it reads
    assert isinstance(from_cache, go.Figure) and len(from_cache.data) > 0
    assert from_cache.layout.template.layout.font.family == style.FONT["family"]  # the shared style
    assert from_tokens.to_dict() == from_cache.to_dict()


# ----------------------------------------------------------------------------- routing
def test_router_heatmap_values_markers_and_hover(tiny256, cache):
    fig = routing.router_heatmap(tiny256, cache, layer=1)
    (heat,), (marks,) = of_type(fig, "heatmap"), of_type(fig, "scatter")
    ids = cache["blocks.1.mlp.hook_expert_ids"][0]
    weights = cache["blocks.1.mlp.hook_expert_weights"][0]
    scores = cache["blocks.1.mlp.hook_router_scores"][0]
    z = torch.tensor(heat.z)
    assert z.shape == (40, tiny256.cfg.n_routed_experts)
    assert list(heat.y) == labels(tiny256, cache)
    k = tiny256.cfg.n_activated_experts
    for p in (0, 17, 39):
        for slot in range(k):
            assert z[p, ids[p, slot]] == pytest.approx(float(weights[p, slot]))
        unused = torch.ones(z.shape[1], dtype=torch.bool)
        unused[ids[p]] = False
        assert (z[p, unused] == 0).all()
        assert labels(tiny256, cache)[p] in heat.text[p][0]
        e = int(ids[p, 0])
        assert f"router score {float(scores[p, e]):.4f}" in heat.text[p][e]
    assert len(marks.x) == 40 * k
    chosen = {(int(e), labels(tiny256, cache)[p]) for p in range(40) for e in ids[p]}
    assert set(zip(marks.x, marks.y)) == chosen
    assert "hash" not in fig.layout.title.text
    assert "tid2eid" not in heat.text[0][0]


def test_router_heatmap_hash_layer_shows_tid2eid_routes(tiny256, cache):
    fig = routing.router_heatmap(tiny256, cache, layer=0, batch=1)
    (heat,) = of_type(fig, "heatmap")
    assert "hash" in fig.layout.title.text
    table = tiny256.blocks[0].mlp.gate.tid2eid
    for p in (0, 21, 39):
        route = table[cache.tokens[1, p]].tolist()
        assert f"hash route: tid2eid[token] = [{route[0]}, {route[1]}]" in heat.text[p][3]
        assert labels(tiny256, cache, batch=1)[p] in heat.text[p][3]
    ids, weights = cache["blocks.0.mlp.hook_expert_ids"][1], cache["blocks.0.mlp.hook_expert_weights"][1]
    assert heat.z[21][int(ids[21, 1])] == pytest.approx(float(weights[21, 1]))


def test_router_heatmap_windows_long_inputs(tiny256, long_cache):
    fig = routing.router_heatmap(tiny256, long_cache, layer=3)
    (heat,) = of_type(fig, "heatmap")
    all_labels = labels(tiny256, long_cache)
    assert len(heat.z) == len(heat.y) == style.MAX_POSITIONS
    assert list(heat.y) == all_labels[300 - style.MAX_POSITIONS :]  # a window ending at the last token

    fig = routing.router_heatmap(tiny256, long_cache, layer=3, max_positions=50, focus=100)
    (heat,) = of_type(fig, "heatmap")
    assert list(heat.y) == all_labels[51:101]
    ids, weights = long_cache["blocks.3.mlp.hook_expert_ids"][0], long_cache["blocks.3.mlp.hook_expert_weights"][0]
    assert heat.z[0][int(ids[51, 0])] == pytest.approx(float(weights[51, 0]))
    assert len(of_type(fig, "scatter")[0].x) == 50 * tiny256.cfg.n_activated_experts

    hashed = routing.router_heatmap(tiny256, long_cache, layer=0, max_positions=50, focus=100)
    route = tiny256.blocks[0].mlp.gate.tid2eid[long_cache.tokens[0, 51]].tolist()
    assert f"tid2eid[token] = [{route[0]}, {route[1]}]" in hashed.data[0].text[0][0]
    assert all_labels[51] in hashed.data[0].text[0][0]


def test_expert_load_counts_and_mass(tiny256, cache):
    cfg = tiny256.cfg
    fig = routing.expert_load(tiny256, cache)
    (heat,) = fig.data
    z = torch.tensor(heat.z)
    assert z.shape == (cfg.n_layers, cfg.n_routed_experts)
    assert torch.equal(z, stats.expert_counts(tiny256, cache).float())
    assert (z.sum(-1) == 2 * 40 * cfg.n_activated_experts).all()
    assert ["hash" in y for y in heat.y] == [cfg.is_hash_layer(l) for l in range(cfg.n_layers)]
    assert heat.y[0].startswith("L0")

    fig = routing.expert_load(tiny256, cache, metric="weight_mass", normalize=True)
    share = torch.tensor(fig.data[0].z)
    mass = stats.expert_weight_mass(tiny256, cache)
    torch.testing.assert_close(share, mass / mass.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="metric"):
        routing.expert_load(tiny256, cache, metric="entropy")


def test_routed_vs_shared_share_definition(tiny256, cache):
    fig = routing.routed_vs_shared(tiny256, cache)
    routed, shared = of_type(fig, "bar")
    assert (routed.name, shared.name) == ("routed", "shared")
    assert len(shared.y) == tiny256.cfg.n_layers and fig.layout.barmode == "stack"
    for l in range(tiny256.cfg.n_layers):
        out, sh = cache[f"blocks.{l}.hook_mlp_out"].float(), cache[f"blocks.{l}.mlp.hook_shared_out"].float()
        r, s = (out - sh).norm(dim=-1), sh.norm(dim=-1)
        assert shared.y[l] == pytest.approx(float((s / (r + s)).mean()), rel=1e-5)
        assert routed.y[l] + shared.y[l] == pytest.approx(1.0)
    assert 0 < min(shared.y) and max(shared.y) < 1
    one = routing.routed_vs_shared(tiny256, cache, batch=1).data[1].y
    out, sh = cache["blocks.2.hook_mlp_out"][1].float(), cache["blocks.2.mlp.hook_shared_out"][1].float()
    assert one[2] == pytest.approx(
        float((sh.norm(dim=-1) / ((out - sh).norm(dim=-1) + sh.norm(dim=-1))).mean()), rel=1e-5
    )


# ----------------------------------------------------------------------------- mHC
def test_comb_grid_panels_values_and_slider(tiny256, cache):
    L, n = tiny256.cfg.n_layers, tiny256.cfg.hc_mult
    fig = mhc.comb_grid(tiny256, cache, position=-1, batch=1)
    heats = of_type(fig, "heatmap")
    assert len(heats) == 2 * L
    names = [f"blocks.{l}.{hc}" for hc in ("attn_hc", "mlp_hc") for l in range(L)]
    lab = labels(tiny256, cache, batch=1)
    for trace, name in zip(heats, names):
        assert name in trace.hovertemplate
        assert torch.tensor(trace.z).shape == (n, n)
        torch.testing.assert_close(torch.tensor(trace.z), cache[f"{name}.hook_comb"][1, -1].float())
        assert trace.meta == lab[-1]
    assert lab[-1] in fig.layout.title.text
    (slider,) = fig.layout.sliders
    assert len(slider.steps) == 40 and slider.active == 39
    step = slider.steps[7]
    assert step.label == lab[7] and step.args[1]["title.text"].endswith(lab[7])
    assert len(step.args[0]["z"]) == 2 * L
    torch.testing.assert_close(torch.tensor(step.args[0]["z"][L + 2]), cache["blocks.2.mlp_hc.hook_comb"][1, 7].float())
    assert step.args[0]["meta"][0] == lab[7]


def test_comb_grid_windows_layers_and_no_slider(tiny256, cache, long_cache):
    fig = mhc.comb_grid(tiny256, long_cache, position=200)
    steps = fig.layout.sliders[0].steps
    lab = labels(tiny256, long_cache)
    assert len(steps) == style.MAX_POSITIONS
    assert [s.label for s in steps] == lab[201 - style.MAX_POSITIONS : 201]
    assert fig.layout.sliders[0].active == style.MAX_POSITIONS - 1

    fig = mhc.comb_grid(tiny256, cache, position=4, layers=[1, 3], slider=False)
    assert len(of_type(fig, "heatmap")) == 4 and not fig.layout.sliders
    assert "blocks.3.attn_hc" in fig.data[1].hovertemplate
    torch.testing.assert_close(torch.tensor(fig.data[3].z), cache["blocks.3.mlp_hc.hook_comb"][0, 4].float())


def test_pre_post_weights_lines_match_hooks(tiny256, cache):
    L, n = tiny256.cfg.n_layers, tiny256.cfg.hc_mult
    fig = mhc.pre_post_weights(tiny256, cache, position=9, batch=1)
    lines = of_type(fig, "scatter")
    assert len(lines) == 2 * n
    pre, post = lines[:n], lines[n:]
    assert all(len(t.y) == 2 * L for t in lines)
    assert list(pre[0].x)[:3] == ["L0 attn", "L0 mlp", "L1 attn"]
    assert pre[2].y[3] == pytest.approx(float(cache["blocks.1.mlp_hc.hook_pre"][1, 9, 2]))
    assert post[1].y[4] == pytest.approx(float(cache["blocks.2.attn_hc.hook_post"][1, 9, 1]))
    assert labels(tiny256, cache, batch=1)[9] in pre[0].hovertemplate
    assert [t.showlegend for t in lines] == [True] * n + [False] * n  # one legend entry per stream

    mean = mhc.pre_post_weights(tiny256, cache, position=None)
    assert mean.data[n].y[0] == pytest.approx(float(cache["blocks.0.attn_hc.hook_post"][0, :, 0].mean()))
    assert "mean over 40 positions" in mean.layout.title.text


def test_stream_norms_through_depth(tiny256, cache):
    L, n = tiny256.cfg.n_layers, tiny256.cfg.hc_mult
    fig = mhc.stream_norms(tiny256, cache)
    lines = of_type(fig, "scatter")
    assert len(lines) == n and all(len(t.y) == 2 * L + 1 for t in lines)
    assert lines[0].x[0] == "embed" and lines[0].x[-1] == f"L{L - 1} mlp"
    embed = cache["blocks.0.hook_streams_pre"][0].norm(dim=-1).mean(0)
    assert lines[1].y[0] == pytest.approx(float(embed[1]), rel=1e-5)
    assert lines[3].y[5] == pytest.approx(
        float(cache["blocks.2.hook_streams_mid"][0, :, 3].norm(dim=-1).mean()), rel=1e-5
    )

    at = mhc.stream_norms(tiny256, cache, batch=1, position=-2)
    assert at.data[2].y[8] == pytest.approx(float(cache["blocks.3.hook_streams_post"][1, 38, 2].norm()), rel=1e-5)
    assert labels(tiny256, cache, batch=1)[38] in at.data[0].hovertemplate


def test_sinkhorn_convergence_matches_stats(tiny256, cache):
    fig = mhc.sinkhorn_convergence(tiny256, cache, layer=1, hc="attn_hc", position=12)
    row, col = of_type(fig, "scatter")
    trace = stats.sinkhorn_errors(tiny256, cache, "blocks.1.attn_hc")
    iters = tiny256.cfg.hc_sinkhorn_iters
    assert list(row.x) == list(range(1, iters + 1))
    torch.testing.assert_close(torch.tensor(row.y), trace.row_err[:, 0, 12].float())
    torch.testing.assert_close(torch.tensor(col.y), trace.col_err[:, 0, 12].float())
    assert row.y[0] > row.y[-1]  # it converges
    assert fig.layout.yaxis.type == "log"
    assert labels(tiny256, cache)[12] in fig.layout.title.text and labels(tiny256, cache)[12] in row.hovertemplate
    worst = mhc.sinkhorn_convergence(tiny256, cache, layer=1, position=None)
    torch.testing.assert_close(torch.tensor(worst.data[0].y), trace.row_err[:, 0].amax(-1).float())
    with pytest.raises(ValueError, match="hc"):
        mhc.sinkhorn_convergence(tiny256, cache, layer=1, hc="ffn_hc")


# ----------------------------------------------------------------------------- shared helpers
def test_missing_hook_and_bad_position_raise(tiny256, tokens_2x40):
    with torch.no_grad():
        _, partial = tiny256.run_with_cache(tokens_2x40, names_filter=lambda name: name.endswith("hook_comb"))
    with pytest.raises(KeyError, match="hook_expert_ids"):
        routing.router_heatmap(tiny256, partial, layer=1)
    with pytest.raises(IndexError):
        mhc.comb_grid(tiny256, partial, position=40)
    assert len(mhc.comb_grid(tiny256, partial).data) == 2 * tiny256.cfg.n_layers


def test_labels_are_printable():
    assert style.printable("a\x04b\x7f") == "a␄b␡"
    assert style.printable(style.printable("x\x00")) == "x␀"
