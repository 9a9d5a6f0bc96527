"""v4lens.patching: activation-patching sweeps over V4's own mechanisms, hook helpers, and
attribution patching (AtP) checked against real patching."""

from __future__ import annotations

import itertools
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformer_lens import patching as tl_patching

import v4lens
from v4lens import patching as P
from v4lens.model.tl_versions import TL_VERSION

pytestmark = pytest.mark.usefixtures("single_thread")

S = 24  # CSA (entries every 4 tokens, top-3) is selective from query 15 on
POS = 10  # the one position where clean and corrupted tokens differ


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Logit difference of two fixed tokens at the last position (small values: little fp32 noise)."""
    return (logits[:, -1, 17] - logits[:, -1, 18]).mean()


def per_example(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 17] - logits[:, -1, 18]


def _runs(model, clean, corrupted):
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corr_logits, corr_cache = model.run_with_cache(corrupted)
    return SimpleNamespace(model=model, clean=clean, corrupted=corrupted, clean_cache=clean_cache,
                           corr_cache=corr_cache, clean_metric=float(metric(clean_logits)),
                           corr_metric=float(metric(corr_logits)))  # fmt: skip


def _pair(model, tokens, S=S):
    clean = tokens[:, :S].clone()
    corrupted = clean.clone()
    corrupted[:, POS] = (corrupted[:, POS] + 101) % 256
    return _runs(model, clean, corrupted)


@pytest.fixture(scope="module")
def pair(tiny256, tokens_2x40):
    return _pair(tiny256, tokens_2x40)


@pytest.fixture(scope="module")
def short(tiny256, tokens_2x40):
    """A 2×12 pair for the sweeps with a third axis (per stream, per head and position)."""
    return _pair(tiny256, tokens_2x40, S=12)


@pytest.fixture(scope="module")
def expert_model():
    """tiny256's weights, with the opt-in per-slot expert outputs (own copy: tests may freeze it)."""
    return v4lens.load("tiny", d_vocab=256, seed=0, use_expert_out=True)


@pytest.fixture(scope="module")
def expert_pair(expert_model, tokens_2x40):
    return _pair(expert_model, tokens_2x40)


def no_hooks_left(model) -> bool:
    points = model.hook_dict.values()
    mlp_pre = [b.mlp._forward_pre_hooks for b in model.blocks]
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in points) and not any(mlp_pre)


class Recorder:
    """The model, except that each patched forward also caches `names` (after the patch hooks, so
    the cache holds the patched values) in the order the sweep runs them."""

    def __init__(self, model, names):
        self.model, self.names, self.caches = model, set(names), []

    def __getattr__(self, attr):
        return getattr(self.model, attr)

    def run_with_hooks(self, tokens, fwd_hooks=()):
        with self.model.hooks(fwd_hooks=fwd_hooks):
            logits, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in self.names)
        self.caches.append(cache)
        return logits


# name template, extra kwargs, (rest index, activation) -> bool mask of the patched part
def _at_pos(r, a):
    m = torch.zeros(a.shape[:2], dtype=torch.bool)
    m[:, r[0]] = True
    return m.view(*m.shape, *[1] * (a.ndim - 2)).expand(a.shape)


def _at_index(r, a):  # [b, <r...>, ...]: r indexes the axes after batch
    m = torch.zeros(a.shape, dtype=torch.bool)
    m[(slice(None), *r)] = True
    return m


def _at_head_all_pos(r, a):
    m = torch.zeros(a.shape, dtype=torch.bool)
    m[:, :, r[0]] = True
    return m


