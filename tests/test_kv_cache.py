"""Incremental decoding (v4lens.model.kv_cache): any chunking of the input, prefill + token-by-token
included, gives the logits, the hooked values and the discrete decisions of one full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb

import v4lens
from v4lens.analysis.caching import concat_chunk_tensors
from v4lens.model.kv_cache import V4KVCache

pytestmark = pytest.mark.usefixtures("single_thread")

S = 61  # tiny: window 8, CSA m=4 (top-3 of up to 15 entries), HCA m=6: many boundaries of each


@pytest.fixture(scope="module")
def model():
    # perturbed: no symmetric initial values (sinks, ape, biases) that could hide a misaligned state
    return perturb(v4lens.load("tiny", d_vocab=256, seed=0), seed=3)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(0))


def run_chunks(model, tokens, splits, cache=None, **kw):
    """Feed `tokens` in chunks of the given sizes through one cache; per-chunk outputs."""
    assert sum(splits) == tokens.shape[1]
    cache = V4KVCache() if cache is None else cache
    outs, s0 = [], 0
    for n in splits:
        outs.append(model(tokens[:, s0 : s0 + n], past_kv_cache=cache, **kw))
        s0 += n
    return outs, cache


SPLITS = {
    "one chunk": [S],
    "prefill 5 + token by token": [5] + [1] * (S - 5),
    "token by token": [1] * S,
    "ragged": [13, 1, 1, 7, 20, 3, 16],
    "windows": [3, 4, 5, 6, 7, 8, 9, 19],  # every chunk boundary lands differently against m=4, m=6, W=8
}


@pytest.mark.parametrize("name", SPLITS)
def test_chunked_logits_equal_one_forward(model, tokens, name):
    with torch.no_grad():
        full = model(tokens)
        outs, cache = run_chunks(model, tokens, SPLITS[name])
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == S and cache.batch == 2
    assert cache.layers[1].entries.shape[1] == S // 4 and cache.layers[2].entries.shape[1] == S // 6
    assert cache.layers[0].window.shape[1] == model.cfg.window_size - 1


def test_chunked_hooks_equal_one_forward(model, tokens):
    splits = SPLITS["ragged"]
    ends = torch.tensor(splits).cumsum(0).tolist()
    with torch.no_grad():
        _, full = model.run_with_cache(tokens)
        cache, caches, s0 = V4KVCache(), [], 0
        for n in splits:
            caches.append(model.run_with_cache(tokens[:, s0 : s0 + n], past_kv_cache=cache)[1])
            s0 += n
    compared = 0
    for name in full.keys():
        if name.startswith("mtp."):
            continue
        got = concat_chunk_tensors(name, [c[name] for c in caches], ends)
        if got.dtype in (torch.int64, torch.bool):
            assert torch.equal(got, full[name]), name  # expert ids, hash ids, indexer picks, key indices
        else:
            torch.testing.assert_close(got, full[name], rtol=1e-4, atol=1e-5, msg=name)
        compared += 1
    assert compared == len([n for n in full.keys() if not n.startswith("mtp.")]) > 150


def test_run_with_cache_in_chunks_equals_one_forward(model, tokens, tmp_path):
    """run_with_cache(chunk_len=...) runs the input through a V4KVCache and assembles one cache."""
    names = lambda n: not n.startswith("mtp.")  # noqa: E731
    keep = [0, 5, 23, 24, 60]
    with torch.no_grad():
        logits, full = model.run_with_cache(tokens, names_filter=names, pos_slice=keep)
        got_logits, chunked = model.run_with_cache(tokens, names_filter=names, pos_slice=keep, chunk_len=7,
                                                   offload_dir=tmp_path)  # fmt: skip
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert sorted(chunked.keys()) == sorted(full.keys()) and chunked.positions.tolist() == keep
    for name in full.keys():
        assert chunked[name].shape == full[name].shape, name
        if full[name].dtype == torch.int64:
            assert torch.equal(chunked[name], full[name]), name
        else:
            torch.testing.assert_close(chunked[name], full[name], rtol=1e-4, atol=1e-5, msg=name)
    assert chunked["blocks.1.hook_streams_post"].untyped_storage().filename  # offloaded after assembly
    with pytest.raises(ValueError, match="chunk_len"):
        model.run_with_cache(tokens, chunk_len=7, mtp=True)
    with pytest.raises(ValueError, match="return_type"):
        model.run_with_cache(tokens, chunk_len=7, return_type="loss")


def test_decode_step_sees_only_its_candidates(model, tokens):
    """A decoding step gathers W window keys + the CSA picks / the visible HCA entries: its cost does
    not grow with the square of the length (and the window state stays W-1 tokens)."""
    with torch.no_grad():
        cache = V4KVCache()
        model(tokens[:, :-1], past_kv_cache=cache)
        _, step = model.run_with_cache(tokens[:, -1:], past_kv_cache=cache)
    W = model.cfg.window_size
    assert step["blocks.0.attn.hook_key_index"].shape == (2, 1, W)
    assert step["blocks.1.attn.hook_key_index"].shape == (2, 1, W + model.cfg.index_topk)
    assert step["blocks.2.attn.hook_key_index"].shape == (2, 1, W + S // 6)
    assert step["blocks.1.attn.compressor.hook_kv"].shape[1] == 0  # t = 60 completes no window (59 did)
    assert step["blocks.1.attn.indexer.hook_scores"].shape == (2, 1, S // 4)
    window = step["blocks.0.attn.hook_key_index"][0, 0]
    assert window.tolist() == list(range(S - W, S))


@pytest.mark.parametrize("mtp_ratio", [0, 4, 6])
def test_mtp_logits_match_except_where_a_chunk_ended_on_a_draft(model, tokens, mtp_ratio):
    """The MTP block at t reads token t+1; at a chunk's last position that token is a draft, so
    there (only there) the chunked value differs, and the next chunk recomputes it correctly.
    With a CSA or HCA MTP block its compressor and indexer keep the draft position out of their state."""
    if mtp_ratio:
        model = perturb(v4lens.load("tiny", d_vocab=256, seed=0, compress_ratios=(0, 4, 6, 4, mtp_ratio)), seed=3)
    splits = SPLITS["ragged"]
    with torch.no_grad():
        _, (full,) = model(tokens, mtp=True)
        outs, _ = run_chunks(model, tokens, splits, mtp=True)
    got = torch.cat([o[1][0] for o in outs], dim=1)
    exact = torch.ones(S, dtype=torch.bool)
    exact[torch.tensor(splits).cumsum(0)[:-1] - 1] = False
    torch.testing.assert_close(got[:, exact], full[:, exact], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, ~exact], full[:, ~exact], atol=1e-3)
    with torch.no_grad():  # and the main logits are unaffected by running the MTP block
        torch.testing.assert_close(torch.cat([o[0] for o in outs], dim=1), model(tokens), rtol=1e-5, atol=1e-5)


def test_hook_edits_are_what_the_cache_keeps(model, tokens):
    """Edits flow downstream into the cache: zeroing the window key of token 9 and compressed entry 2
    in one chunk changes later chunks exactly as the same edit changes one full forward."""

    def edit(absolute_start: int):
        def zero_kv(kv, hook):
            p = 9 - absolute_start
            if 0 <= p < kv.shape[1]:
                kv = kv.clone()
                kv[:, p] = 0
            return kv

        def zero_entry(entries, hook):
            # in a chunk the hook sees the entries it emits: entry w is row w - (entries before the chunk)
            w = 2 - absolute_start // 4
            if 0 <= w < entries.shape[1]:
                entries = entries.clone()
                entries[:, w] = 0
            return entries

        return [("blocks.1.attn.hook_kv", zero_kv), ("blocks.1.attn.compressor.hook_kv", zero_entry)]

    with torch.no_grad():
        full = model.run_with_hooks(tokens, fwd_hooks=edit(0))
        assert not torch.allclose(full, model(tokens), atol=1e-3)
        cache, outs = V4KVCache(), []
        for s0, s1 in [(0, 12), (12, 13), (13, S)]:
            with model.hooks(fwd_hooks=edit(s0)):
                outs.append(model(tokens[:, s0:s1], past_kv_cache=cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_snapshot_restore_undoes_a_chunk(model, tokens):
    with torch.no_grad():
        cache = V4KVCache()
        model(tokens[:, :30], past_kv_cache=cache)
        snap = cache.snapshot()
        wrong = tokens[:, 30:33].flip(0)  # another continuation
        model(wrong, past_kv_cache=cache)
        assert cache.length == 33
        cache.restore(snap)
        assert cache.length == 30
        rest = model(tokens[:, 30:], past_kv_cache=cache)
        torch.testing.assert_close(rest, model(tokens)[:, 30:], rtol=1e-5, atol=1e-5)


def test_bf16_chunked_is_as_close_as_bf16_itself(tokens):
    """In bf16 a decoding step multiplies other shapes than the full forward (other rounding): the
    chunked logits stay within the distance bf16 rounding itself puts between a bf16 and an fp32 run."""
    fp32 = perturb(v4lens.load("tiny", d_vocab=256, seed=0), seed=3)
    with torch.no_grad():
        reference = fp32(tokens)
        bf16 = fp32.to(torch.bfloat16)
        full = bf16(tokens)
        outs, _ = run_chunks(bf16, tokens, SPLITS["prefill 5 + token by token"])
    got = torch.cat(outs, dim=1)
    rounding = (full - reference).norm(dim=-1)  # per position
    assert (got - full).norm(dim=-1).mean() < 2 * rounding.mean()
    assert ((got - reference).norm(dim=-1) < 3 * rounding.max()).all()


def test_cache_errors(model, tokens):
    with torch.no_grad():
        cache = V4KVCache()
        model(tokens[:, :10], past_kv_cache=cache)
        with pytest.raises(ValueError, match="batch of 2"):
            model(tokens[:1, 10:12], past_kv_cache=cache)
        with pytest.raises(ValueError, match="every earlier chunk run with mtp=True"):
            model(tokens[:, 10:12], past_kv_cache=cache, mtp=True)
        with pytest.raises(ValueError, match="stop_at_layer"):
            model(tokens[:, 10:12], past_kv_cache=cache, stop_at_layer=2)
        assert cache.length == 10  # nothing ran

        def reach_back(index, hook):  # token 0 left the window state long ago
            index = index.clone()
            index[..., 0] = 0
            return index

        model(tokens[:, 10:30], past_kv_cache=cache)
        with pytest.raises(ValueError, match=r"candidate 0 does not exist here \(tokens 23\.\.30"):
            model.run_with_hooks(tokens[:, 30:31], past_kv_cache=cache, fwd_hooks=[("blocks.0.attn.hook_key_index", reach_back)])
    assert not model.hook_dict["blocks.0.attn.hook_key_index"]._forward_hooks


def test_a_failing_chunk_leaves_the_cache_as_it_was(model, tokens):
    def boom(x, hook):
        raise RuntimeError("hook failed")

    with torch.no_grad():
        cache = V4KVCache()
        model(tokens[:, :20], past_kv_cache=cache)
        layers = dict(cache.layers)
        with pytest.raises(RuntimeError, match="hook failed"):
            model.run_with_hooks(tokens[:, 20:30], past_kv_cache=cache, fwd_hooks=[("blocks.2.hook_attn_out", boom)])
        assert cache.length == 20 and all(cache.layers[k] is v for k, v in layers.items())
        rest = model(tokens[:, 20:], past_kv_cache=cache)
    torch.testing.assert_close(rest, model(tokens)[:, 20:], rtol=1e-5, atol=1e-5)
    assert not model.hook_dict["blocks.2.hook_attn_out"]._forward_hooks


def test_stop_at_layer_returns_the_streams(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "streams" in n)
        for layer in (0, 2, -1):
            got = model(tokens, stop_at_layer=layer)
            torch.testing.assert_close(got, cache[f"blocks.{layer % 4}.hook_streams_pre"])
        _, early = model.run_with_cache(tokens, stop_at_layer=2)
    assert "blocks.1.hook_streams_post" in early.keys() and "blocks.2.hook_streams_pre" not in early.keys()


def test_logits_to_keep_runs_the_heads_on_the_last_positions(model, tokens):
    with torch.no_grad():
        logits, (mtp,) = model(tokens, mtp=True)
        last, (mtp_last,) = model(tokens, mtp=True, logits_to_keep=3)
        _, cache = model.run_with_cache(tokens, logits_to_keep=1, names_filter="ln_final.hook_normalized")
    torch.testing.assert_close(last, logits[:, -3:])
    torch.testing.assert_close(mtp_last, mtp[:, -3:])
    assert cache["ln_final.hook_normalized"].shape[1] == 1
    with pytest.raises(ValueError, match="loss"):
        model(tokens, return_type="loss", logits_to_keep=1)
