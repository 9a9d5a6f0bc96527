"""Products with a weight matrix, on the CPU kernel that suits a single input row.

On CPU PyTorch sends every bf16 matrix product to oneDNN. For one input row (a decoding step's
projections, an expert that a single token chose) oneDNN reads the weight at about half the
speed of PyTorch's own GEMV kernel, and a decoding step is little else but such products. So a
one-row bf16 product runs with oneDNN switched off for that call. Both kernels multiply bf16
values exactly and accumulate in fp32; they may round the last bit of an output differently
(about one output in 10,000 in a test), which is within what bf16 itself changes. Wider products
(prefill, several tokens per expert) keep oneDNN, much faster there; fp32 products never use it.

PyTorch's switch is process-wide: during such a call, bf16 products that other threads run at
the same moment take PyTorch's kernel too (same values up to that last bit). The switch is
flipped under a lock, so concurrent calls here cannot leave it off; a switch the user turned
off (`torch.backends.mkldnn.flags(enabled=False)`) stays off.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

# Held while any of PyTorch's process-wide matmul switches is flipped (here and in head.py), so two
# threads can never restore each other's value and leave a switch changed. Re-entrant: a weight
# subclass may compute inside the call.
SWITCH_LOCK = threading.RLock()


def _one_bf16_row(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return rows == 1 and x.device.type == "cpu" and weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16


def _without_onednn(fn, *args):
    with SWITCH_LOCK:
        if not torch._C._get_mkldnn_enabled():
            return fn(*args)
        torch._C._set_mkldnn_enabled(False)
        try:
            return fn(*args)
        finally:
            torch._C._set_mkldnn_enabled(True)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias: [..., in] x [out, in] -> [..., out]."""
    if x.shape[-1] and _one_bf16_row(x, weight, x.numel() // x.shape[-1]):
        return _without_onednn(F.linear, x, weight)
    return F.linear(x, weight)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Group g's input times weight[g]: x [b, s, G, in] x weight [G, out, in] -> [b, s, G, out]."""
    if _one_bf16_row(x, weight, x.shape[0] * x.shape[1]):
        return _without_onednn(torch.einsum, "bsgk,grk->bsgr", x, weight)
    return torch.einsum("bsgk,grk->bsgr", x, weight)
