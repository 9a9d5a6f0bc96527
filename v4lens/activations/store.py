"""The on-disk activation store: safetensors shards plus a manifest, appended shard by shard.

A store is a folder:

    manifest.json              what was collected (model, hooks, dtypes, shapes, positions rule)
                               and the list of complete shards, rewritten atomically after each one
    shard-00000.safetensors    one or more whole batches: for each stored position its row id, position,
    shard-00001.safetensors    token and one tensor per hook; for each row its id, length and token ids
    ...

A shard is written under a temporary name, flushed to disk and renamed; only then is it added to
the manifest. A row is stored once its shard is in the manifest, so a crash at any moment leaves
the store as of the last shard listed, and files the manifest does not list (a temporary file, a
shard renamed just before the crash) are left-overs that the next `collect` removes and rewrites.

Reading (`ActivationStore`) maps each shard's file into memory (pages are read when touched, so a
store larger than memory can be read), and serves one stored position per item as a torch Dataset.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import secrets
import zlib
from pathlib import Path

import torch

from ..model.fingerprint import identity_mismatch
from ..weights.atomic import fsync
from ..weights.safetensors_io import DTYPES, read_header, write_file

FORMAT = "v4lens-activations"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"shard-\d{5,}\.safetensors")
_TMP = ".v4lens-tmp-"  # prefix of the files being written (a shard, the manifest)
# per-row and per-position tensors of a shard, besides the hooks (which are named by their hook names)
ROW_FIELDS = ("row_ids", "row_lengths", "tokens")
POSITION_FIELDS = ("row", "position", "token")
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tokens_checksum(tokens: torch.Tensor) -> int:
    """A row's token ids -> a CRC32, so a resumed collection can tell that its row i is the stored row i."""
    return zlib.crc32(tokens.to(torch.int64).contiguous().numpy().tobytes())


