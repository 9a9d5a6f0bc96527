"""The safetensors file format, read and written without intermediate copies.

A file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
byte offsets into the data section; optional `__metadata__` strings) and the raw bytes.
`safetensors` itself validates every file we open; data goes between the file and tensor
memory directly (positional reads; writes from the tensor's own buffer), so reading or
writing a checkpoint never holds a second copy of it, nor counts mapped file pages in RSS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(file: Path) -> dict[str, tuple[int, dict]]:
    """key -> (absolute start of the data section, header entry {dtype, shape, data_offsets}).

    A truncated or corrupt file is a ValueError naming it (safetensors checks header and size).
    """
    from safetensors import safe_open

    try:
        with safe_open(file, "pt"):
            pass
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {file}: {e}") from e
    header.pop("__metadata__", None)
    return {key: (8 + size, entry) for key, entry in header.items()}


def read_into(fd: int, offset: int, out: torch.Tensor) -> int:
    """Fill the contiguous CPU tensor `out` with bytes from `offset` of the open file `fd`; bytes read."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done = 0
    while done < len(view):  # one read returns at most ~2 GB on Linux
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def write_file(path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any device, any strides) to one safetensors file, one tensor in memory at a time."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors:
        if t.dtype not in NAMES:
            raise ValueError(f"cannot write {name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, t in tensors:
            t = t.detach().to("cpu").contiguous()  # no copy for a contiguous CPU tensor (or row view)
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
