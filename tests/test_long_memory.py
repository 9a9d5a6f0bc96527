"""One long forward's memory grows linearly with the length: the HCA key index is built a query chunk at a time.

On an HCA layer each query's candidates are the window plus every visible compressed entry, so
the whole key index is [b, S, W + S/m] int64: S²/m. Built at once (with its copies) it made a
20k-token forward of `tiny` take +3 GB. With nothing hooked it is now built per query chunk
(`cfg.attn_chunk_size` rows); a hook on `attn.hook_key_index` (or on the scores / pattern / sink
built on it) still gets the whole tensor. Checked without timing or RSS: every int64 tensor the
forward creates is recorded (a TorchDispatchMode) and the largest must stay under chunk · S.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import v4lens

pytestmark = pytest.mark.usefixtures("single_thread")

S, CHUNK = 1200, 64


class LargestInt64(TorchDispatchMode):
    """Records the element count of the largest int64 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def model():
    return v4lens.load("tiny", d_vocab=256, seed=0, attn_chunk_size=CHUNK)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(0))


def hca_candidates(model) -> int:
    """K of the HCA layer with the smallest ratio at length S: window + every entry."""
    ratio = min(model.cfg.compress_ratio(i) for i in range(model.cfg.n_layers) if model.cfg.layer_type(i) == "hca")
    return model.cfg.window_size + S // ratio


def test_unhooked_forward_builds_no_whole_key_index(model, tokens):
    whole = S * hca_candidates(model)
    assert whole > 2 * CHUNK * S  # the bound below would catch the whole index
    with torch.no_grad(), LargestInt64() as seen:
        model(tokens, return_type=None)
    assert seen.largest <= CHUNK * S, f"an int64 tensor of {seen.largest} elements (whole key index: {whole})"


def test_hooked_key_index_is_still_whole(model, tokens):
    """The instrument sees the whole index when a hook asks for it (and the hook gets all of it)."""
    layer = next(i for i in range(model.cfg.n_layers) if model.cfg.layer_type(i) == "hca")
    shapes = []
    look = [(f"blocks.{layer}.attn.hook_key_index", lambda t, hook: shapes.append(t.shape))]
    with torch.no_grad(), LargestInt64() as seen:
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=look)
    assert shapes == [(1, S, hca_candidates(model))]
    assert seen.largest >= S * hca_candidates(model)


@pytest.mark.parametrize("hooked", ["attn.hook_key_index", "attn.hook_pattern"])
def test_chunked_key_index_gives_the_same_logits(model, hooked):
    """Built per chunk or whole (a hook that only looks), the logits are bit-identical."""
    tokens = torch.randint(0, 256, (2, 5 * CHUNK + 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        chunked = model(tokens)
        whole = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith(hooked), lambda t, hook: None)])
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