# (sweep, kwargs, hook templates, mask, model fixture, pair fixture)
FAMILIES = {
    "streams_pre": (P.get_act_patch_streams, {}, ["hook_streams_pre"], _at_pos, "pair"),
    "streams_mid_per_stream": (P.get_act_patch_streams, {"where": "mid", "per_stream": True}, ["hook_streams_mid"],
                               _at_index, "short"),
    "attn_out": (P.get_act_patch_attn_out, {}, ["hook_attn_out"], _at_pos, "pair"),
    "mlp_out": (P.get_act_patch_mlp_out, {}, ["hook_mlp_out"], _at_pos, "pair"),
    "heads_all_pos": (P.get_act_patch_attn_head_out_all_pos, {}, ["attn.hook_z"], _at_head_all_pos, "pair"),
    "heads_by_pos": (P.get_act_patch_attn_head_out_by_pos, {}, ["attn.hook_z"], _at_index, "short"),
    "expert_slot": (P.get_act_patch_expert_out, {}, ["mlp.hook_expert_out"], _at_head_all_pos, "expert_pair"),
    "expert_slot_by_pos": (P.get_act_patch_expert_out, {"per_position": True}, ["mlp.hook_expert_out"],
                           _at_index, "expert_pair"),
    "routing": (P.get_act_patch_routing, {}, ["mlp.hook_expert_ids", "mlp.hook_expert_weights"], _at_pos, "pair"),
    "indexer_topk": (P.get_act_patch_indexer_topk, {}, ["attn.indexer.hook_topk"], _at_pos, "pair"),
    "hc_all": (P.get_act_patch_hc, {"what": ("pre", "post", "comb"), "hc": "both"},
               [f"{h}.hook_{w}" for h in ("attn_hc", "mlp_hc") for w in ("pre", "post", "comb")], _at_pos, "pair"),
}  # fmt: skip
SHAPES = {"streams_pre": "lp", "streams_mid_per_stream": "lpn", "attn_out": "lp", "mlp_out": "lp",
          "heads_all_pos": "lh", "heads_by_pos": "lph", "expert_slot": "lk", "expert_slot_by_pos": "lpk",
          "routing": "lp", "indexer_topk": "lp", "hc_all": "lp"}  # fmt: skip


def _shape(model, key, S):
    cfg = model.cfg
    size = {"l": cfg.n_layers, "p": S, "n": cfg.hc_mult, "h": cfg.n_heads, "k": cfg.n_activated_experts}
    return tuple(size[c] for c in SHAPES[key])


def _layers_with(model, templates):
    return [l for l in range(model.cfg.n_layers) if f"blocks.{l}.{templates[0]}" in model.hook_dict]


# ---------------------------------------------------------------------- real patching
@pytest.mark.parametrize("key", list(FAMILIES))
def test_clean_into_itself_is_the_clean_metric(key, request):
    fn, kw, templates, _, data = FAMILIES[key]
    d = request.getfixturevalue(data)
    res = fn(d.model, d.clean, d.clean_cache, metric, **kw)
    assert res.shape == _shape(d.model, key, d.clean.shape[1])
    layers = _layers_with(d.model, templates)
    absent = [l for l in range(d.model.cfg.n_layers) if l not in layers]
    assert torch.isnan(res[absent]).all() and not torch.isnan(res[layers]).any()
    torch.testing.assert_close(res[layers], torch.full_like(res[layers], d.clean_metric), atol=2e-6, rtol=0)
    assert no_hooks_left(d.model)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_each_patch_writes_exactly_its_index(key, request):
    """Through a cache of every patched forward: the hooked activation is the clean one at the
    patched index and the corrupted one everywhere else (and the metric moves somewhere)."""
    fn, kw, templates, mask_of, data = FAMILIES[key]
    d = request.getfixturevalue(data)
    names = [f"blocks.{l}.{t}" for l in range(d.model.cfg.n_layers) for t in templates]
    rec = Recorder(d.model, names)
    res = fn(rec, d.corrupted, d.clean_cache, metric, **kw)
    layers = _layers_with(d.model, templates)
    cells = [(l, *r) for l in layers for r in itertools.product(*(range(s) for s in res.shape[1:]))]
    assert len(rec.caches) == len(cells)
    for (layer, *rest), cache in zip(cells, rec.caches):
        for i, t in enumerate(templates):
            name = f"blocks.{layer}.{t}"
            got, clean, corr = cache[name], d.clean_cache[name], d.corr_cache[name]
            mask = mask_of(tuple(rest), got)
            assert torch.equal(got[mask], clean[mask]), (name, rest)
            if i == 0:  # the first hook in forward order; later ones also see its downstream effect
                assert torch.equal(got[~mask], corr[~mask]), (name, rest)
    assert (res[layers] - d.corr_metric).abs().max() > 1e-4


