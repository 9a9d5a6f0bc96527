"""FP8 and FP4 weights as DeepSeek ships them, and back.

- FP8: e4m3 values with one scale per 128×128 block, stored next to the weight as
  `<name>.scale` — a power of two (e8m0, `torch.float8_e8m0fnu`) or fp32.
- FP4: e2m1 values packed two per int8 byte (low nibble = even column) with one e8m0 scale
  per 1×32 block; used for the routed experts.

v4lens runs in fp32 / bf16: checkpoints are dequantised on load, tensor by tensor. The
quantisers are here for tests and for writing synthetic quantised checkpoints.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 codes 0..15: sign bit 3, then the magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}
FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)

_PACKED = (torch.int8, torch.uint8)


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a stored weight needs its scale: FP8 e4m3, or FP4 packed in (u)int8."""
    return weight.dtype == torch.float8_e4m3fn or weight.dtype in _PACKED


def logical_shape(weight_shape: tuple[int, ...], weight_dtype: torch.dtype) -> tuple[int, ...]:
    """The dequantised shape: packed FP4 holds two columns per byte."""
    if weight_dtype in _PACKED:
        return tuple(weight_shape[:-1]) + (2 * weight_shape[-1],)
    return tuple(weight_shape)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 [..., out, in] or packed FP4 [..., out, in/2] with its block scales -> [..., out, in] in `dtype`
    (fp32 by default; the values × scale products, rounded to `dtype` once).

    The block size is read off the shapes (128×128 and 1×32 as DeepSeek ships them, any
    other block that tiles the matrix too), so partial edge blocks work. With power-of-two (e8m0)
    scales and dtype bf16 the products are computed in bf16 directly: e4m3 and e2m1 values and powers
    of two are exact in bf16 and so is their product, so the result equals fp32-then-bf16 bit for bit,
    with half the memory traffic (what a weight dequantised at each use pays).
    """
    if weight.dtype in _PACKED:
        shape = tuple(weight.shape[:-1]) + (2 * weight.shape[-1],)
    elif weight.dtype == torch.float8_e4m3fn:
        shape = tuple(weight.shape)
    else:
        raise TypeError(f"not a quantised weight: dtype {weight.dtype}")
    if scale.ndim != len(shape):
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit a weight of shape {shape}")
    blocks = [_block_size(n, k) for n, k in zip(shape, scale.shape)]
    exact = dtype == torch.bfloat16 and scale.dtype == torch.float8_e8m0fnu
    work = torch.bfloat16 if exact else torch.float32
    values = unpack_fp4(weight, work) if weight.dtype in _PACKED else weight.to(work)
    scale = scale.to(work)
    if all(n == k * b for n, k, b in zip(shape, scale.shape, blocks)):  # whole blocks: broadcast, no copy of the scale
        grid = [x for k, b in zip(scale.shape, blocks) for x in (k, b)]
        out = values.view(grid) * scale.view([x for k in scale.shape for x in (k, 1)])
        return out.view(shape).to(dtype)
    for dim, block in enumerate(blocks):  # partial edge blocks
        scale = scale.repeat_interleave(block, dim=dim).narrow(dim, 0, shape[dim])
    return (values * scale).to(dtype)


def _block_size(n: int, n_blocks: int) -> int:
    """The block length along one axis: 128 / 32 / 1 when they fit, else the smallest power of two that does."""
    for block in (128, 32, 1):
        if math.ceil(n / block) == n_blocks:
            return block
    block = 1
    while math.ceil(n / block) > n_blocks:
        block *= 2
    if math.ceil(n / block) != n_blocks:
        raise ValueError(f"{n_blocks} scale blocks cannot tile an axis of length {n}")
    return block


def _pow2_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """The smallest power of two s with amax / s <= qmax (the reference's ue8m0 rule)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=floor) / qmax)))


def _blocks(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[out, in] fp32 -> [out/rows, in/cols, rows, cols], zero-padded at the edges."""
    out, inp = w.shape
    pad_r, pad_c = -out % rows, -inp % cols
    w = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))
    return w.view(w.shape[0] // rows, rows, w.shape[1] // cols, cols).transpose(1, 2)


def _unblocks(b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    nr, nc, rows, cols = b.shape
    return b.transpose(1, 2).reshape(nr * rows, nc * cols)[: shape[0], : shape[1]]


def quantize_fp8(w: torch.Tensor, block: int = 128, scale_format: str = "e8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (e4m3 [out, in], scale [⌈out/block⌉, ⌈in/block⌉] in e8m0 or fp32)."""
    blocks = _blocks(w.float(), block, block)
    amax = blocks.abs().amax(dim=(-1, -2))
    if scale_format == "e8m0":
        scale = _pow2_scale(amax, FP8_MAX, 1e-4)
    elif scale_format == "fp32":
        scale = amax.clamp(min=1e-4) / FP8_MAX
    else:
        raise ValueError(f"scale_format must be 'e8m0' or 'fp32', not {scale_format!r}")
    q = (blocks / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX)
    q = _unblocks(q, tuple(w.shape)).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu) if scale_format == "e8m0" else scale


def quantize_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] (in even) -> (packed int8 [out, in/2], e8m0 scale [out, ⌈in/block⌉]); round to nearest, ties to even."""
    blocks = _blocks(w.float(), 1, block)
    scale = _pow2_scale(blocks.abs().amax(dim=(-1, -2)), FP4_MAX, FP4_MAX * 2.0**-126)
    x = _unblocks((blocks / scale[..., None, None]).clamp(-FP4_MAX, FP4_MAX), tuple(w.shape))
    magnitudes = FP4_VALUES[:8].to(x.device)
    # nearest magnitude; on a tie the even code (mantissa bit 0) wins, as the hardware conversion does
    distance = (x.abs()[..., None] - magnitudes).abs()
    nearest = distance == distance.amin(dim=-1, keepdim=True)
    codes = (nearest * (2 - torch.arange(8, device=x.device) % 2)).argmax(dim=-1)
    codes = codes | ((x < 0).to(torch.long) << 3)
    return pack_fp4(codes), scale.to(torch.float8_e8m0fnu)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes [..., n] (0..15) -> int8 [..., n/2], even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of columns")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


# every byte -> its two e2m1 values (low nibble first): one lookup per byte instead of two per value
_PAIRS = torch.stack((FP4_VALUES[torch.arange(256) & 0xF], FP4_VALUES[torch.arange(256) >> 4]), dim=-1)


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8/uint8 [..., n/2] -> values [..., n] in `dtype` (the e2m1 grid, unscaled; exact in bf16 too)."""
    pairs = _PAIRS.to(device=packed.device, dtype=dtype)[packed.view(torch.uint8).int()]  # [..., n/2, 2]
    return pairs.flatten(-2)
