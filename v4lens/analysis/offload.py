"""Activations on disk: `run_with_cache(..., offload_dir=DIR)` writes each tensor as its hook fires
into a memory-mapped file (the page cache holds it, and the OS may evict it), with `index.json`
naming every file; `open_offloaded(DIR, model)` reopens the directory as a `V4ActivationCache`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .cache import V4ActivationCache


def start_index(directory: Path) -> None:
    """Start a run's index: a directory reused for another run then lists only that run."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.json").unlink(missing_ok=True)


def offload_tensor(t: torch.Tensor, directory: Path, name: str) -> torch.Tensor:
    """Copy `t` into `directory/name.bin` and return the file's memory-mapped tensor; record it in index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.bin"
    path.unlink(missing_ok=True)  # from_file maps an existing file as it is: start from an empty one
    mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    mapped.copy_(t)
    index_path = directory / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    index_path.write_text(json.dumps(index, indent=1))
    return mapped


def open_offloaded(directory, model, tokens=None, positions=None) -> V4ActivationCache:
    """A `V4ActivationCache` over the tensors a run with `offload_dir=directory` wrote (memory-mapped
    copy-on-write: edits stay in memory, the files are never changed), with the run's tokens and positions."""
    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    tensors = {}
    for name, meta in index.items():
        dtype = getattr(torch, meta["dtype"])
        n = math.prod(meta["shape"])
        tensors[name] = torch.from_file(str(directory / f"{name}.bin"), shared=False, size=n, dtype=dtype).view(meta["shape"])
    tokens = tensors.pop("tokens", None) if tokens is None else tokens
    positions = tensors.pop("positions", None) if positions is None else positions
    return V4ActivationCache(tensors, model, tokens=tokens, positions=positions)