def test_routing_patch_keeps_the_corrupted_expert_computation(expert_pair):
    """Slot outputs at the patched position are the clean experts × clean weights applied to the
    corrupted input: recompute them by hand from the corrupted ffn-normed input."""
    d, layer, pos = expert_pair, 1, 20
    m = d.model
    p = f"blocks.{layer}.mlp."
    hooks = [(p + "hook_expert_ids", lambda a, hook: torch.where(_at_pos((pos,), a), d.clean_cache[hook.name], a)),
             (p + "hook_expert_weights", lambda a, hook: torch.where(_at_pos((pos,), a), d.clean_cache[hook.name], a))]  # fmt: skip
    with torch.no_grad(), m.hooks(fwd_hooks=hooks):
        _, cache = m.run_with_cache(d.corrupted, names_filter=lambda n: n.startswith(p) or "ln2" in n)
    x = cache[f"blocks.{layer}.ln2.hook_normalized"][:, pos]  # corrupted input (upstream of the patch)
    torch.testing.assert_close(x, d.corr_cache[f"blocks.{layer}.ln2.hook_normalized"][:, pos])
    ids, w = d.clean_cache[p + "hook_expert_ids"][:, pos], d.clean_cache[p + "hook_expert_weights"][:, pos]
    ex = m.blocks[layer].mlp.experts
    want = ex(x, ids, w, per_slot=True)
    torch.testing.assert_close(cache[p + "hook_expert_out"][:, pos], want)
    # and the sweep's cell equals this forward's metric
    with torch.no_grad():
        res = P.get_act_patch_routing(m, d.corrupted, d.clean_cache, metric)
        with m.hooks(fwd_hooks=hooks):
            direct = metric(m(d.corrupted))
    torch.testing.assert_close(res[layer, pos], direct)


@pytest.mark.parametrize("fn", ["get_act_patch_attn_out", "get_act_patch_mlp_out",
                                "get_act_patch_attn_head_out_all_pos"])  # fmt: skip
def test_same_values_as_transformer_lens(pair, fn):
    ours = getattr(P, fn)(pair.model, pair.corrupted, pair.clean_cache, metric)
    with torch.no_grad():
        theirs = getattr(tl_patching, fn)(pair.model, pair.corrupted, pair.clean_cache, metric)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.skipif(TL_VERSION < (4, 2), reason="PatchingResult came in TransformerLens 4.2")
def test_per_example_result_and_baseline(pair):
    res = P.get_act_patch_mlp_out(pair.model, pair.corrupted, pair.clean_cache, per_example, reduce="none",
                                  baseline=True)  # fmt: skip
    assert isinstance(res, tl_patching.PatchingResult)
    assert res.values.shape == (pair.model.cfg.n_layers, S, 2) and res.axis_names == ["layer", "pos"]
    torch.testing.assert_close(res.baseline.mean(), torch.tensor(pair.corr_metric))
    torch.testing.assert_close(res.effect()[:, :POS], torch.zeros(pair.model.cfg.n_layers, POS, 2), atol=1e-6,
                               rtol=0)  # fmt: skip
    scalar = P.get_act_patch_mlp_out(pair.model, pair.corrupted, pair.clean_cache, metric)
    torch.testing.assert_close(res.mean(), scalar)


def test_expert_out_needs_the_opt_in_hook(pair):
    with pytest.raises(ValueError, match="use_expert_out=True"):
        P.get_act_patch_expert_out(pair.model, pair.corrupted, pair.clean_cache, metric)
    with pytest.raises(ValueError, match="use_expert_out=True"):
        P.atp_expert_out(pair.model, pair.corrupted, pair.clean_cache, metric)


