"""v4lens.stats: expert usage, hash vs learned routing, Sinkhorn, indexer recall, sink mass.

Each statistic is checked against an independent computation (python loops / sets on a few
tokens) or against a value forced by a hook edit, on the tiny256 model.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4lens import stats
from v4lens.model.indexer import visible_entries

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cache(tiny256, tokens_2x40):
    """Every hook any statistic reads, main blocks and the MTP block."""
    _, cache = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter(), mtp=True)
    return cache


# ---------------------------------------------------------------------- hooks needed
def test_names_filter_selects_exactly_the_needed_hooks(tiny256, tokens_2x40):
    keep = stats.names_filter("sink_mass", stats.expert_counts)
    assert keep("blocks.0.attn.hook_sink") and keep("mtp.0.attn.hook_sink") and keep("blocks.3.mlp.hook_expert_ids")
    assert not keep("blocks.0.attn.hook_sink_logit") and not keep("blocks.1.attn.indexer.hook_q")
    recall = stats.names_filter("indexer_recall")
    assert recall("blocks.1.attn.hook_q") and not recall("blocks.1.attn.indexer.hook_q")
    assert recall("blocks.1.attn.compressor.hook_kv") and not recall("blocks.1.attn.hook_kv")
    with pytest.raises(KeyError, match="no statistic"):
        stats.names_filter("nope")

    _, small = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter("sink_mass"))
    assert set(small.keys()) == {f"blocks.{l}.attn.hook_sink" for l in range(4)}
    stats.sink_mass(tiny256, small)  # enough for this one
    with pytest.raises(KeyError, match=r"blocks\.0\.mlp\.hook_expert_ids.*names_filter\('expert_counts'\)"):
        stats.expert_counts(tiny256, small)


def test_block_prefixes_include_mtp_only_when_cached(tiny256, cache, tokens_2x40):
    assert stats.block_prefixes(tiny256, cache) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "mtp.0"]
    _, main = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter("expert_counts"))
    assert stats.block_prefixes(tiny256, main) == [f"blocks.{l}" for l in range(4)]
    assert stats.expert_counts(tiny256, main).shape == (4, 8)


# ---------------------------------------------------------------------- 1. expert usage
def test_expert_counts_and_weight_mass(tiny256, cache):
    cfg = tiny256.cfg
    b, p, k, E = 2, 40, cfg.n_activated_experts, cfg.n_routed_experts
    counts = stats.expert_counts(tiny256, cache)
    assert counts.shape == (5, E) and counts.dtype == torch.long
    assert counts.sum(-1).tolist() == [b * p * k] * 5
    ids = cache["blocks.2.mlp.hook_expert_ids"]
    assert counts[2].tolist() == [int((ids == e).sum()) for e in range(E)]

    mass = stats.expert_weight_mass(tiny256, cache)
    torch.testing.assert_close(mass.sum(-1), torch.full((5,), b * p * cfg.route_scale), rtol=1e-5, atol=1e-4)
    weights = cache["blocks.2.mlp.hook_expert_weights"]
    torch.testing.assert_close(mass[2, 3], weights[ids == 3].sum())

    # token selection: positions, a [p] mask and a [b, p] mask
    assert stats.expert_counts(tiny256, cache, positions=range(10)).sum(-1).tolist() == [b * 10 * k] * 5
    first = torch.arange(p) < 10
    assert torch.equal(
        stats.expert_counts(tiny256, cache, mask=first), stats.expert_counts(tiny256, cache, positions=range(10))
    )
    row0 = torch.zeros(b, p, dtype=torch.bool)
    row0[0] = True
    assert torch.equal(stats.expert_counts(tiny256, cache, mask=row0)[2], torch.bincount(ids[0].flatten(), minlength=E))


def test_expert_counts_ignore_empty_slots(tiny256, tokens_2x40):
    def drop_second_slot(ids, hook):
        return torch.cat([ids[..., :1], torch.full_like(ids[..., 1:], -1)], dim=-1)

    with tiny256.hooks(fwd_hooks=[("blocks.1.mlp.hook_expert_ids", drop_second_slot)]):
        _, c = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter("expert_counts"))
    assert stats.expert_counts(tiny256, c).sum(-1).tolist() == [160, 80, 160, 160]


def test_balance_metrics_known_loads():
    m = stats.balance_metrics(torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0], [6, 2, 0, 0]]))
    torch.testing.assert_close(m["cv"], torch.tensor([0.0, math.sqrt(3), math.sqrt((16 + 0 + 4 + 4) / 4) / 2]))
    torch.testing.assert_close(m["max_over_mean"], torch.tensor([1.0, 4.0, 3.0]))
    torch.testing.assert_close(
        m["entropy_norm"], torch.tensor([1.0, 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)])
    )
    torch.testing.assert_close(m["frac_unused"], torch.tensor([0.0, 0.75, 0.5]))


def test_load_balance_and_usage_frames(tiny256, cache):
    df = stats.load_balance(tiny256, cache)
    assert df["routing"].tolist() == ["hash", "learned", "learned", "learned", "learned"]
    assert df["block"].tolist()[-1] == "mtp.0" and df["layer"].tolist() == [0, 1, 2, 3, 4]
    counts = stats.expert_counts(tiny256, cache)[3].double()
    assert df.loc[3, "cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()), rel=1e-5)
    assert df.loc[3, "max_over_mean"] == pytest.approx(float(counts.max() / counts.mean()), rel=1e-5)
    usage = stats.expert_usage(tiny256, cache)
    assert len(usage) == 5 * 8
    table = usage.pivot(index="layer", columns="expert", values="count")
    assert table.to_numpy().tolist() == stats.expert_counts(tiny256, cache).tolist()
    assert usage.groupby("layer")["frac"].sum().tolist() == pytest.approx([1.0] * 5)


# ---------------------------------------------------------------------- 2. hash vs learned
def test_hash_routing_by_hand(tiny256, cache, tokens_2x40):
    E, k = 8, 2
    h = stats.hash_routing(tiny256, cache, 0)
    scores = cache["blocks.0.mlp.hook_router_scores"]
    table = tiny256.blocks[0].mlp.gate.tid2eid
    assert torch.equal(cache["blocks.0.mlp.hook_expert_ids"], table[tokens_2x40])
    for bi, t in [(0, 0), (0, 17), (1, 5), (1, 39)]:
        used = set(table[tokens_2x40[bi, t]].tolist())
        row = scores[bi, t].tolist()
        learned = set(sorted(range(E), key=lambda e: -row[e])[:k])
        assert set(h.learned_ids[bi, t].tolist()) == learned
        assert int(h.overlap[bi, t]) == len(used & learned)
        assert float(h.jaccard[bi, t]) == pytest.approx(len(used & learned) / len(used | learned))
        assert float(h.hash_mass[bi, t]) == pytest.approx(sum(row[e] for e in used) / sum(row), rel=1e-5)
        assert float(h.topk_mass[bi, t]) == pytest.approx(sum(row[e] for e in learned) / sum(row), rel=1e-5)
    assert bool((h.topk_mass >= h.hash_mass - 1e-6).all())
    # both agreement extremes occur on these tokens, so the statistic is not constant
    assert int(h.overlap.min()) == 0 and int(h.overlap.max()) >= 1

    df = stats.hash_vs_learned(tiny256, cache)
    assert df["block"].tolist() == ["blocks.0"]
    assert df.loc[0, "agreement"] == pytest.approx(float(h.overlap.sum()) / (80 * k))
    assert df.loc[0, "exact_match"] == pytest.approx(float((h.overlap == k).float().mean()))
    assert df.loc[0, "mass_ratio"] == pytest.approx(float(h.hash_mass.mean() / h.topk_mass.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="not a hash-routed"):
        stats.hash_routing(tiny256, cache, 1)


def test_hash_routing_agrees_fully_when_hash_ids_are_the_topk(tiny256, tokens_2x40):
    def use_router(ids, hook):  # replace the hash ids by the router's own top-k
        return router["scores"].topk(ids.shape[-1], dim=-1).indices

    router = {}
    hooks = [("blocks.0.mlp.hook_router_scores", lambda s, hook: router.update(scores=s)),
             ("blocks.0.mlp.hook_hash_ids", use_router)]  # fmt: skip
    with tiny256.hooks(fwd_hooks=hooks):
        _, c = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter("hash_vs_learned"))
    df = stats.hash_vs_learned(tiny256, c)
    assert df.loc[0, "agreement"] == 1.0 and df.loc[0, "exact_match"] == 1.0 and df.loc[0, "jaccard"] == 1.0
    assert df.loc[0, "mass_ratio"] == pytest.approx(1.0)


# ---------------------------------------------------------------------- 3. Sinkhorn / mHC
def test_identity_comb_has_zero_distances(tiny256, tokens_2x40):
    eye = torch.eye(4)

    with tiny256.hooks(fwd_hooks=[("blocks.1.attn_hc.hook_comb", lambda comb, hook: eye.expand_as(comb).clone())]):
        _, c = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter("comb_stats"))
    s = stats.comb_stats(tiny256, c, "blocks.1.attn_hc")
    assert float(s.dist_identity.abs().max()) == 0.0
    assert float(s.dist_permutation.abs().max()) == 0.0
    assert bool((s.permutation == torch.arange(4)).all())
    assert float(s.row_entropy.abs().max()) == 0.0 and float(s.col_entropy.abs().max()) == 0.0
    # an unedited comb is nowhere near the identity
    other = stats.comb_stats(tiny256, c, "blocks.1.mlp_hc")
    assert float(other.dist_identity.min()) > 0.5 and float(other.dist_permutation.min()) > 0.5
    df = stats.sinkhorn_summary(tiny256, c, errors=False)
    assert df.loc[(df.block == "blocks.1") & (df.hc == "attn_hc"), "frac_identity"].item() == 1.0


def test_nearest_permutation_recovers_a_noisy_permutation():
    perm = torch.tensor([2, 0, 3, 1])
    P = torch.nn.functional.one_hot(perm, 4).float()
    noisy = 0.7 * P + 0.3 * torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    found, dist = stats.nearest_permutation(noisy)
    assert torch.equal(found, perm.expand(3, 4))
    torch.testing.assert_close(dist, torch.linalg.matrix_norm(noisy - P))
    # brute force over every permutation matrix gives the same minimum
    import itertools

    best = min(
        float(torch.linalg.matrix_norm(noisy[1] - torch.nn.functional.one_hot(torch.tensor(s), 4).float()))
        for s in itertools.permutations(range(4))
    )
    assert float(dist[1]) == pytest.approx(best)
    uniform = torch.full((4, 4), 0.25)
    assert float(stats.distance_to_identity(uniform)) == pytest.approx(math.sqrt(4 * 0.75**2 + 12 * 0.25**2))
    assert stats.comb_entropy(uniform).tolist() == pytest.approx([math.log(4)] * 4)


def test_sinkhorn_errors_decrease_and_match_the_cache(tiny256, cache):
    iters = tiny256.cfg.hc_sinkhorn_iters
    hcs = stats.hc_prefixes(tiny256, cache)
    assert len(hcs) == 10 and hcs[-1] == "mtp.0.mlp_hc"
    for hc in hcs:
        t = stats.sinkhorn_errors(tiny256, cache, hc)
        assert t.row_err.shape == (iters, 2, 40) == t.col_err.shape
        torch.testing.assert_close(t.comb, cache[f"{hc}.hook_comb"], rtol=0, atol=1e-6)
        row = t.row_err.amax((1, 2))
        assert float(row[0]) > 1e-2 and float(row[-1]) < 1e-5  # it starts far off and converges
        big = row > 1e-5  # until the fp32 / eps floor, every iteration improves on the last
        assert bool((row[1:][big[:-1]] < row[:-1][big[:-1]]).all())
        assert int(big.sum()) >= 3
        assert float(t.col_err.max()) < 1e-5  # the column step comes last
    df = stats.sinkhorn_summary(tiny256, cache)
    assert len(df) == 10 and bool((df.row_err_final < 1e-5).all()) and bool((df.row_err_first > 1e-2).all())
    assert bool((df.row_entropy < math.log(4)).all())


# ---------------------------------------------------------------------- 4. indexer recall
def test_indexer_recall(tiny256, cache):
    k = tiny256.cfg.index_topk
    visible = visible_entries(torch.arange(40), 4)
    for layer in (1, 3):
        r = stats.indexer_recall(tiny256, cache, layer)
        assert r.shape == (2, 40)
        assert bool(r[:, visible == 0].isnan().all())
        easy = (visible >= 1) & (visible <= k)  # the indexer takes every visible entry
        torch.testing.assert_close(r[:, easy], torch.ones_like(r[:, easy]))
        hard = r[:, visible > k]
        assert bool(((hard > 0) & (hard <= 1 + 1e-6)).all()) and float(hard.min()) < 0.9

        per_head = stats.indexer_recall(tiny256, cache, layer, per_head=True)
        assert per_head.shape == (2, 4, 40)
        torch.testing.assert_close(per_head.mean(1), r, equal_nan=True)

        q = cache[f"blocks.{layer}.attn.hook_q"]
        kv = cache[f"blocks.{layer}.attn.compressor.hook_kv"]
        picks = cache[f"blocks.{layer}.attn.indexer.hook_topk"]
        for bi, t in [(0, 20), (1, 31), (1, 39)]:
            n = (t + 1) // 4
            chosen = {w for w in picks[bi, t].tolist() if 0 <= w < n}
            for h in range(4):
                logits = [float(q[bi, t, h] @ kv[bi, w]) / math.sqrt(32) for w in range(n)]
                z = sum(math.exp(x) for x in logits)
                want = sum(math.exp(logits[w]) for w in chosen) / z
                assert float(per_head[bi, h, t]) == pytest.approx(want, rel=1e-5)

    df = stats.indexer_recall_summary(tiny256, cache)
    assert df["block"].tolist() == ["blocks.1", "blocks.3"]
    assert df["queries"].tolist() == [2 * int((visible > 0).sum())] * 2
    assert bool((df.recall_selective < df.recall).all())


def test_indexer_recall_is_zero_when_nothing_is_picked(tiny256, tokens_2x40):
    with tiny256.hooks(fwd_hooks=[("blocks.1.attn.indexer.hook_topk", lambda t, hook: torch.full_like(t, -1))]):
        _, c = tiny256.run_with_cache(tokens_2x40, names_filter=stats.names_filter("indexer_recall"))
    r = stats.indexer_recall(tiny256, c, "blocks.1")
    visible = visible_entries(torch.arange(40), 4)
    assert float(r[:, visible > 0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="not a CSA layer"):
        stats.indexer_recall(tiny256, c, 2)


# ---------------------------------------------------------------------- 5. sink mass
def test_sink_mass(tiny256, cache):
    sink = stats.sink_mass(tiny256, cache)
    assert sink.shape == (5, 4)
    for i, prefix in enumerate(stats.block_prefixes(tiny256, cache)):
        s = cache[f"{prefix}.attn.hook_sink"]
        torch.testing.assert_close(sink[i], s.mean((0, 2)))
        torch.testing.assert_close(
            stats.sink_mass(tiny256, cache, positions=[0, 7], layers=[prefix])[0], s[:, :, [0, 7]].mean((0, 2))
        )
    per_pos = stats.sink_mass(tiny256, cache, per_position=True)
    assert per_pos.shape == (5, 4, 40)
    torch.testing.assert_close(per_pos[1], cache["blocks.1.attn.hook_sink"].mean(0))
    df = stats.sink_mass_frame(tiny256, cache)
    assert len(df) == 20
    table = torch.tensor(df.pivot(index="layer", columns="head", values="sink_mass").to_numpy())
    torch.testing.assert_close(table, sink.double())
