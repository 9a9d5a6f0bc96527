"""V4ActivationCache: stream-aware position/batch slicing, devices, short keys, stacking over
layers, block-boundary streams, and the logit / MTP lenses (v4lens.analysis.cache, v4lens.analysis.lens)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import v4lens
import v4lens.analysis.lens as lens_mod
from v4lens import V4ActivationCache
from v4lens.analysis.caching import caching_hooks, run_with_cache
from v4lens.analysis.layout import is_entry_name, is_stream_name, position_axis
from v4lens.model.head import fp32_logits

pytestmark = pytest.mark.usefixtures("single_thread")

B, S = 2, 40  # tokens_2x40


@pytest.fixture(scope="module")
def full(tiny256, tokens_2x40):
    """(logits, mtp_logits, cache) of a whole run with MTP, cached by v4lens.analysis.caching.run_with_cache."""
    (logits, (mtp_logits,)), cache = run_with_cache(tiny256, tokens_2x40, mtp=True)
    return logits, mtp_logits, cache


@pytest.fixture(scope="module")
def lens_all(full):
    """The logit lens over every position, logits kept (for checks against manual computations)."""
    return full[2].logit_lens(keep_logits=True)


def sliced(cache, name, index):
    """Manual position slicing of a full-cache entry with an index list, on its real position axis."""
    t, axis = cache[name], position_axis(name)
    return t if axis is None else t.index_select(axis, torch.as_tensor(index))


# ---------------------------------------------------------------------- position axes
def test_position_axis_matches_every_cached_tensor(full):
    cache = full[2]
    kinds = {"stream": 0, "head_first": 0, "entry": 0}
    for name, t in cache.items():
        axis = position_axis(name)
        if is_entry_name(name):
            assert axis is None, name
            assert t.shape[1] != S, name  # axis 1 really is entries here (T = 10 or 6)
            kinds["entry"] += 1
            continue
        assert t.shape[axis] == S, (name, tuple(t.shape), axis)
        if is_stream_name(name):
            assert t.ndim == 4 and axis == 1, name
            kinds["stream"] += 1
        if axis == 2:
            kinds["head_first"] += 1
    assert all(kinds.values()), kinds
    assert position_axis("blocks.0.hook_streams_post", has_batch_dim=False) == 0
    assert position_axis("blocks.0.attn.hook_sink_grad") == 2


@pytest.mark.parametrize("pos_slice, index", [(-1, [S - 1]), ([0, 5, 39], [0, 5, 39]), ((2, 10), list(range(2, 10)))])
def test_run_with_cache_pos_slice_equals_manual_slicing(tiny256, tokens_2x40, full, pos_slice, index):
    _, cache = run_with_cache(tiny256, tokens_2x40, mtp=True, pos_slice=pos_slice)
    ref = full[2]
    assert isinstance(cache, V4ActivationCache) and set(cache.keys()) == set(ref.keys())
    for name in ref:
        assert torch.equal(cache[name], sliced(ref, name, index)), name
    # the stream axes survive: [b, P, n, d]; entries are whole
    n, d = tiny256.cfg.hc_mult, tiny256.cfg.d_model
    assert cache["blocks.2.hook_streams_mid"].shape == (B, len(index), n, d)
    assert cache["mtp.0.hook_hidden"].shape == (B, len(index), n, d)
    assert cache["blocks.1.attn.hook_pattern"].shape[:3] == (B, tiny256.cfg.n_heads, len(index))
    assert cache["blocks.1.attn.compressor.hook_weights"] is not None
    assert torch.equal(cache["blocks.2.attn.compressor.hook_kv"], ref["blocks.2.attn.compressor.hook_kv"])
    assert cache.positions.tolist() == index


def test_apply_slice_to_pos_dim_composes_and_keeps_absolute_positions(full):
    cache = full[2]
    first = cache.apply_slice_to_pos_dim((10, 30))
    second = first.apply_slice_to_pos_dim([0, -1])
    assert second.positions.tolist() == [10, 29]
    for name in ("blocks.3.hook_streams_post", "blocks.1.attn.hook_sink", "blocks.1.attn.indexer.hook_topk",
                 "blocks.1.attn.indexer.hook_kv"):  # fmt: skip
        assert torch.equal(second[name], sliced(cache, name, [10, 29])), name
    assert second.tokens is cache.tokens


def test_caching_hooks_with_a_names_filter(tiny256, tokens_2x40, full):
    cache_dict, fwd, _ = caching_hooks(tiny256, names_filter=is_stream_name, pos_slice=[1, 2])
    with tiny256.hooks(fwd_hooks=fwd):
        tiny256(tokens_2x40)
    assert set(cache_dict) == {n for n in tiny256.hook_dict if is_stream_name(n) and not n.startswith("mtp.")}
    assert torch.equal(cache_dict["blocks.0.hook_streams_post"], full[2]["blocks.0.hook_streams_post"][:, 1:3])


def test_gradients_are_position_sliced_like_activations(tiny256, tokens_2x40):
    name = "blocks.1.hook_streams_post"
    _, whole = run_with_cache(tiny256, tokens_2x40, return_type="loss", incl_bwd=True, names_filter=[name])
    _, last = run_with_cache(tiny256, tokens_2x40, return_type="loss", incl_bwd=True, names_filter=[name], pos_slice=-1)
    assert last[name + "_grad"].shape == (B, 1, 4, 64)
    assert torch.equal(last[name + "_grad"], whole[name + "_grad"][:, -1:])


def test_model_run_with_cache_pos_slice(tiny256, tokens_2x40, full):
    _, cache = tiny256.run_with_cache(tokens_2x40, pos_slice=-1)
    assert torch.equal(cache["blocks.0.hook_streams_post"], full[2]["blocks.0.hook_streams_post"][:, -1:])
    assert torch.equal(cache["blocks.1.attn.hook_sink"], full[2]["blocks.1.attn.hook_sink"][:, :, -1:])


# ---------------------------------------------------------------------- batch axis, devices
def test_remove_batch_dim_both_ways(tiny256, tokens_2x40):
    one = tokens_2x40[:1]
    _, batched = run_with_cache(tiny256, one)
    _, direct = run_with_cache(tiny256, one, remove_batch_dim=True)
    later = batched.apply_slice_to_batch_dim((0, 1)).remove_batch_dim()
    assert not direct.has_batch_dim and not later.has_batch_dim
    assert direct["blocks.1.hook_streams_post"].shape == (S, tiny256.cfg.hc_mult, tiny256.cfg.d_model)
    for name in batched:
        assert torch.equal(direct[name], batched[name][0]) and torch.equal(later[name], batched[name][0]), name
    assert direct.tokens.shape == later.tokens.shape == (S,)
    # position slicing without a batch axis uses axis 0 (axis 1 for the head-first tensors)
    last = direct.apply_slice_to_pos_dim(-1)
    assert torch.equal(last["blocks.1.hook_streams_post"], batched["blocks.1.hook_streams_post"][0, -1:])
    assert torch.equal(last["blocks.1.attn.hook_pattern"], batched["blocks.1.attn.hook_pattern"][0, :, -1:])
    with pytest.raises(ValueError, match="batch size"):
        run_with_cache(tiny256, tokens_2x40, remove_batch_dim=True)


def test_apply_slice_to_batch_dim(full):
    cache = full[2]
    second = cache.apply_slice_to_batch_dim([1])
    assert isinstance(second, V4ActivationCache) and second.has_batch_dim
    assert torch.equal(second["blocks.2.hook_streams_pre"], cache["blocks.2.hook_streams_pre"][1:])
    assert torch.equal(second.tokens, cache.tokens[1:])
    item = cache.apply_slice_to_batch_dim(1)
    assert not item.has_batch_dim and item["blocks.1.attn.compressor.hook_kv"].ndim == 2
    assert torch.equal(item.tokens, cache.tokens[1])


def test_cache_on_cpu_and_to(tiny256, tokens_2x40, full):
    _, cache = run_with_cache(tiny256, tokens_2x40, device="cpu", names_filter=is_stream_name)
    assert all(t.device.type == "cpu" for t in cache.values()) and cache.tokens.device.type == "cpu"
    assert torch.equal(cache["blocks.3.hook_streams_post"], full[2]["blocks.3.hook_streams_post"])
    # TransformerLens's own path passes `device` through too
    _, tl_cache = tiny256.run_with_cache(tokens_2x40, device="cpu", names_filter="blocks.0.hook_streams_post")
    assert torch.equal(tl_cache["blocks.0.hook_streams_post"], full[2]["blocks.0.hook_streams_post"])
    # `to` moves the entries and the tokens, in place (meta: a second device on any machine)
    moved = cache.apply_slice_to_batch_dim([0]).to("meta")
    assert moved["blocks.0.hook_streams_post"].is_meta and moved.tokens.is_meta


# ---------------------------------------------------------------------- keys and stacking
def test_short_keys(full):
    cache = full[2]
    assert cache["streams_post", 2] is cache["blocks.2.hook_streams_post"]
    assert cache["attn_hc.hook_comb", -1] is cache["blocks.3.attn_hc.hook_comb"]
    assert cache["comb", 1, "mlp_hc"] is cache["blocks.1.mlp_hc.hook_comb"]
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]  # TransformerLens shorthand
    assert cache["attn_out", 0] is cache["blocks.0.hook_attn_out"]
    assert cache["topk", 1] is cache["blocks.1.attn.indexer.hook_topk"]  # unique suffix in the block
    with pytest.raises(KeyError, match="ambiguous"):
        cache["kv", 1]
    with pytest.raises(KeyError, match="streams_post"):
        cache["resid_post", 0]


def test_stack_activation(full):
    cache = full[2]
    streams = cache.stack_activation("hook_streams_post")
    comb = cache.stack_activation("attn_hc.hook_comb")
    assert streams.shape == (4, B, S, 4, 64) and comb.shape == (4, B, S, 4, 4)
    for l in range(4):
        assert torch.equal(streams[l], cache[f"blocks.{l}.hook_streams_post"])
        assert torch.equal(comb[l], cache[f"blocks.{l}.attn_hc.hook_comb"])
    assert torch.equal(cache.stack_activation("attn_out", layer=2)[1], cache["blocks.1.hook_attn_out"])
    topk = cache.stack_activation("attn.indexer.hook_topk", layers=[1, 3])  # CSA layers only
    assert torch.equal(topk[1], cache["blocks.3.attn.indexer.hook_topk"])
    with pytest.raises(KeyError, match=r"\[0, 2\]"):
        cache.stack_activation("attn.indexer.hook_topk")
    with pytest.raises(ValueError, match="different shapes"):  # CSA (T=10) vs HCA (T=6) entries
        cache.stack_activation("attn.compressor.hook_kv", layers=[1, 2])


def test_accumulated_streams(tiny256, tokens_2x40, full):
    cache = full[2]
    streams, labels = cache.accumulated_streams(return_labels=True)
    assert labels == ["embed", "0_post", "1_post", "2_post", "3_post"] and streams.shape == (5, B, S, 4, 64)
    embed = cache["hook_embed"][:, :, None, :].expand(-1, -1, 4, -1)
    assert torch.equal(streams[0], embed)
    assert torch.equal(streams[1:], cache.stack_activation("hook_streams_post"))
    mids, mid_labels = cache.accumulated_streams(layer=2, incl_mid=True, return_labels=True)
    assert mid_labels == ["embed", "0_mid", "0_post", "1_mid", "1_post"]
    assert torch.equal(mids[3], cache["blocks.1.hook_streams_mid"])
    # with only hook_embed cached, the embedding boundary is built from it
    _, small = run_with_cache(tiny256, tokens_2x40, names_filter=["hook_embed", "blocks.0.hook_streams_post"])
    assert torch.equal(small.accumulated_streams(layer=1)[0], embed)


# ---------------------------------------------------------------------- the logit lens
def test_lens_last_boundary_is_the_model_bit_exactly(full, lens_all):
    logits, _, cache = full
    assert lens_all.labels[-1] == "3_post" and lens_all.logits.shape == (5, B, S, 256)
    assert torch.equal(lens_all.logits[-1], logits)
    assert torch.equal(lens_all.logits[-1], cache["hook_logits"])


def test_lens_collapsed_and_per_stream_definitions(tiny256, full, lens_all):
    """Boundary 2 ("1_post") by hand: hc_head -> ln_final -> head; stream j: ln_final(X_j) -> head."""
    m, X = tiny256, full[2]["blocks.1.hook_streams_post"]
    flat = X.flatten(-2)
    mixes = (flat @ m.hc_head.fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + m.cfg.norm_eps)
    pre = torch.sigmoid(mixes * m.hc_head.scale + m.hc_head.base) + m.cfg.hc_eps
    y = torch.einsum("bpn,bpnd->bpd", pre, X)
    manual = fp32_logits(m.ln_final.w * y * torch.rsqrt(y.square().mean(-1, keepdim=True) + m.cfg.norm_eps),
                         m.head.weight)  # fmt: skip
    torch.testing.assert_close(lens_all.logits[2], manual, rtol=1e-5, atol=1e-5)
    each = lens_all.per_stream
    assert each.logits.shape == (5, B, S, 4, 256)
    for j in range(4):
        Xj = X[:, :, j]
        h = m.ln_final.w * Xj * torch.rsqrt(Xj.square().mean(-1, keepdim=True) + m.cfg.norm_eps)
        torch.testing.assert_close(each.logits[2, :, :, j], h @ m.head.weight.T, rtol=1e-5, atol=1e-5)
    # the embedding boundary: every stream is the embedding, so every stream reads the same
    assert torch.equal(each.logits[0, :, :, 0], each.logits[0, :, :, 3])
    # streams really differ after a block (the per-stream readout is not the collapsed one)
    assert not torch.allclose(each.logits[4, :, :, 0], each.logits[4, :, :, 1])


def test_topk_and_targets_consistent_with_logits(full, lens_all, tokens_2x40):
    for res in (lens_all, lens_all.per_stream):
        lp = res.log_probs
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]))
        top_lp, top_ids = lp.topk(5, dim=-1)
        assert torch.equal(res.top_ids, top_ids) and torch.equal(res.top_logprobs, top_lp)
        assert (res.top_logprobs.diff(dim=-1) <= 0).all()
    # targets: the next input token, none at the last position
    assert torch.equal(lens_all.targets[:, :-1], tokens_2x40[:, 1:]) and (lens_all.targets[:, -1] == -1).all()
    p = lens_all.target_probs
    assert p.shape == (5, B, S) and p[..., -1].isnan().all()
    valid = p[..., :-1]
    assert ((valid > 0) & (valid <= 1)).all()
    want = lens_all.log_probs[..., :-1, :].gather(-1, tokens_2x40[None, :, 1:, None].expand(5, -1, -1, -1))[..., 0]
    torch.testing.assert_close(lens_all.target_logprobs[..., :-1], want, rtol=0, atol=0)
    ranks = lens_all.target_ranks[..., :-1]
    assert ((ranks == 0) == (lens_all.top_ids[..., :-1, 0] == tokens_2x40[None, :, 1:])).all()
    assert (ranks >= 0).all() and (lens_all.target_ranks[..., -1] == -1).all()
    # per stream: targets broadcast over the stream axis
    assert lens_all.per_stream.target_logprobs.shape == (5, B, S, 4)


def test_lens_positions_reads_only_those(tiny256, full, lens_all, monkeypatch):
    shapes = []
    real = lens_mod.fp32_logits
    monkeypatch.setattr(lens_mod, "fp32_logits", lambda h, w: shapes.append(tuple(h.shape)) or real(h, w))
    few = full[2].logit_lens(positions=[3, -1], k=3)
    assert shapes and all(s[1] == 2 for s in shapes)  # never more than the 2 positions asked for
    assert few.logits is None and few.per_stream.logits is None  # keep_logits=False: nothing [B,b,P,V] kept
    assert few.top_ids.shape == (5, B, 2, 3) and few.positions.tolist() == [3, S - 1]
    torch.testing.assert_close(few.top_logprobs, lens_all.top_logprobs[:, :, [3, S - 1], :3])
    torch.testing.assert_close(few.target_probs[:, :, 0], lens_all.target_probs[:, :, 3], equal_nan=True)
    assert few.targets[:, 1].eq(-1).all()


def test_lens_targets_and_tokens(tiny256, tokens_2x40, full, lens_all):
    # a cache from HookedV4.run_with_cache may not know the tokens: no targets unless given
    _, cache = tiny256.run_with_cache(tokens_2x40, names_filter=is_stream_name)
    cache.tokens = None
    plain = cache.logit_lens(per_stream=False)
    assert plain.targets is None and plain.target_probs is None
    given = cache.logit_lens(tokens=tokens_2x40, per_stream=False)
    torch.testing.assert_close(given.target_probs, lens_all.target_probs, equal_nan=True)
    explicit = cache.logit_lens(targets=torch.zeros(S, dtype=torch.long), per_stream=False, keep_logits=True)
    torch.testing.assert_close(explicit.target_logprobs, explicit.log_probs[..., 0])
    with pytest.raises(ValueError, match="positions"):
        cache.logit_lens(tokens=tokens_2x40[:, :10])


def test_lens_strings_and_table(tiny256, lens_all):
    assert lens_all.top_strs[4][1][7] == tiny256.to_str_tokens(lens_all.top_ids[4, 1, 7])
    assert lens_all.per_stream.top_strs[2][0][5][3] == tiny256.to_str_tokens(lens_all.per_stream.top_ids[2, 0, 5, 3])
    table = lens_all.table(batch=1, position=7)
    assert isinstance(table, pd.DataFrame) and list(table.index) == lens_all.labels
    assert table["target_rank"].tolist() == lens_all.target_ranks[:, 1, 7].tolist()


def test_lens_on_batchless_and_pos_sliced_caches(tiny256, tokens_2x40, lens_all):
    _, one = run_with_cache(tiny256, tokens_2x40[1:], remove_batch_dim=True, pos_slice=(30, 40))
    res = one.logit_lens(k=5)
    assert res.top_ids.shape == (5, 10, 5) and res.targets.shape == (10,) and len(res.top_strs[0]) == 10
    torch.testing.assert_close(res.top_logprobs, lens_all.top_logprobs[:, 1, 30:])
    torch.testing.assert_close(res.target_probs, lens_all.target_probs[:, 1, 30:], equal_nan=True)
    assert res.per_stream.top_ids.shape == (5, 10, 4, 5)


def test_lens_incl_mid(full, lens_all):
    res = full[2].logit_lens(incl_mid=True, per_stream=False, decode=False, keep_logits=True)
    assert res.labels[:3] == ["embed", "0_mid", "0_post"] and len(res.labels) == 9
    assert torch.equal(res.logits[2], lens_all.logits[1]) and torch.equal(res.logits[-1], full[0])


def test_mtp_lens(tiny256, tokens_2x40, full):
    _, mtp_logits, cache = full
    res = cache.mtp_lens(0, keep_logits=True)
    assert res.labels == ["mtp0_pre", "mtp0_mid", "mtp0_post"]
    assert torch.equal(res.logits[-1], mtp_logits) and torch.equal(res.logits[-1], cache["mtp.0.hook_logits"])
    # depth 0 at position t predicts token t + 2
    assert torch.equal(res.targets[:, :-2], tokens_2x40[:, 2:]) and (res.targets[:, -2:] == -1).all()
    assert res.per_stream.top_ids.shape == (3, B, S, 4, 5)
    # the MTP block's own norm/hc_head are used, not the main model's
    main_read = lens_mod.read_collapsed(cache["mtp.0.hook_streams_post"], tiny256.hc_head, tiny256.ln_final,
                                        tiny256.head.weight)  # fmt: skip
    assert not torch.allclose(main_read, mtp_logits)
    _, no_mtp = run_with_cache(tiny256, tokens_2x40, names_filter=is_stream_name)
    with pytest.raises(KeyError, match="mtp=True"):
        no_mtp.mtp_lens(0)


# ---------------------------------------------------------------------- long inputs: disk offload
def test_offload_dir_keeps_the_cache_on_disk(tiny256, tokens_2x40, full, tmp_path):
    names = ["blocks.2.hook_streams_post", "blocks.1.attn.indexer.hook_topk", "blocks.2.attn.compressor.hook_kv",
             "blocks.1.attn.hook_pattern"]  # fmt: skip
    _, cache = run_with_cache(tiny256, tokens_2x40, mtp=True, names_filter=names, pos_slice=[3, 17, 39],
                              offload_dir=tmp_path)  # fmt: skip
    for name in names:
        t = cache[name]
        assert t.untyped_storage().filename == str(tmp_path / f"{name}.bin"), name  # memory-mapped, not in RAM
        assert torch.equal(t, sliced(full[2], name, [3, 17, 39])), name
    reopened = v4lens.open_offloaded(tmp_path, tiny256)
    assert sorted(reopened.keys()) == sorted(names)
    run_with_cache(tiny256, tokens_2x40, names_filter=names[:1], offload_dir=tmp_path)  # the directory reused
    assert list(v4lens.open_offloaded(tmp_path, tiny256).keys()) == names[:1]
    assert torch.equal(reopened.tokens, tokens_2x40) and reopened.positions.tolist() == [3, 17, 39]
    assert torch.equal(reopened["streams_post", 2], cache["streams_post", 2])


def test_long_input_recipe_stop_at_layer_and_no_logits(tiny256, tokens_2x40, full):
    """What a 32k run does (benchmarks/bench_long_context.py): only the early blocks, no logits."""
    out, cache = run_with_cache(tiny256, tokens_2x40, stop_at_layer=2, names_filter=is_stream_name, pos_slice=(30, 40))
    assert out.shape == (B, S, 4, 64) and torch.equal(out, full[2]["blocks.2.hook_streams_pre"])
    assert sorted(cache.keys()) == [f"blocks.{l}.hook_streams_{w}" for l in (0, 1) for w in ("mid", "post", "pre")]
    assert torch.equal(cache["streams_post", 1], full[2]["blocks.1.hook_streams_post"][:, 30:40])
