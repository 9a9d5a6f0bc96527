"""The logits head: fp32 logits (as in DeepSeek's reference) for every position, shared with the MTP blocks."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .allocator import release_free_memory
from .linear import SWITCH_LOCK


def fp32_logits(h: torch.Tensor, weight: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """head · h in fp32 for every position: [..., d] x [V, d] -> [..., V] fp32.

    A bf16 head is upcast a vocabulary slice at a time, so no fp32 copy of the whole table exists
    (1024 rows, 6 MiB on mini-3b, stay in cache: a decoding step's head is 1.4x faster than
    with 4096, and long inputs are unaffected).
    When both operands hold bf16 values (a bf16 model), every product is exact in bf16, so on
    CPU oneDNN may multiply in bf16 while accumulating and writing fp32: the same fp32 logits up
    to summation order, about twice as fast as an fp32 GEMM.
    """
    if h.device.type == "cpu":
        # Logits that reach the mmap threshold (1 GiB: ~2,080 positions of a 129k vocabulary) first hand the heap's
        # freed temporaries back to the kernel; at 8k tokens on mini-3b the forward's peak drops by 1.2 GiB.
        release_free_memory(before_allocating=h.numel() // h.shape[-1] * weight.shape[0] * 4)
    h32 = h.float()
    if weight.dtype == torch.float32:
        return F.linear(h32, weight)
    out = h32.new_empty(h.shape[:-1] + (weight.shape[0],))  # written in place: no second logits tensor
    exact_in_bf16 = h.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
    with _bf16_products_fp32_sums(h.device, exact_in_bf16):
        for v0 in range(0, weight.shape[0], chunk):
            out[..., v0 : v0 + chunk] = F.linear(h32, weight[v0 : v0 + chunk].float())
    return out


@contextlib.contextmanager
def _bf16_products_fp32_sums(device: torch.device, enabled: bool):
    """Let CPU fp32 GEMMs multiply in bf16 (only used where the operands are bf16-valued, so exact)."""
    flag = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or device.type != "cpu" or flag is None or not torch.backends.mkldnn.is_available():
        yield
        return
    with SWITCH_LOCK:  # process-wide: a concurrent restore must not leave every fp32 product in bf16
        before = flag.fp32_precision
        flag.fp32_precision = "bf16"
        try:
            yield
        finally:
            flag.fp32_precision = before