def test_mismatched_clean_cache_is_refused(pair, tokens_2x40):
    with pytest.raises(ValueError, match="same shape"):
        P.get_act_patch_attn_out(pair.model, tokens_2x40[:, :12], pair.clean_cache, metric)
    with pytest.raises(KeyError, match="run_with_cache"):
        P.get_act_patch_attn_out(pair.model, pair.corrupted, {}, metric)
    assert no_hooks_left(pair.model)


# ---------------------------------------------------------------------- hash routes
def test_hash_override_changes_only_matching_tokens(pair):
    m, tokens = pair.model, pair.corrupted
    tid2eid = m.blocks[0].mlp.gate.tid2eid
    before = tid2eid.clone()
    a, b = int(tokens[0, 3]), int(tokens[1, 5])
    c = next(t for t in range(256) if t not in (a, b) and (tokens == t).any())
    new_row = [(int(tid2eid[c, 0]) + 1) % 8, (int(tid2eid[c, 1]) + 3) % 8]
    with torch.no_grad():
        _, base = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("expert_ids"))
        with P.override_hash_routes(m, routes={c: new_row}, swap=(a, b)):
            _, cache = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("expert_ids"))
        hooks = P.hash_route_hooks(m, tokens, routes={c: new_row}, swap=(a, b))
        with m.hooks(fwd_hooks=hooks):
            _, cache2 = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("expert_ids"))
    assert torch.equal(tid2eid, before) and no_hooks_left(m)
    ids, old = cache["blocks.0.mlp.hook_expert_ids"], base["blocks.0.mlp.hook_expert_ids"]
    assert torch.equal(ids, cache2["blocks.0.mlp.hook_expert_ids"])
    expected = old.clone()
    expected[tokens == a] = before[b]
    expected[tokens == b] = before[a]
    expected[tokens == c] = torch.tensor(new_row)
    assert torch.equal(ids, expected)
    touched = (tokens == a) | (tokens == b) | (tokens == c)
    assert torch.equal(ids[~touched], old[~touched]) and not torch.equal(ids, old)


def test_hash_override_errors(pair):
    m = pair.model
    with pytest.raises(ValueError, match="hash layers: \\[0\\]"):
        P.hash_route_hooks(m, pair.corrupted, routes={5: [0, 1]}, layers=1)
    with pytest.raises(ValueError, match="expert ids"):
        P.hash_route_hooks(m, pair.corrupted, routes={5: [0, 99]})
    with pytest.raises(ValueError, match="once"):
        P.hash_route_hooks(m, pair.corrupted, routes={5: [0, 1]}, swap=(5, 6))
    with pytest.raises(RuntimeError, match="boom"), P.override_hash_routes(m, swap=(5, 6)):
        raise RuntimeError("boom")
    assert no_hooks_left(m)


# ---------------------------------------------------------------------- indexer picks
def test_force_exclude_and_include(pair):
    m, tokens, layer = pair.model, pair.corrupted, 1
    S_ = tokens.shape[1]
    queries = [19, 22, 23]
    names = lambda n: n.startswith(f"blocks.{layer}.attn.") and n.endswith(("key_index", "hook_topk", "scores"))
    with torch.no_grad():
        _, base = m.run_with_cache(tokens, names_filter=names)
        with P.force_indexer_picks(m, layer, exclude=[0, 1], queries=queries):
            _, ex = m.run_with_cache(tokens, names_filter=names)
    key, key0 = ex[f"blocks.{layer}.attn.hook_key_index"], base[f"blocks.{layer}.attn.hook_key_index"]
    assert not torch.isin(key[:, queries], torch.tensor([S_ + 0, S_ + 1])).any()
    assert torch.isin(key0[:, queries], torch.tensor([S_ + 0, S_ + 1])).any()  # the edit did remove something
    others = [q for q in range(S_) if q not in queries]
    assert torch.equal(key[:, others], key0[:, others])

    # include: entry 0 goes where the lowest-scoring pick was (query 23 sees 6 entries, picks 3)
    picks0 = base[f"blocks.{layer}.attn.indexer.hook_topk"]
    scores = base[f"blocks.{layer}.attn.indexer.hook_scores"]
    q = 23
    e = next(w for w in range(6) if not (picks0[:, q] == w).any(-1).any())  # picked by neither prompt
    with torch.no_grad(), P.force_indexer_picks(m, [layer], include=[e], queries=[q]):
        _, inc = m.run_with_cache(tokens, names_filter=names)
    picks = inc[f"blocks.{layer}.attn.indexer.hook_topk"]
    for bi in range(2):
        s = scores[bi, q, picks0[bi, q]]
        want = picks0[bi, q].clone()
        want[s.argmin()] = e
        assert torch.equal(picks[bi, q], want)
        assert (inc[f"blocks.{layer}.attn.hook_key_index"][bi, q] == S_ + e).any()
    assert torch.equal(picks[:, :q], picks0[:, :q])
    assert no_hooks_left(m)
    with pytest.raises(ValueError, match="no Lightning Indexer"):
        P.indexer_pick_hooks(m, 2, exclude=[0])
    with pytest.raises(ValueError, match="cannot force"), torch.no_grad(), \
            P.force_indexer_picks(m, layer, include=[0, 1, 2, 3], queries=[23]):  # fmt: skip
        m(tokens)
    assert no_hooks_left(m)