def read_manifest(folder: Path) -> dict | None:
    """The store's manifest, or None when the folder has none of ours."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`, all or nothing: written beside it, flushed, renamed."""
    tmp = path.with_name(f"{_TMP}{secrets.token_hex(6)}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def write_manifest(folder: Path, manifest: dict) -> None:
    _write_atomically(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one shard file under a temporary name, flush it, then rename it to `name`."""
    tmp = folder / f"{_TMP}{secrets.token_hex(6)}-{name}"
    # widest elements first: every tensor then starts aligned to its element size, so a reader can
    # view the mapped bytes as that dtype without copying
    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    try:
        write_file(tmp, order, metadata={"format": FORMAT})
        fsync(tmp)
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def remove_leftovers(folder: Path, manifest: dict | None) -> None:
    """Delete the store's own files that the manifest does not list: shards and temporary files
    from a collection that stopped before it could add them (never any other file)."""
    listed = {s["file"] for s in (manifest or {}).get("shards", [])}
    for entry in os.scandir(folder):
        ours = entry.name.startswith(_TMP) or (_SHARD.fullmatch(entry.name) and entry.name not in listed)
        if ours and entry.is_file():
            os.unlink(entry.path)


def map_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors, viewing a private memory map of the file (no read until a page is touched)."""
    header = read_header(path)  # validates the file (a truncated or corrupt shard is an error naming it)
    size = path.stat().st_size
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, (start, entry) in header.items():
        a, b = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        out[name] = raw[start + a : start + b].view(dtype).view(entry["shape"])
    return out


class StoreWriter:
    """Appends whole batches to a store: `add` keeps them until `flush` writes them as one shard
    (then forgets them), so memory holds at most one shard's batches.

    Opening checks the folder: new, empty, or a store of the same collection (`run`: the model's
    identity, hooks, positions rule, dtype, ...), whose stored rows (`stored`: row id -> (length,
    token checksum)) a resumed collection skips. Anything else is refused before any work.
    """

    def __init__(self, folder: str | os.PathLike, model, run: dict, overwrite: bool = False):
        self.folder = folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"out_dir {folder} is a file, not a folder")
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None and folder.is_dir() and any(not e.name.startswith(_TMP) for e in os.scandir(folder)):
            raise FileExistsError(
                f'out_dir {folder} is not empty and holds no activation store (no {MANIFEST} with "format": '
                f'"{FORMAT}"); collect writes only into a new or empty folder or one of its own stores, so that '
                "it never replaces files it did not write. Choose another folder"
            )
        if manifest is not None and not overwrite:
            _check_same_run(folder, manifest, run, model)
        if manifest is not None and overwrite:
            manifest = None  # the old shards are no longer listed: remove_leftovers deletes them
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder, manifest)
        if manifest is None:
            hooks = {name: {"dtype": None, "shape": None} for name in run["hooks"]}
            manifest = {"format": FORMAT, "version": 1, "complete": False, **run, "hooks": hooks, "shards": []}
            write_manifest(folder, manifest)
        elif manifest.get("complete"):  # this run may add rows (a longer dataset): complete again at its end
            manifest["complete"] = False
            write_manifest(folder, manifest)
        self.manifest = manifest
        self.stored: dict[int, tuple[int, int]] = {}
        for s in manifest["shards"]:
            shard = map_shard(folder / s["file"])
            tokens = shard["tokens"].split(shard["row_lengths"].tolist())
            for r, n, t in zip(shard["row_ids"].tolist(), shard["row_lengths"].tolist(), tokens):
                self.stored[r] = (n, tokens_checksum(t))
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.failed = False  # a shard write failed: what is pending may be half-written, so not retried

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep one batch's tensors (ROW_FIELDS, POSITION_FIELDS and the hooks) for the next shard."""
        hooks = self.manifest["hooks"]
        for name, info in hooks.items():
            t = batch[name]
            shape, dtype = list(t.shape[1:]), dtype_name(t.dtype)
            if info["shape"] is not None and (info["shape"], info["dtype"]) != (shape, dtype):
                raise ValueError(
                    f"hook {name} gives {dtype} {shape} per position in this batch, but the store holds "
                    f"{info['dtype']} {info['shape']}; a store needs one shape and dtype per hook"
                )
        self.pending.append(batch)
        self.pending_bytes += sum(t.numel() * t.element_size() for t in batch.values())

    def flush(self) -> None:
        """Write the kept batches as the next shard, list it in the manifest, and forget them."""
        if not self.pending:
            return
        self.failed = True  # until the shard is listed
        shards = self.manifest["shards"]
        name = shard_name(len(shards))
        tensors = {key: torch.cat([b[key] for b in self.pending]) for key in self.pending[0]}
        write_shard(self.folder, name, tensors)
        for hook, info in self.manifest["hooks"].items():
            info["shape"], info["dtype"] = list(tensors[hook].shape[1:]), dtype_name(tensors[hook].dtype)
        shards.append({"file": name, "rows": len(tensors["row_ids"]), "positions": len(tensors["row"])})
        write_manifest(self.folder, self.manifest)  # the rows count as stored from here on
        lengths, tokens = tensors["row_lengths"].tolist(), tensors["tokens"].split(tensors["row_lengths"].tolist())
        for r, n, t in zip(tensors["row_ids"].tolist(), lengths, tokens):
            self.stored[r] = (n, tokens_checksum(t))
        self.pending.clear()
        self.pending_bytes = 0
        self.failed = False

    def finish(self) -> None:
        self.flush()
        self.manifest["complete"] = True
        write_manifest(self.folder, self.manifest)


def _check_same_run(folder: Path, manifest: dict, run: dict, model) -> None:
    """A ValueError unless the store in `folder` was collected with the same model, hooks, positions and dtype."""
    why = identity_mismatch(manifest.get("model", {}), model)
    if why is None:
        then = {**manifest, "hooks": list(manifest.get("hooks", {}))}
        why = ", ".join(f"{k}: {then.get(k)!r} there, {v!r} here" for k, v in run.items()
                        if k != "model" and then.get(k) != v) or None  # fmt: skip
    if why is not None:
        raise ValueError(
            f"out_dir {folder} holds a store of another collection ({why}). Rerunning the same collection "
            "resumes it; to replace it pass overwrite=True, or choose another folder"
        )


