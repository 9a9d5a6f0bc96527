"""Activations on disk: `run_with_cache(..., offload_dir=DIR)` writes each tensor as its hook fires
into a memory-mapped file (the page cache holds it, and the OS may evict it), with `index.json`
naming every file; `open_offloaded(DIR, model)` reopens the directory as a `V4ActivationCache`.

Nothing lost, nothing half-written (`OffloadRun`):
* own files only: DIR must be new, empty, or an offload folder v4lens wrote (its index.json says
  `"format": "v4lens-offload"`); a rerun replaces only the files the old index lists, and a file of
  someone else's where the new run would put one of its own is an error, not overwritten;
* complete or absent: the run is written into a hidden temporary folder inside DIR (the same
  filesystem even when DIR is a mount point, so files move by rename) and moved into place only
  after the forward finished; a run that fails leaves the previous one as it was. While files move,
  DIR's index says "not complete" and lists every file v4lens owns there, so a run cut off at that
  moment is never opened as complete and DIR stays reusable;
* the index records the model (config + weights fingerprint, `v4lens.model.fingerprint`):
  `open_offloaded` refuses another model, an incomplete run, and index entries whose file resolves
  outside DIR (`../x`, absolute paths, symlinks out).

A process killed during the forward leaves its hidden `.v4lens-offload-tmp-*` folder in DIR (the
previous run intact); it is ignored by later runs and can be deleted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..model.fingerprint import identity_mismatch, model_identity
from .cache import V4ActivationCache

FORMAT = "v4lens-offload"
INDEX = "index.json"
_TMP_PREFIX = ".v4lens-offload-tmp-"
# "float32" -> torch.float32, ...: the dtypes an index may name (never an arbitrary torch attribute)
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class OffloadRun:
    """One run's tensors on disk, complete or absent: `write` each tensor (into a temporary folder),
    then `commit()` after the forward (moves them into `directory`) or `abort()` on failure.

    Created before the forward, so a folder that is not v4lens's is refused before any work:
    FileExistsError naming it.
    """

    def __init__(self, directory, model):
        self.directory = d = Path(directory)
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"offload_dir {d} is a file, not a folder")
        self.previous = _read_index(d) if d.is_dir() else None
        if self.previous is None and d.is_dir() and any(not p.name.startswith(_TMP_PREFIX) for p in d.iterdir()):
            raise FileExistsError(
                f"offload_dir {d} is not empty and is not a v4lens offload folder (no {INDEX} with "
                f'"format": "{FORMAT}"); v4lens writes only into a new or empty folder or one of its own '
                "offload folders, so that it never replaces files it did not write. Choose another folder "
                "(a folder from a v4lens version before this check has no marker: delete it yourself)"
            )
        self.created = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=d))
        self.model_identity = model_identity(model)  # recorded in the index, checked by open_offloaded
        self.entries: dict[str, dict] = {}

    def write(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """Copy `t` into the run's file `name.bin`; return the file's memory-mapped tensor (valid until
        `commit`, which returns the tensors mapped from their final place)."""
        path = self.tmp / f"{name}.bin"
        path.unlink(missing_ok=True)  # from_file maps an existing file as it is: start from an empty one
        mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        mapped.copy_(t)
        self.entries[name] = {"file": path.name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        return mapped

    def commit(self) -> dict[str, torch.Tensor]:
        """Move the run into `directory` (replacing the previous run's files only); return
        {name: tensor memory-mapped from its file in `directory`}."""
        d = self.directory
        new = {meta["file"] for meta in self.entries.values()}
        owned = _owned_files(self.previous) if self.previous is not None else set()
        clash = sorted(f for f in new - owned if os.path.lexists(d / f))
        if clash:
            raise FileExistsError(
                f"offload_dir {d} holds {', '.join(clash[:5])}, which this run would write but v4lens did "
                f"not write there (not in its {INDEX}); nothing was changed. Move them or choose another folder"
            )
        # from here until the last index is in place, DIR's index says "not complete" and lists every
        # file v4lens may have there: a kill part-way leaves a folder that never opens as complete
        self._write_index(complete=False, tensors={}, pending=sorted(owned | new))
        for f in sorted(new):
            os.replace(self.tmp / f, d / f)  # same filesystem: a rename; maps of the old files stay valid
        for f in sorted(owned - new):
            if (d / f).is_symlink() or (d / f).is_file():
                (d / f).unlink()
        self._write_index(complete=True, tensors=self.entries)
        shutil.rmtree(self.tmp, ignore_errors=True)
        # map the files where they are now, so that the cache names (untyped_storage().filename) and
        # keeps the final files; the temporary maps the forward made would work too (a mmap survives
        # a rename) but would name a path that no longer exists
        return {name: _map(d / meta["file"], meta["shape"], meta["dtype"], shared=True)
                for name, meta in self.entries.items()}  # fmt: skip

    def abort(self) -> None:
        """Remove the run's temporary files (and `directory` if this run created it): the previous
        run, if any, is left as it was."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if empty

    def _write_index(self, **fields) -> None:
        index = {"format": FORMAT, "version": 1, **fields, "model": self.model_identity}
        staged = self.tmp / INDEX
        staged.write_text(json.dumps(index, indent=1))
        os.replace(staged, self.directory / INDEX)  # readers see the old index or the new, never half of one


def _read_index(directory: Path) -> dict | None:
    """`directory`'s index.json if it is a v4lens offload index (complete or not), else None."""
    path = directory / INDEX
    if not path.is_file():  # also refuses a symlink to a device such as /dev/zero
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("format") == FORMAT else None


def _owned_files(index: dict) -> set[str]:
    """The files an offload index says v4lens wrote: plain names directly in its folder only, so that
    an edited index can never make v4lens replace or delete a file elsewhere."""
    tensors = index.get("tensors") if isinstance(index.get("tensors"), dict) else {}
    pending = index.get("pending") if isinstance(index.get("pending"), list) else []
    names = [meta.get("file") for meta in tensors.values() if isinstance(meta, dict)] + pending
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..", INDEX) and Path(n).name == n}


def _map(path: Path, shape, dtype, shared: bool) -> torch.Tensor:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.from_file(str(path), shared=shared, size=math.prod(shape), dtype=dtype).view(shape)


def open_offloaded(directory, model, tokens=None, positions=None) -> V4ActivationCache:
    """A `V4ActivationCache` over the tensors a run with `offload_dir=directory` wrote (memory-mapped
    copy-on-write: edits stay in memory, the files are never changed), with the run's tokens and positions.

    Refused: a folder without a v4lens offload index (FileNotFoundError / ValueError), a run that is
    not complete, a `model` other than the one that wrote it (config or weights fingerprint), and
    index entries whose file resolves outside `directory` or does not hold the recorded shape/dtype."""
    directory = Path(directory)
    path = directory / INDEX
    if not path.exists():
        raise FileNotFoundError(f"open_offloaded: no {path}; give the folder run_with_cache(offload_dir=...) wrote")
    index = _read_index(directory)
    if index is None:
        raise ValueError(f'open_offloaded: {path} is not a v4lens offload index (no "format": "{FORMAT}")')
    if index.get("complete") is not True or not isinstance(index.get("tensors"), dict):
        raise ValueError(f"open_offloaded: the run in {directory} is not complete (it failed or was cut off "
                         "while being written); run it again")  # fmt: skip
    problem = identity_mismatch(index.get("model") if isinstance(index.get("model"), dict) else {}, model)
    if problem is not None:
        raise ValueError(f"open_offloaded: {directory} was written by another model ({problem}); "
                         "open it with the model that wrote it")  # fmt: skip
    root = directory.resolve()
    tensors = {}
    for name, meta in index["tensors"].items():
        file, shape, dtype = _checked_entry(path, root, name, meta)
        tensors[name] = _map(file, shape, dtype, shared=False)
    saved_tokens, saved_positions = tensors.pop("tokens", None), tensors.pop("positions", None)
    tokens = saved_tokens if tokens is None else tokens
    positions = saved_positions if positions is None else positions
    return V4ActivationCache(tensors, model, tokens=tokens, positions=positions)


def _checked_entry(path: Path, root: Path, name: str, meta) -> tuple[Path, list[int], torch.dtype]:
    """An index entry's (file inside `root`, shape, dtype), or ValueError naming the entry."""
    bad = f"open_offloaded: {path} entry {name!r}"
    if not isinstance(meta, dict) or not isinstance(meta.get("file"), str) or not meta["file"]:
        raise ValueError(f"{bad} has no file name")
    file = (root / meta["file"]).resolve()  # follows "..", absolute paths and symlinks
    if file == root or not file.is_relative_to(root):
        raise ValueError(f"{bad} names {meta['file']!r}, which resolves to {file}, outside {root}; refused")
    dtype = _DTYPES.get(meta.get("dtype"))
    shape = meta.get("shape")
    if dtype is None:
        raise ValueError(f"{bad} has dtype {meta.get('dtype')!r}, not a torch dtype")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"{bad} has shape {shape!r}, not a list of sizes")
    if not file.is_file():
        raise ValueError(f"{bad}: {file} is missing or not a file")
    expected = math.prod(shape) * dtype.itemsize
    if file.stat().st_size != expected:
        raise ValueError(f"{bad}: {file} holds {file.stat().st_size} bytes; shape {shape} {dtype} needs {expected}")
    return file, shape, dtype