# ---------------------------------------------------------------------- sink and comb
def test_sink_ablation_empties_the_sink_of_that_head(pair):
    m, tokens = pair.model, pair.corrupted
    layer, head = 2, 1
    sink_param = m.blocks[layer].attn.attn_sink.detach().clone()
    with torch.no_grad(), m.hooks(fwd_hooks=P.sink_hooks(m, layer, heads=[head])):
        logits, cache = m.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_sink", "sink_logit")))
    sink = cache[f"blocks.{layer}.attn.hook_sink"]
    base = pair.corr_cache[f"blocks.{layer}.attn.hook_sink"]
    assert torch.equal(sink[:, head], torch.zeros_like(sink[:, head])) and (base[:, head] > 0).all()
    others = [h for h in range(m.cfg.n_heads) if h != head]
    torch.testing.assert_close(sink[:, others], base[:, others], atol=0, rtol=0)
    assert torch.equal(m.blocks[layer].attn.attn_sink, sink_param)  # parameter untouched
    res = P.get_act_patch_sink(m, tokens, None, metric)
    assert res.shape == (m.cfg.n_layers, m.cfg.n_heads)
    torch.testing.assert_close(res[layer, head], metric(logits))
    assert (res - pair.corr_metric).abs().max() > 1e-4
    # shift 0 / scale 1 is the identity: every cell is the corrupted metric
    same = P.get_act_patch_sink(m, tokens, None, metric, ablate=False)
    torch.testing.assert_close(same, torch.full_like(same, pair.corr_metric), atol=2e-6, rtol=0)


@pytest.mark.parametrize("value", ["identity", "uniform"])
def test_forced_comb_appears_in_the_cache(pair, value):
    m, tokens, n = pair.model, pair.corrupted, pair.model.cfg.hc_mult
    fixed = torch.eye(n) if value == "identity" else torch.full((n, n), 1 / n)
    with torch.no_grad(), m.hooks(fwd_hooks=P.comb_hooks(m, 2, value, hc="mlp_hc")):
        logits, cache = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_comb"))
    assert torch.equal(cache["blocks.2.mlp_hc.hook_comb"], fixed.expand(2, S, n, n))
    assert torch.equal(cache["blocks.2.attn_hc.hook_comb"], pair.corr_cache["blocks.2.attn_hc.hook_comb"])
    res = P.get_act_patch_hc_comb_fixed(m, tokens, None, metric, value, hc="mlp_hc")
    assert res.shape == (m.cfg.n_layers,)
    torch.testing.assert_close(res[2], metric(logits))


# ---------------------------------------------------------------------- attribution patching
def _near_cache(model, tokens, eps: float, names=None, seed=5):
    """A 'clean' cache a tiny step from the corrupted run: the same tokens with each activation
    named in `names` (default: the embedding) scaled by (1 + eps·noise)."""
    g = torch.Generator().manual_seed(seed)

    def nudge(act, hook):
        return act * (1 + eps * torch.randn(act.shape, generator=g))

    hooks = [(n, nudge) for n in (names or ["hook_embed"])]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model.run_with_cache(tokens)[1]


