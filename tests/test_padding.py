"""Ragged batches: each row's logits and hooked values at its real positions equal that row run alone,
in `forward` (right or left padding, an `attention_mask` or `padding_side`), `run_with_cache` (right
padding; left padding with hooks attached is refused) and `generate` (rows of different lengths continue
exactly as if generated alone)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTHS = (40, 23, 9)  # 23: not a multiple of the CSA (m=4) or HCA (m=6) block; 9: one window (W=8) and a bit


@pytest.fixture(scope="module")
def rows(tokens_2x40):
    """Three prompts of different lengths; no token equals the pad id (2), so pads are recognisable."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 256, (n,), generator=g) for n in LENGTHS]


def padded(rows, side: str, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> (tokens [b, max], mask [b, max]) padded on `side`."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        at = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, at], mask[i, at] = r, True
    return tokens, mask


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_with_a_mask_equals_each_row_alone(tiny256, rows, side):
    tokens, mask = padded(rows, side)
    alone = [tiny256(r[None])[0] for r in rows]  # [n, V] each
    logits = tiny256(tokens, attention_mask=mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i][mask[i]], alone[i])
    if side == "left":  # without the mask the pads shift every position: the test can fail
        assert not torch.allclose(tiny256(tokens)[1][mask[1]], alone[1], atol=1e-3)
        # padding_side="left" reads the same mask off the leading pad tokens
        torch.testing.assert_close(tiny256(tokens, padding_side="left"), logits, rtol=0, atol=0)
    # the last position of every row, the stop_at_layer streams, and TransformerLens's masked loss
    last = tiny256(tokens, attention_mask=mask, logits_to_keep=1)
    if side == "left":
        torch.testing.assert_close(last[:, 0], torch.stack([a[-1] for a in alone]))
    streams = tiny256(tokens, attention_mask=mask, stop_at_layer=2)
    torch.testing.assert_close(streams[1][mask[1]], tiny256(rows[1][None], stop_at_layer=2)[0])
    per_row = [tiny256(r[None], return_type="loss", loss_per_token=True)[0] for r in rows]
    loss = tiny256(tokens, attention_mask=mask, return_type="loss")
    torch.testing.assert_close(loss, torch.cat(per_row).mean())
    both_logits, both_loss = tiny256(tokens, attention_mask=mask, return_type="both")
    torch.testing.assert_close(both_loss, loss)
    torch.testing.assert_close(both_logits, logits)


@torch.no_grad()
def test_right_padded_run_with_cache_equals_each_row_alone_and_left_with_hooks_is_refused(tiny256, rows):
    tokens, mask = padded(rows, "right")
    names = ["blocks.1.hook_streams_post", "blocks.2.hook_attn_out", "blocks.3.attn.indexer.hook_topk",
             "blocks.3.mlp.hook_expert_ids", "blocks.0.mlp.hook_hash_ids", "hook_logits"]  # fmt: skip
    _, cache = tiny256.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    for i, r in enumerate(rows):
        _, alone = tiny256.run_with_cache(r[None], names_filter=names)
        for name in names:
            got, want = cache[name][i, : len(r)], alone[name][0]
            if name.endswith("hook_topk"):  # [p, min(k, entries)]: the longer batch has more entries
                assert bool((got[:, want.shape[-1] :] == -1).all())  # the slots alone lacks are empty
                got = got[:, : want.shape[-1]]
            torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}")
    left, left_mask = padded(rows, "left")
    with pytest.raises(ValueError, match="left-padded.*right"):
        tiny256.run_with_cache(left, attention_mask=left_mask, names_filter=names)
    with pytest.raises(ValueError, match="left-padded"):
        tiny256.run_with_hooks(left, padding_side="left", fwd_hooks=[("hook_embed", lambda t, hook: None)])
    assert not any(hp._forward_hooks for hp in tiny256.hook_dict.values())


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_continues_each_row_as_if_alone(tiny256, rows, use_cache):
    def halve(t, hook):  # an edit: the rows must see it as they would alone
        return t * 0.5

    hooks = [("blocks.2.hook_attn_out", halve)]
    alone = [
        tiny256.generate(r[None], 5, stop_at_eos=False, use_cache=use_cache, fwd_hooks=hooks)[0, len(r) :] for r in rows
    ]
    for side in ("left", "right"):
        tokens, mask = padded(rows, side)
        out = tiny256.generate(tokens, 5, attention_mask=mask, stop_at_eos=False, use_cache=use_cache,
                               fwd_hooks=hooks, return_type="generation")  # fmt: skip
        assert torch.equal(out.new_tokens, torch.stack(alone)), side
        assert torch.equal(out.tokens, torch.cat([tokens, out.new_tokens], dim=1))  # the input as given, then new
        assert out.forwards == 5 * len(set(LENGTHS))  # one forward per length per step
        by_pads = tiny256.generate(tokens, 5, padding_side=side, stop_at_eos=False, use_cache=use_cache,
                                   fwd_hooks=hooks)  # fmt: skip
        assert torch.equal(by_pads, out.tokens)


@torch.no_grad()
def test_generate_streams_and_stops_each_row(tiny256, rows):
    tokens, mask = padded(rows, "left")
    greedy = tiny256.generate(tokens, 4, attention_mask=mask, stop_at_eos=False, return_type="generation")
    eos = int(greedy.new_tokens[1, 1])  # row 1 stops after its second token
    seen = []
    out = tiny256.generate(
        tokens, 4, attention_mask=mask, eos_token_id=eos, stream=seen.append, return_type="generation"
    )
    assert torch.equal(torch.stack(seen, 1), out.new_tokens)
    alone = tiny256.generate(rows[1][None], 4, eos_token_id=eos, return_type="generation")
    assert torch.equal(out.new_tokens[1, : alone.new_tokens.shape[1]], alone.new_tokens[0])
    assert bool((out.new_tokens[1, 2:] == tiny256.cfg.pad_token_id).all())


def test_bad_masks_and_combinations_are_refused(tiny256, rows):
    from v4lens.model.kv_cache import V4KVCache

    tokens, mask = padded(rows, "left")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny256(tokens, attention_mask=mask[:, 1:])
    with pytest.raises(TypeError, match="attention_mask"):
        tiny256(tokens, attention_mask=mask.float())
    with pytest.raises(ValueError, match="0 and 1"):
        tiny256(tokens, attention_mask=mask.long() * 2)
    gap = mask.clone()
    gap[0, 5] = False
    with pytest.raises(ValueError, match="row 0 has 2 separate runs"):
        tiny256(tokens, attention_mask=gap)
    with pytest.raises(ValueError, match="row 2 has no real token"):
        tiny256(tokens, attention_mask=torch.cat([mask[:2], torch.zeros_like(mask[2:])]))
    for extra in ({"mtp": True}, {"past_kv_cache": V4KVCache()}):
        with pytest.raises(ValueError, match="padded batch"):
            tiny256(tokens, attention_mask=mask, **extra)
    with pytest.raises(ValueError, match="padding_side"):
        tiny256(tokens, padding_side="middle")
    with pytest.raises(ValueError, match="speculative=True and cache_steps=True"):
        tiny256.generate(tokens, 2, attention_mask=mask, cache_steps=True)
    # an all-ones mask is no padding: the cache and MTP work with it
    full = torch.ones(2, 12, dtype=torch.long)
    logits, _ = tiny256(tokens[:2, -12:], attention_mask=full, mtp=True, past_kv_cache=V4KVCache())
    assert logits.shape == (2, 12, 256)
