"""The opt-in compiled one-row head (`HookedV4.set_compiled_head`): the eager head's logits up to fp32
summation order where it runs (one position, CPU, bf16 table, no autograd), the eager head everywhere
else, and the eager head with one warning where compiling fails."""

from __future__ import annotations

import warnings

import pytest
import torch

import v4lens
from v4lens.model import head
from v4lens.model.kv_cache import V4KVCache

pytestmark = pytest.mark.usefixtures("single_thread")


def _decode(model, tokens, prefill: int, mtp: bool = False):
    """Logits (and MTP logits) of a prefill chunk then one token per step, concatenated over positions."""
    cache, main, drafts = V4KVCache(), [], []
    with torch.inference_mode():
        for lo, hi in [(0, prefill)] + [(s, s + 1) for s in range(prefill, tokens.shape[1])]:
            out = model(tokens[:, lo:hi], past_kv_cache=cache, mtp=mtp)
            main.append(out[0] if mtp else out)
            if mtp:
                drafts.append(out[1][0])
    return torch.cat(main, dim=1), (torch.cat(drafts, dim=1) if mtp else None)


@pytest.fixture(scope="module")
def bf16_model():
    return v4lens.load("tiny", d_vocab=256, seed=0, dtype=torch.bfloat16)


def test_compiled_head_gives_the_eager_logits_up_to_summation_order(bf16_model, monkeypatch):
    model = bf16_model
    tokens = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    eager, eager_mtp = _decode(model, tokens, 16, mtp=True)
    rows = []
    real = head._compiled_row_logits
    monkeypatch.setattr(head, "_compiled_row_logits", lambda h, w: rows.append(h.shape) or real(h, w))
    model.set_compiled_head(True)
    try:
        fast, fast_mtp = _decode(model, tokens, 16, mtp=True)
    finally:
        model.set_compiled_head(False)
    assert len(rows) == 2 * 5  # the main and the MTP head of each one-token step; never the 16-token prefill
    assert torch.equal(fast[:, :16], eager[:, :16])  # several positions: the eager head, bit for bit
    for a, b in ((fast, eager), (fast_mtp, eager_mtp)):
        assert a.dtype == torch.float32
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert model.compiled_head is False
    with pytest.raises(TypeError, match="True or False"):
        model.set_compiled_head("yes")


def test_compiled_head_only_where_it_applies(monkeypatch):
    """fp32 tables, several positions and autograd keep the eager head."""
    h, w16 = torch.randn(1, 1, 64).bfloat16(), torch.randn(256, 64).bfloat16()
    assert head._compilable(h, w16)
    assert not head._compilable(h, w16.float())
    assert not head._compilable(torch.randn(1, 2, 64).bfloat16(), w16)
    with torch.enable_grad():
        assert not head._compilable(h.requires_grad_(), w16)
    monkeypatch.setattr(head, "_compiled_row_logits", lambda h, w: pytest.fail("compiled head used"))
    model = v4lens.load("tiny", d_vocab=256, seed=0)  # fp32
    tokens = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(1))
    eager, _ = _decode(model, tokens, 16)
    model.set_compiled_head(True)
    assert torch.equal(_decode(model, tokens, 16)[0], eager)


def test_compiled_head_falls_back_to_the_eager_head_with_one_warning(bf16_model, monkeypatch):
    def no_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore lines")

        return run

    monkeypatch.setattr(head, "_compiled", {})  # a fresh process's state
    monkeypatch.setattr(head.torch, "compile", no_compiler)
    model = bf16_model
    tokens = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(2))
    eager, _ = _decode(model, tokens, 16)
    model.set_compiled_head(True)
    try:
        with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler: no working C\\+\\+ compiler found\\)") as seen:
            fallback, _ = _decode(model, tokens, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per process
            again, _ = _decode(model, tokens, 16)
    finally:
        model.set_compiled_head(False)
    assert len([w for w in seen if "set_compiled_head" in str(w.message)]) == 1
    assert torch.equal(fallback, eager) and torch.equal(again, eager)
