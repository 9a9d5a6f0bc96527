"""Whether a model fits, decided before anything is allocated.

`v4lens.load("flash")` would otherwise start filling 1.1 TB and be ended by the OOM killer. The
model's bytes (a lower bound from the config's parameter count, then the exact sum over the
meta-device model, fp32 islands and buffers included) are compared with the device's free
memory (CPU: MemAvailable and the cgroup limit; CUDA: `torch.cuda.mem_get_info`), or with
`max_memory` when the caller gives one.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..model.config import V4Config

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


class ModelTooLargeError(MemoryError, ValueError):
    """The model does not fit the device (a MemoryError, and a ValueError for callers checking arguments)."""


def parse_bytes(value, name: str = "max_memory") -> int:
    """A positive byte count from an int or a string like "20GB" / "1.5GiB" / "500MB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", value.upper())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"{name} must be bytes (an int) or a string like '20GB' or '1.5GiB', not {value!r}")
        n = int(float(match.group(1)) * _UNITS[match.group(2)])
    else:
        raise TypeError(f"{name} must be bytes (an int) or a string like '20GB', not {value!r}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


def free_bytes(device) -> int | None:
    """Bytes free for new tensors on `device` (None when unknown: meta, mps, ...)."""
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError, ValueError):  # no CUDA here: allocating will say so itself
            return None
    return None


def _cpu_available() -> int | None:
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_available()  # a container's limit is lower than the host's free memory
    return available if limit is None else min(available, limit)


def _cgroup_available() -> int | None:
    """cgroup v2 memory.max minus the working set (usage less reclaimable file pages), if limited."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        return max(int(limit) - (used - int(stat.get("inactive_file", 0))), 0)
    except (OSError, ValueError):
        return None


def estimated_bytes(cfg: V4Config) -> int:
    """A lower bound on the model's bytes: every parameter in cfg.dtype (islands and int buffers are larger)."""
    return cfg.param_counts()["total"] * cfg.dtype.itemsize


def model_bytes(model: torch.nn.Module) -> int:
    """The exact bytes of a model's parameters and buffers (works on the meta device)."""
    tensors = list(model.parameters()) + list(model.buffers())
    # a weight kept quantised (weights.at_rest) takes what it stores, not its logical size
    return sum(t.stored_bytes() if hasattr(t, "stored_bytes") else t.numel() * t.element_size() for t in tensors)


def check_memory(cfg: V4Config, device=None, max_memory=None, nbytes: int | None = None) -> None:
    """Refuse (ModelTooLargeError) to build a model of `nbytes` (default: estimated from `cfg`) that
    does not fit `max_memory` if given, else the free memory of `device`."""
    need = estimated_bytes(cfg) if nbytes is None else nbytes
    device = torch.device(device or cfg.device or "cpu")
    if max_memory is not None:
        limit, what = parse_bytes(max_memory), f"max_memory ({max_memory!r})"
    else:
        limit, what = free_bytes(device), f"the free memory on {device}"
    if limit is None or need <= limit:
        return
    params = cfg.param_counts()["total"]
    bf16 = " dtype='bf16' (half the bytes);" if cfg.dtype == torch.float32 else ""
    raise ModelTooLargeError(
        f"{cfg.name} needs {_size(need)} ({params / 1e9:.2f}B parameters in {str(cfg.dtype).removeprefix('torch.')}) "
        f"but {what} is {_size(limit)}: not building it. Options: a smaller preset (tiny, mini-3b);{bf16} a "
        "checkpoint sliced down to a smaller config (`v4lens slice`, v4lens.slice_checkpoint); a device with more "
        "memory (device='cuda'); max_memory=... if you know more is free; or, for a checkpoint, keep_quantized=True "
        "(FP8 / FP4 weights as stored), expert_offload='cpu' | 'disk' (routed experts off the device) or "
        "device_map='auto' with max_memory={device: budget} (blocks over devices, CPU and disk)."
    )


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{math.ceil(n)} bytes"
