"""A `V4KVCache` belongs to the model that filled it: continuing it with another model (other seed,
other config) or after editing the weights in place would mix two models' keys, so it is refused;
`restore()` takes only snapshots of the same cache. Also the weights fingerprint itself."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.model.fingerprint import model_identity, weights_fingerprint
from v4lens.model.kv_cache import V4KVCache

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))


def _prefill(model, tokens):
    cache = V4KVCache()
    with torch.no_grad():
        model(tokens[:, :8], past_kv_cache=cache)
    return cache


def test_continuing_with_another_seed_is_refused(tiny256, tokens):
    cache = _prefill(tiny256, tokens)
    other = v4lens.load("tiny", d_vocab=256, seed=1)
    with pytest.raises(ValueError, match="filled by another model.*weights"), torch.no_grad():
        other(tokens[:, 8:], past_kv_cache=cache)
    assert cache.length == 8  # untouched: the model that filled it can still continue


def test_continuing_with_another_config_is_refused(tiny256, tokens):
    big_vocab = v4lens.load("tiny", seed=0)  # same seed and preset, d_vocab 129280 instead of 256
    cache = _prefill(big_vocab, tokens)
    with pytest.raises(ValueError, match="filled by another model.*d_vocab"), torch.no_grad():
        tiny256(tokens[:, 8:], past_kv_cache=cache)


def test_the_same_model_or_an_identical_copy_continues(tiny256, tokens):
    with torch.no_grad():
        full = tiny256(tokens)
        cache = _prefill(tiny256, tokens)
        twin = v4lens.load("tiny", d_vocab=256, seed=0)  # another object, the same weights
        got = twin(tokens[:, 8:10], past_kv_cache=cache)
        got2 = tiny256(tokens[:, 10:], past_kv_cache=cache)
    torch.testing.assert_close(got, full[:, 8:10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, full[:, 10:], rtol=1e-5, atol=1e-5)


def test_weights_edited_in_place_between_chunks_are_refused(tokens):
    """In-place edits are seen through the parameters' version counters (not through `.data`)."""
    model = v4lens.load("tiny", d_vocab=256, seed=0)
    cache = _prefill(model, tokens)
    with torch.no_grad():
        model.blocks[1].attn.wkv.mul_(2.0)  # the cached keys were made with the old weights: stale
        with pytest.raises(ValueError, match="filled by another model.*weights"):
            model(tokens[:, 8:], past_kv_cache=cache)
        model.blocks[1].attn.wkv.div_(2.0)  # exactly back: the cache is valid again
        model(tokens[:, 8:], past_kv_cache=cache)
    fresh = V4KVCache()  # an empty cache binds to whatever model fills it first
    with torch.no_grad():
        model(tokens, past_kv_cache=fresh)


def test_restore_takes_only_this_caches_snapshots(tiny256, tokens):
    a, b = _prefill(tiny256, tokens), _prefill(tiny256, tokens)
    snap = a.snapshot()
    with pytest.raises(ValueError, match="snapshot of another V4KVCache"):
        b.restore(snap)
    with pytest.raises(TypeError, match="snapshot"):
        b.restore({"length": 3})
    with torch.no_grad():
        tiny256(tokens[:, 8:], past_kv_cache=a)
    a.restore(snap)
    assert a.length == 8


def test_fingerprint_is_deterministic_and_sees_the_weights(tiny256):
    again = v4lens.load("tiny", d_vocab=256, seed=0)
    assert weights_fingerprint(again) == weights_fingerprint(tiny256)
    assert weights_fingerprint(again) == model_identity(again)["fingerprint"]
    assert model_identity(again)["config"]["d_vocab"] == 256 and "device" not in model_identity(again)["config"]
    assert weights_fingerprint(v4lens.load("tiny", d_vocab=256, seed=1)) != weights_fingerprint(tiny256)
    with torch.no_grad():
        again.blocks[0].attn.wq_a[0, 0] += 1.0  # one element, sampled (the first one always is)
    assert weights_fingerprint(again) != weights_fingerprint(tiny256)


def test_a_config_edited_between_chunks_is_refused(tokens):
    model = v4lens.load("tiny", d_vocab=256, seed=0)
    cache = _prefill(model, tokens)
    model.cfg.window_size = 4  # the cached window was kept for 8
    with pytest.raises(ValueError, match="filled by another model.*window_size: 8 there, 4 here"), torch.no_grad():
        model(tokens[:, 8:], past_kv_cache=cache)
