"""The MTP block against SPEC §A10's equations, composed from the model's own parts (HF has no MTP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import v4lens
from v4lens.model.block import Block
from v4lens.model.norm import rms_normalize


def test_mtp_matches_spec_equations():
    model = v4lens.load("tiny", d_vocab=512, seed=3)
    mtp = model.mtp[0]
    assert mtp.layer_type == "sliding" and not mtp.mlp.hashed  # ratio entry n_layers = 0; score-routed
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        (logits, (mtp_logits,)), cache = model.run_with_cache(tokens, mtp=True)
        S = tokens.shape[1]
        # inputs: final main streams at t, token t+1 (greedy draft after the last position)
        final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_streams_post"]
        nxt = torch.cat([tokens[:, 1:], logits[:, -1:].argmax(-1)], dim=1)
        e = mtp.enorm.w * rms_normalize(model.embed.weight[nxt], 1e-6)
        h = mtp.hnorm.w * rms_normalize(final, 1e-6)
        x0 = F.linear(e, mtp.e_proj)[:, :, None] + F.linear(h, mtp.h_proj)
        x1 = Block.forward(mtp, x0, torch.arange(S), None)
        # own hc_head (sigmoid + eps weights over one RMS statistic), own norm, shared fp32 head
        flat = x1.flatten(2)
        mixes = F.linear(flat, mtp.hc_head.fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
        pre = torch.sigmoid(mixes * mtp.hc_head.scale + mtp.hc_head.base) + 1e-6
        collapsed = (pre[..., None] * x1).sum(2)
        expected = F.linear(mtp.ln_final.w * rms_normalize(collapsed, 1e-6), model.head.weight)
    assert torch.allclose(cache["mtp.0.hook_streams_pre"], x0, atol=1e-6)
    assert torch.allclose(mtp_logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache["mtp.0.hook_logits"], mtp_logits)


def test_mtp_next_token_override_changes_only_the_last_position():
    model = v4lens.load("tiny", d_vocab=512)
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        logits, (draft,) = model(tokens, mtp=True)
        other = (logits[:, -1].argmax(-1) + 1) % 512
        _, (forced,) = model(tokens, mtp=True, mtp_next_tokens=other[:, None])
    # (not bit-equal: expert GEMMs see other batch sizes when the last token re-routes)
    assert torch.allclose(draft[:, :-1], forced[:, :-1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(draft[:, -1], forced[:, -1])


def test_mtp_shares_embedding_and_head_but_not_norms():
    model = v4lens.load("tiny", d_vocab=512)
    names = {n for n, _ in model.mtp[0].named_parameters()}
    assert "e_proj" in names and "h_proj" in names and "hc_head.fn" in names and "ln_final.w" in names
    assert not any("embed" in n or n.startswith("head") for n in names)