def _pearson(a, b):
    ok = ~torch.isnan(a)
    return float(torch.corrcoef(torch.stack([a[ok].flatten(), b[ok].flatten()]))[0, 1])


# (real sweep, AtP, kwargs, which activations the "clean" run nudges)
ATP = {
    "streams": (P.get_act_patch_streams, P.atp_streams, {}, None),
    "attn_out": (P.get_act_patch_attn_out, P.atp_attn_out, {}, None),
    "mlp_out": (P.get_act_patch_mlp_out, P.atp_mlp_out, {}, None),
    "heads": (P.get_act_patch_attn_head_out_all_pos, P.atp_attn_head_out_all_pos, {}, None),
    "expert_slots": (P.get_act_patch_expert_out, P.atp_expert_out, {}, None),
    "hc_all": (P.get_act_patch_hc, P.atp_hc, {"what": ("pre", "post", "comb"), "hc": "both"}, None),
    # small families: nudge their own activations (an embedding nudge moves them below fp32 noise)
    "expert_weights": (partial(P.get_act_patch_routing, what="weights"),
                       P.atp_expert_weights, {}, "mlp.hook_expert_weights"),
    "hc_pre": (P.get_act_patch_hc, P.atp_hc, {"what": "pre", "hc": "mlp_hc"}, "mlp_hc.hook_pre"),
    "hc_post": (P.get_act_patch_hc, P.atp_hc, {"what": "post"}, "attn_hc.hook_post"),
}  # fmt: skip