class ActivationStore(torch.utils.data.Dataset):
    """A collected activation store, read back: one item per stored position.

    `store[i]` is a dict: `"row"` (the row's index in the dataset it was collected from),
    `"position"` (the position in that row), `"token"` (the token id there) and one tensor per
    hook, shaped as the hook's tensor at one position (e.g. [n, d] for `hook_streams_post`).
    Items batch with a `torch.utils.data.DataLoader` as they are. Tensors view the shard files'
    memory maps; `shards()` gives each shard's tensors whole (the fast way to read a large store).

    >>> store = open_store("acts/")
    >>> len(store), store.hooks, store.hook_shapes["blocks.2.hook_streams_post"]
    >>> x = store[0]["blocks.2.hook_streams_post"]                      # [n, d]
    >>> loader = torch.utils.data.DataLoader(store, batch_size=256, shuffle=True)
    """

    def __init__(self, folder: str | os.PathLike, model=None):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(
                f'{self.folder} holds no activation store (no {MANIFEST} with "format": "{FORMAT}"); '
                "collect one with v4lens.activations.collect"
            )
        self.manifest = manifest
        if model is not None:
            why = identity_mismatch(manifest["model"], model)
            if why is not None:
                raise ValueError(f"the store {self.folder} was collected from another model: {why}")
        self._shards = [map_shard(self.folder / s["file"]) for s in manifest["shards"]]
        for s, tensors in zip(manifest["shards"], self._shards):
            if tensors["row"].shape[0] != s["positions"] or tensors["row_ids"].shape[0] != s["rows"]:
                raise ValueError(
                    f"shard {s['file']} of {self.folder} holds {tensors['row'].shape[0]} positions of "
                    f"{tensors['row_ids'].shape[0]} rows, but the manifest says {s['positions']} of {s['rows']}"
                )
        self._ends = [0]
        for s in manifest["shards"]:
            self._ends.append(self._ends[-1] + s["positions"])
        self._row_where: dict[int, tuple[int, int, int]] | None = None

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def hook_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Each hook's shape at one position (None while nothing is stored)."""
        return {n: None if h["shape"] is None else tuple(h["shape"]) for n, h in self.manifest["hooks"].items()}

    @property
    def hook_dtypes(self) -> dict[str, torch.dtype | None]:
        return {n: None if h["dtype"] is None else _DTYPE_NAMES[h["dtype"]] for n, h in self.manifest["hooks"].items()}

    @property
    def complete(self) -> bool:
        """True once a collection ran through its whole dataset (False after a crash: rerun it to resume)."""
        return bool(self.manifest.get("complete"))

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a store of {n} positions")
        i %= n
        k = bisect.bisect_right(self._ends, i) - 1
        shard, j = self._shards[k], i - self._ends[k]
        item = {f: int(shard[f][j]) for f in POSITION_FIELDS}
        item.update({name: shard[name][j] for name in self.hooks})
        return item

    def shards(self):
        """Yield each shard's tensors: `row`, `position`, `token` [P] and one [P, ...] tensor per hook
        (memory-mapped), plus `row_ids`, `row_lengths` [R] and `tokens` (the R rows' token ids, concatenated)."""
        yield from self._shards

    def row_ids(self) -> torch.Tensor:
        """The ids of the stored rows, in the order they were stored (int64 [n_rows])."""
        return torch.cat([s["row_ids"] for s in self._shards]) if self._shards else torch.zeros(0, dtype=torch.long)

    def tokens(self, row: int) -> torch.Tensor:
        """The token ids of stored row `row` (its index in the dataset), without padding."""
        if self._row_where is None:
            self._row_where = {}
            for k, s in enumerate(self._shards):
                starts = torch.cumsum(s["row_lengths"], 0) - s["row_lengths"]
                for r, a, n in zip(s["row_ids"].tolist(), starts.tolist(), s["row_lengths"].tolist()):
                    self._row_where[r] = (k, a, n)
        if row not in self._row_where:
            raise KeyError(f"row {row} is not in the store {self.folder} ({self.n_rows} rows stored)")
        k, a, n = self._row_where[row]
        return self._shards[k]["tokens"][a : a + n]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"ActivationStore({str(self.folder)!r}: {len(self)} positions of {self.n_rows} rows, "
                f"{len(self._shards)} shards, {state}; hooks {self.hooks})")  # fmt: skip


def open_store(folder: str | os.PathLike, model=None) -> ActivationStore:
    """Open a store that `collect` wrote, as a torch Dataset. With `model`, check first that the store
    was collected from this model (same config and weights), else a ValueError saying what differs."""
    return ActivationStore(folder, model)
