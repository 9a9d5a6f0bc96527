"""DSpark (the 0731 / 0813 block drafter) against the spec's equations, written here with plain torch ops
from the model's own parameters; the stages' mHC and MoE halves reuse the stage's sub-modules."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb

import v4lens

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    """tiny-dspark, d_vocab 256 (noise token 7), fp32, every parameter perturbed off its init. Read-only."""
    return perturb(v4lens.load("tiny-dspark", d_vocab=256, dspark_noise_token_id=7, seed=0), seed=3, scale=0.2).eval()


def _tokens(b: int, S: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, S), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the spec, independently
def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _rope(x, pos, freqs, inverse=False):
    """Rotate the trailing 2·len(freqs) channels, pairs (2i, 2i+1) as complex numbers, by exp(±i·pos·ω)."""
    r = 2 * freqs.shape[0]
    angle = pos.float()[:, None] * freqs  # [p, r/2]
    rot = torch.polar(torch.ones_like(angle), -angle if inverse else angle)
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 3) + (r // 2,)
    z = torch.view_as_complex(x[..., -r:].reshape(*x.shape[:-1], r // 2, 2).contiguous()) * rot.reshape(shape[1:])
    return torch.cat([x[..., :-r], torch.view_as_real(z).flatten(-2)], dim=-1)


def _dspark_attention(attn, x, pos, ctx_x, ctx_pos, cfg):
    """SPEC F3: K block queries over [context keys, all K block keys], sink, inverse RoPE, grouped output."""
    b, K, _ = x.shape
    H, c, G, eps = cfg.n_heads, cfg.head_dim, cfg.o_groups, cfg.norm_eps
    freqs = attn.freqs(x.device)
    q = (_rms(x @ attn.wq_a.T, attn.q_norm.w, eps) @ attn.wq_b.T).view(b, K, H, c)
    q = _rope(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps), pos, freqs)
    ctx = _rope(_rms(ctx_x @ attn.wkv.T, attn.kv_norm.w, eps), ctx_pos, freqs)  # [b,L,c]
    blk = _rope(_rms(x @ attn.wkv.T, attn.kv_norm.w, eps), pos, freqs)  # [b,K,c]
    keys = torch.cat([ctx, blk], dim=1)
    scores = torch.einsum("bkhc,bjc->bhkj", q, keys) / c**0.5
    sink = attn.attn_sink[None, :, None, None].expand(b, H, K, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    o = torch.einsum("bhkj,bjc->bkhc", probs, keys)
    o = _rope(o, pos, freqs, inverse=True).reshape(b, K, G, H * c // G)
    u = torch.einsum("bkgi,gri->bkgr", o, attn.wo_a.view(G, cfg.o_lora_rank, -1))
    return u.flatten(-2) @ attn.wo_b.T


def _stage(stage, streams, pos, ctx_x, ctx_pos, cfg):
    x, post, mixed = stage.attn_hc(streams)  # mHC and MoE halves: the stage's own modules
    a = _dspark_attention(stage.attn, stage.ln1(x), pos, ctx_x, ctx_pos, cfg)
    streams = mixed + post[..., None] * a[:, :, None]
    x, post, mixed = stage.mlp_hc(streams)
    return mixed + post[..., None] * stage.mlp(stage.ln2(x), None)[:, :, None]


def _reference(model, tokens):
    """SPEC F2-F4 -> (main_x, drafts, draft logits, confidences)."""
    cfg, ds = model.cfg, model.dspark
    b, S = tokens.shape
    K, W, n, eps = cfg.dspark_block_size, cfg.window_size, cfg.hc_mult, cfg.norm_eps
    names = [f"blocks.{l}.hook_streams_post" for l in cfg.dspark_target_layer_ids]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    main_hidden = torch.cat([cache[name].mean(dim=2) for name in names], dim=-1)  # [b,S,3D]
    main_x = _rms(main_hidden @ ds.main_proj.T, ds.main_norm.w, eps)
    p = S - 1
    ctx_pos = torch.arange(max(0, p - W + 1), p + 1)
    pos = torch.arange(p + 1, p + 1 + K)
    anchor = logits[:, -1].argmax(-1)
    block = torch.cat([anchor[:, None], torch.full((b, K - 1), cfg.dspark_noise_token_id)], dim=1)
    streams = model.embed.weight[block][:, :, None].repeat(1, 1, n, 1)
    for stage in ds.stages:
        streams = _stage(stage, streams, pos, main_x[:, ctx_pos], ctx_pos, cfg)
    flat = streams.flatten(-2)  # hc_head (A9)
    mu = (flat @ ds.hc_head.fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(mu * ds.hc_head.scale + ds.hc_head.base) + cfg.hc_eps
    h = torch.einsum("bkn,bknd->bkd", pre, streams)
    U = _rms(h, ds.ln_final.w, eps) @ model.head.weight.T
    y, drafts, logit_rows, conf = anchor, [], [], []
    for k in range(K):
        e = ds.markov_w1[y]
        row = U[:, k] + e @ ds.markov_w2.T
        conf.append(torch.cat([h[:, k], e], dim=-1) @ ds.confidence_proj[0])
        y = row.argmax(-1)
        drafts.append(y), logit_rows.append(row)
    return main_x, torch.stack(drafts, 1), torch.stack(logit_rows, 1), torch.stack(conf, 1)


@pytest.mark.parametrize("S", [5, 13])  # prefill below and above the window (8)
def test_dspark_matches_the_spec(model, S):
    tokens = _tokens(2, S)
    with torch.no_grad():
        main_x, drafts, logits, conf = _reference(model, tokens)
        (main_logits, draft), cache = model.run_with_cache(tokens, draft=True, names_filter="dspark.hook_main_x")
    torch.testing.assert_close(main_logits, model(tokens))  # drafting leaves the main model alone
    torch.testing.assert_close(cache["dspark.hook_main_x"], main_x, rtol=1e-5, atol=1e-5)
    # ~1e-5 relative to the logits' scale: three stages of fp32 GEMMs in a different order
    scale = logits.abs().max()
    torch.testing.assert_close(draft.logits, logits, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(draft.confidences, conf, rtol=1e-5, atol=1e-5 * conf.abs().max())
    assert torch.equal(draft.tokens, drafts) and draft.tokens.dtype == torch.int64
    assert len(set(draft.tokens.flatten().tolist())) > 1  # a real walk, not a constant


def test_every_dspark_hook_has_its_shape(model):
    cfg = model.cfg
    b, S, K, V, D, T = 2, 11, cfg.dspark_block_size, cfg.d_vocab, cfg.d_model, len(cfg.dspark_target_layer_ids)
    L, n, H, c = cfg.window_size, cfg.hc_mult, cfg.n_heads, cfg.head_dim
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens(b, S), draft=True)
    expected = {
        "dspark.hook_taps": ((b, S, T, D), torch.float32), "dspark.hook_main_x": ((b, S, D), torch.float32),
        "dspark.hook_base_logits": ((b, K, V), torch.float32), "dspark.hook_markov_bias": ((b, K, V), torch.float32),
        "dspark.hook_draft_logits": ((b, K, V), torch.float32), "dspark.hook_confidence": ((b, K), torch.float32),
        "dspark.hook_drafts": ((b, K), torch.int64),
    }  # fmt: skip
    for s in range(cfg.n_mtp_layers):
        pre = f"dspark.stages.{s}."
        expected.update({
            pre + "hook_streams_pre": ((b, K, n, D), torch.float32), pre + "hook_streams_post": ((b, K, n, D), None),
            pre + "attn_hc.hook_comb": ((b, K, n, n), None), pre + "attn.hook_q": ((b, K, H, c), None),
            pre + "attn.hook_kv": ((b, K, c), None), pre + "attn.hook_context_kv": ((b, L, c), None),
            pre + "attn.hook_key_index": ((b, K, L + K), torch.int64),
            pre + "attn.hook_pattern": ((b, H, K, L + K), None), pre + "attn.hook_sink": ((b, H, K), None),
            pre + "mlp.hook_expert_ids": ((b, K, cfg.n_activated_experts), None),
        })  # fmt: skip
    for name, (shape, dtype) in expected.items():
        assert name in model.hook_dict and name in cache, name
        assert tuple(cache[name].shape) == shape, (name, tuple(cache[name].shape), shape)
        assert dtype is None or cache[name].dtype == dtype, (name, cache[name].dtype)
    index = cache["dspark.stages.0.attn.hook_key_index"][0, 0]  # main positions 3..10, then the block 11..15
    assert index.tolist() == list(range(S - L, S + K))


def test_block_attention_is_not_causal_and_never_touches_the_main_model(model):
    tokens = _tokens(2, 9, seed=1)
    names = ("dspark.stages.0.hook_streams_post", "dspark.stages.2.hook_streams_post")

    def nudge(streams, hook):
        streams[:, 3] += 0.5  # the third noise token's input, in every stream
        return streams

    with torch.no_grad():
        (logits, _), clean = model.run_with_cache(tokens, draft=True, names_filter=lambda n: n in names)
        model.add_hook("dspark.stages.0.hook_streams_pre", nudge)
        try:
            (logits2, _), edited = model.run_with_cache(tokens, draft=True, names_filter=lambda n: n in names)
        finally:
            model.reset_hooks()
    assert torch.equal(logits, logits2)
    for name in names:
        for i in range(3):  # earlier block positions see the later noise position
            assert not torch.allclose(clean[name][:, i], edited[name][:, i], atol=1e-6), (name, i)


def test_forcing_a_draft_changes_the_next_markov_step(model):
    tokens = _tokens(2, 7, seed=2)
    with torch.no_grad():
        (_, clean), cache = model.run_with_cache(tokens, draft=True)
        forced = (clean.tokens[:, 0] + 1) % model.cfg.d_vocab

        def force(drafts, hook):
            drafts[:, 0] = forced
            return drafts

        with model.hooks([("dspark.hook_drafts", force)]):
            (_, edited), cache2 = model.run_with_cache(tokens, draft=True)
    ds = model.dspark
    assert torch.equal(edited.tokens[:, 0], forced)
    bias = cache2["dspark.hook_markov_bias"][:, 1]
    torch.testing.assert_close(bias, ds.markov_w1[forced] @ ds.markov_w2.T)
    assert not torch.allclose(bias, cache["dspark.hook_markov_bias"][:, 1])
    base = cache2["dspark.hook_base_logits"][:, 1]
    assert torch.equal(edited.tokens[:, 1], (base + bias).argmax(-1))  # the walk continues from the forced token
    torch.testing.assert_close(edited.logits[:, 0], clean.logits[:, 0])  # step 0 precedes the forced token


def test_editing_main_x_changes_every_stage(model):
    tokens = _tokens(2, 10, seed=4)
    names = [f"dspark.stages.{s}.hook_attn_out" for s in range(model.cfg.n_mtp_layers)]

    def edit(main_x, hook):
        return main_x + 0.5 * torch.randn(main_x.shape, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        (logits, _), clean = model.run_with_cache(tokens, draft=True, names_filter=lambda n: n in names)
        with model.hooks([("dspark.hook_main_x", edit)]):
            (logits2, _), edited = model.run_with_cache(tokens, draft=True, names_filter=lambda n: n in names)
    assert torch.equal(logits, logits2)
    for name in names:
        assert not torch.allclose(clean[name], edited[name], atol=1e-6), name


def test_anchor_and_bad_draft_arguments(model):
    tokens = _tokens(1, 6, seed=5)
    with torch.no_grad():
        _, d = model(tokens, draft=True, draft_anchor=11)
        _, d2 = model(tokens, draft=True, draft_anchor=torch.tensor([12]))
    assert not torch.equal(d.logits, d2.logits)
    with pytest.raises(ValueError, match="draft=True"):
        model(tokens, mtp=True)
    with pytest.raises(ValueError, match="draft_anchor"):
        model(tokens, draft=True, draft_anchor=256)
    with pytest.raises(ValueError, match="draft_anchor"):
        model(tokens, draft_anchor=3)
    with pytest.raises(ValueError, match="DSpark"):
        v4lens.load("tiny", d_vocab=256)(tokens, draft=True)


def test_dspark_parameters_get_their_init():
    m = v4lens.load("tiny-dspark", d_vocab=256, dspark_noise_token_id=7)
    ds = m.dspark
    assert torch.equal(ds.main_norm.w, torch.ones_like(ds.main_norm.w))
    assert torch.equal(ds.ln_final.w, torch.ones_like(ds.ln_final.w))
    assert torch.equal(ds.stages[0].attn.attn_sink, torch.zeros_like(ds.stages[0].attn.attn_sink))
    for p in (ds.main_proj, ds.markov_w1, ds.markov_w2, ds.confidence_proj):
        assert 0 < p.std() < 0.1
    assert len(m.mtp) == 0 and m.cfg.draft == "dspark"


def test_the_drafter_holds_the_parameters_the_config_counts(model):
    """SPEC F4's tensor list: per stage a block, plus main_proj, main_norm, the last stage's norm and hc_head,
    the Markov and confidence heads (the config's count is computed from the spec, not from the module)."""
    counts = model.cfg.param_counts()
    drafter = sum(p.numel() for name, p in model.named_parameters() if name.startswith("dspark."))
    assert drafter == counts["total"] - counts["total_without_mtp"]
    assert all(s.attn.compressor is None and s.attn.indexer is None for s in model.dspark.stages)  # ratio 0
    assert not any(s.mlp.cfg.is_hash_layer(s.layer) for s in model.dspark.stages)  # score-routed


def test_position_slicing_leaves_the_draft_block_whole():
    """pos_slice selects input positions: the taps and main_x are sliced, the K draft-block tensors
    (drafts, logits, confidences, every stage hook) are kept whole."""
    model = v4lens.load("tiny-dspark", d_vocab=256, dspark_noise_token_id=7)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    (_, draft), cache = model.run_with_cache(tokens, draft=True, pos_slice=-1)
    K = model.cfg.dspark_block_size
    assert cache["dspark.hook_main_x"].shape[1] == 1 and cache["dspark.hook_taps"].shape[1] == 1
    assert cache["dspark.hook_drafts"].shape == (2, K)
    torch.testing.assert_close(cache["dspark.hook_drafts"], draft.tokens, rtol=0, atol=0)
    assert cache["dspark.stages.0.hook_streams_pre"].shape[1] == K
    assert cache["dspark.stages.2.attn.hook_pattern"].shape[2] == K