def frozen_decisions(model, tokens):
    """Hold every discrete choice (expert ids, indexer picks) at the unpatched run's: AtP is a
    linearisation and cannot see a patch flip a top-k choice (the random tiny model has exact
    ties: indexer scores of 0 where every ReLU is off)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("expert_ids", "hook_topk")))
    return model.hooks(fwd_hooks=[(n, lambda a, hook: cache[hook.name]) for n in cache.cache_dict])


@pytest.mark.parametrize("key", list(ATP))
def test_atp_tracks_real_patching_for_a_nearby_clean_run(expert_model, tokens_2x40, key):
    real_fn, atp_fn, kw, nudged = ATP[key]
    m, tokens = expert_model, tokens_2x40[:, :S]
    names = None if nudged is None else [f"blocks.{l}.{nudged}" for l in range(m.cfg.n_layers)]
    with frozen_decisions(m, tokens):
        near = _near_cache(m, tokens, 0.01 if nudged is None else 0.05, names)
        with torch.no_grad():
            base = metric(m(tokens))
        real = real_fn(m, tokens, near, metric, **kw) - base
        est = atp_fn(m, tokens, near, metric, **kw)
    assert est.shape == real.shape and torch.equal(torch.isnan(est), torch.isnan(real))
    assert _pearson(real, est) > 0.99, (_pearson(real, est), real, est)
    ok = ~torch.isnan(real)
    assert (real[ok] - est[ok]).abs().max() < 0.1 * real[ok].abs().max()
    assert no_hooks_left(m)


def test_atp_error_is_second_order(expert_model, tokens_2x40):
    """AtP is exact to first order: shrinking the clean-corrupted distance 4x shrinks the effects
    ~4x and the AtP error ~16x."""
    m, tokens = expert_model, tokens_2x40[:, :S]
    with frozen_decisions(m, tokens):
        with torch.no_grad():
            base = metric(m(tokens))
        out = {}
        for eps in (0.04, 0.01):
            near = _near_cache(m, tokens, eps)
            real = P.get_act_patch_attn_head_out_all_pos(m, tokens, near, metric) - base
            out[eps] = (real.abs().sum(), (real - P.atp_attn_head_out_all_pos(m, tokens, near, metric)).abs().sum())
    assert 3 < out[0.04][0] / out[0.01][0] < 5
    assert out[0.04][1] / out[0.01][1] > 10


def test_atp_sink_tracks_a_small_shift(pair):
    m, tokens = pair.model, pair.corrupted
    real = P.get_act_patch_sink(m, tokens, None, metric, shift=0.05) - pair.corr_metric
    est = P.atp_sink(m, tokens, None, metric, shift=0.05)
    assert est.shape == (m.cfg.n_layers, m.cfg.n_heads)
    assert _pearson(real, est) > 0.99
    with pytest.raises(ValueError, match="linearised"):
        P.atp_sink(m, tokens, None, metric)


def test_atp_comb_fixed_has_the_sweep_axes(pair):
    m = pair.model
    est = P.atp_hc_comb_fixed(m, pair.corrupted, None, metric, "identity")
    assert est.shape == (m.cfg.n_layers,) and torch.isfinite(est).all()


def test_atp_exact_identities(expert_pair):
    """What AtP guarantees exactly: zero for a clean run equal to the corrupted one, and additivity
    (it is linear in the patched difference, so cells sum to their unions)."""
    d = expert_pair
    m, args = d.model, (d.model, d.corrupted, d.clean_cache, metric)
    zero = P.atp_attn_out(m, d.corrupted, d.corr_cache, metric)
    assert torch.equal(zero, torch.zeros_like(zero))
    torch.testing.assert_close(P.atp_attn_head_out_by_pos(*args).sum(1), P.atp_attn_head_out_all_pos(*args))
    torch.testing.assert_close(P.atp_streams(*args, where="post", per_stream=True).sum(-1),
                               P.atp_streams(*args, where="post"))  # fmt: skip
    torch.testing.assert_close(P.atp_expert_out(*args, per_position=True).sum(1), P.atp_expert_out(*args))
    parts = sum(P.atp_hc(*args, what=w, hc=h) for w in ("pre", "post", "comb") for h in ("attn_hc", "mlp_hc"))
    torch.testing.assert_close(P.atp_hc(*args, what=("pre", "post", "comb"), hc="both"), parts)
    # per-example estimates average to the estimate of the batch-mean metric
    each = P.atp_mlp_out(m, d.corrupted, d.clean_cache, per_example, reduce="none")
    assert each.shape == (m.cfg.n_layers, S, 2)
    torch.testing.assert_close(each.mean(-1), P.atp_mlp_out(*args))
    assert all(p.grad is None for p in m.parameters())  # no side effect on parameters


def test_atp_errors_and_frozen_parameters(expert_pair):
    d = expert_pair
    m, args = d.model, (d.model, d.corrupted, d.clean_cache, metric)
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs gradients.*no_grad"):
        P.atp_attn_out(*args)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="needs gradients.*inference_mode"):
        P.atp_streams(*args)
    with pytest.raises(RuntimeError, match="differentiabl"):
        P.atp_mlp_out(m, d.corrupted, d.clean_cache, lambda logits: metric(logits).detach())
    assert no_hooks_left(m)
    # frozen parameters: the hooked activations are made to require grad, same estimates
    want = P.atp_hc(*args, what="comb")
    want_sink = P.atp_sink(m, d.corrupted, None, metric, shift=0.1)  # the sink logit is a parameter itself
    try:
        for p in m.parameters():
            p.requires_grad_(False)
        torch.testing.assert_close(P.atp_hc(*args, what="comb"), want)
        torch.testing.assert_close(P.atp_sink(m, d.corrupted, None, metric, shift=0.1), want_sink)
    finally:
        for p in m.parameters():
            p.requires_grad_(True)
    assert no_hooks_left(m)


def test_sweeps_require_eval_mode(pair):
    model = v4lens.load("tiny", d_vocab=256, seed=0).train()
    with pytest.raises(ValueError, match="eval"):
        P.get_act_patch_indexer_topk(model, pair.corrupted, pair.clean_cache, metric)
    with pytest.raises(ValueError, match="eval"):
        P.atp_attn_out(model, pair.corrupted, pair.clean_cache, metric)
