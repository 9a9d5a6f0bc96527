"""Reading a local checkpoint folder: its config.json, which file holds each tensor, and the tensors.

Only safetensors files are read (never pickles), only files inside the folder (an index entry or a
symlink that leads out of it is refused), each tensor from exactly one file (a tensor in two
files is an error unless the index says which), and FP8 / FP4 scales must be finite and > 0.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from pathlib import Path

import torch

from ..model.config import V4Config
from ..model.config_formats import read_config_json
from .names import canonical_name
from .quant import dequantize
from .safetensors_io import DTYPES, read_header, read_into

INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20  # V4-Flash's index is a few MB (one entry per expert matrix and scale)
_QUANTISED = ("F8_E4M3", "I8", "U8")  # stored weight dtypes that come with a scale tensor
# tensors only one kind of draft module has (both live under mtp.*; transformers' layout keeps these names)
_APRIL_MTP = re.compile(r"^(model\.)?mtp\.\d+\.(e_proj|h_proj|enorm|hnorm)\.")
_DSPARK = re.compile(r"^(model\.)?mtp\.\d+\.(main_proj|main_norm|markov_head|confidence_head)\.")


def detect_format(path: Path) -> str:
    """'hf' (transformers config.json) or 'official' (DeepSeek ModelArgs config.json)."""
    return _format_of(_read_config(Path(path)), Path(path) / "config.json")


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a transformers or DeepSeek checkpoint directory")
    return read_config_json(cfg_file)  # size-capped; not JSON or not an object: ValueError naming the file


def _format_of(d: dict, cfg_file: Path) -> str:
    if d.get("model_type") == "deepseek_v4" or "hidden_size" in d:
        return "hf"
    if "dim" in d and "n_layers" in d:
        return "official"
    raise ValueError(
        f"{cfg_file}: neither a transformers DeepseekV4 config (model_type 'deepseek_v4', hidden_size, ...) "
        "nor DeepSeek's ModelArgs config (dim, n_layers, ...)"
    )


# ---------------------------------------------------------------------- which files, inside the folder
def inside(folder: Path, entry: str, what: str) -> Path:
    """`folder / entry`, refused (ValueError) if it resolves outside `folder`: `..`, an absolute path,
    or a symlink that leads out. One exception: transformers' download cache, whose
    `snapshots/<revision>/` files are symlinks into the same repository's `blobs/` folder."""
    if Path(entry).is_absolute() or ".." in Path(entry).parts:
        raise ValueError(f"{what} {entry!r} points outside the checkpoint folder {folder}; refusing to read it")
    root, target = folder.resolve(), (folder / entry).resolve()
    hub_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if root not in target.parents and not (hub_blobs is not None and hub_blobs in target.parents):
        raise ValueError(
            f"{what} {entry!r} resolves to {target}, outside the checkpoint folder {folder}; refusing to read it"
        )
    return folder / entry


def read_index(path: Path) -> dict[str, Path] | None:
    """tensor name -> the file that holds it, from model.safetensors.index.json; None without an index."""
    index = path / INDEX
    if not index.exists():
        return None
    weight_map = read_config_json(index, MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> file name")
    files = {f: inside(path, f, f"{index} entry") for f in set(weight_map.values())}
    missing = sorted(str(f) for f in files.values() if not f.exists())
    if missing:
        raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
    return {key: files[f] for key, f in weight_map.items()}


def safetensors_files(path: Path, index: dict[str, Path] | None = None) -> list[Path]:
    """The checkpoint's safetensors files: the index's if there is one (other .safetensors files in the
    folder are ignored, with a warning), else every *.safetensors in the folder. Pickles are refused."""
    found = sorted(path.glob("*.safetensors"))
    if index is not None:
        files = sorted(set(index.values()))
        stray = [f.name for f in found if f not in files]
        if stray:
            warnings.warn(f"{path}: ignoring {stray}: not in {INDEX}, which decides which file holds each tensor")
        return files
    if not found:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); v4lens loads safetensors only, because "
                "unpickling can run arbitrary code. Convert them with safetensors.torch.save_file first."
            )
        raise FileNotFoundError(f"{path} has no .safetensors files")
    return [inside(path, f.name, "file") for f in found]


# ---------------------------------------------------------------------- the checkpoint
class Checkpoint:
    """A local checkpoint directory opened for reading: its layout, config and tensors.

    Each file is validated by safetensors when opened; tensor data is then read with
    positional reads of the byte ranges its header gives (thread-safe, no memory-mapped pages
    that would count in the process's RSS). FP8 / FP4 weights with a `<name>.scale` (or
    `.weight_scale_inv`) are dequantised to fp32 on read. Use as a context manager, or call
    `close()`. `non_finite` lists the tensors `read_into` found NaN / Inf in.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.raw_config = _read_config(self.path)
        self.format = _format_of(self.raw_config, self.path / "config.json")
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._entry: dict[str, tuple[Path, int, dict]] = {}  # key -> (file, data start, header entry)
        self.non_finite: list[str] = []
        index = read_index(self.path)
        for f in safetensors_files(self.path, index):
            for key, (data_start, entry) in read_header(f).items():
                if index is not None and key in index and index[key] != f:
                    continue  # the index says another file holds it
                if key in self._entry:  # the loser would be silently dropped: say so instead
                    raise ValueError(
                        f"tensor {key} is in two files of {self.path}: {self._entry[key][0].name} and {f.name}; "
                        f"remove it from one (or list the right file in {INDEX})"
                    )
                self._entry[key] = (f, data_start, entry)
        wrong = [(k, f.name) for k, f in (index or {}).items() if k not in self._entry]
        if wrong:
            raise ValueError(f"{self.path / INDEX} places tensors in files that do not hold them: {wrong[:10]}")
        self._scale: dict[str, str] = {}  # quantised weight -> its scale tensor
        for key in self._entry:
            for suffix in (".scale", ".weight_scale_inv"):
                weight = key[: -len(suffix)] + ".weight"
                if key.endswith(suffix) and weight in self._entry and self.stored_dtype(weight) in _QUANTISED:
                    self._scale[weight] = key
        unscaled = [
            k for k in self._entry
            if k.endswith(".weight") and self.stored_dtype(k) in _QUANTISED and k not in self._scale
        ]  # fmt: skip
        if unscaled:
            raise ValueError(f"{self.path}: quantised tensors without a `.scale` tensor: {unscaled[:10]}")
        scales = set(self._scale.values())
        self.keys = [k for k in self._entry if k not in scales]

    def stored_dtype(self, key: str) -> str:
        """The safetensors dtype string of a stored tensor ("BF16", "F8_E4M3", "I8", ...)."""
        return self._entry[key][2]["dtype"]

    def is_quantized(self, key: str) -> bool:
        return key in self._scale

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape once dequantised (packed FP4 holds two columns per byte)."""
        shape = tuple(self._entry[key][2]["shape"])
        return (
            shape[:-1] + (2 * shape[-1],)
            if self.stored_dtype(key) in ("I8", "U8") and self.is_quantized(key)
            else shape
        )

    def read_stored(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the tensor as stored, its block scale checked finite and > 0, or None if it has none)."""
        tensor = self._read(key)
        if key not in self._scale:
            return tensor, None
        scale = self._read(self._scale[key])
        self._check_scale(self._scale[key], scale)
        return tensor, scale

    def stored_nbytes(self, key: str) -> int:
        """Bytes the tensor takes as stored, its scale included."""
        keys = [key] + ([self._scale[key]] if key in self._scale else [])
        return sum(math.prod(self._entry[k][2]["shape"]) * DTYPES[self._entry[k][2]["dtype"]].itemsize for k in keys)

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored, or dequantised to fp32 if it is an FP8 / FP4 weight."""
        tensor, scale = self.read_stored(key)
        if scale is not None:
            try:
                tensor = dequantize(tensor, scale)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self._entry[key][0]}: cannot dequantise {key}: {e}") from e
        return tensor

    def _check_scale(self, key: str, scale: torch.Tensor) -> None:
        """A zero scale zeroes its block, a NaN / Inf one makes it NaN: refuse both."""
        s = scale.float()
        bad = ~(torch.isfinite(s) & (s > 0))
        if bad.any():
            raise ValueError(
                f"{self._entry[key][0]}: scale tensor {key}: scales must be finite and > 0, but "
                f"{int(bad.sum())} of {s.numel()} are not (first: {s[bad][0].item()}); the checkpoint is corrupt"
            )

    def read_into(self, key: str, dst: torch.Tensor) -> None:
        """Fill `dst` with the tensor (cast, dequantised). A plain tensor already in `dst`'s dtype
        goes from the file straight into `dst`'s CPU memory: loading holds one copy of the model.
        A tensor holding NaN / Inf is recorded in `non_finite`."""
        direct = (
            key not in self._scale and dst.device.type == "cpu" and dst.is_contiguous()
            and DTYPES.get(self.stored_dtype(key)) == dst.dtype
        )  # fmt: skip
        if direct:
            self._read(key, out=dst.detach())
        else:
            with torch.no_grad():
                dst.copy_(self.get(key))
        if dst.is_floating_point() and not bool(torch.isfinite(dst).all()):
            with self._lock:
                self.non_finite.append(key)

    def _read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        file, data_start, entry = self._entry[key]
        begin, end = entry["data_offsets"]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {key} has dtype {entry['dtype']}, which v4lens does not read")
        if out is None:
            out = torch.empty(entry["shape"], dtype=dtype)
        if out.numel() * out.element_size() != end - begin:
            raise ValueError(
                f"{file}: tensor {key} holds {end - begin} bytes, {out.numel() * out.element_size()} expected"
            )
        if read_into(self._fd(file), data_start + begin, out) != end - begin:
            raise ValueError(f"{file}: tensor {key} is truncated")
        return out

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def canonical_keys(self, dspark_stages: int = 0) -> dict[tuple[str, int | None], str]:
        """(v4lens name, expert index or None) -> stored key, for every tensor v4lens uses.

        dspark_stages: the config's stage count if it is a DSpark config (see `names.canonical_name`)."""
        out = {}
        for key in self.keys:
            name, expert = canonical_name(key, with_expert=True, dspark_stages=dspark_stages)
            if name is not None:
                out[(name, expert)] = key
        return out

    def config(self, **overrides) -> V4Config:
        """The V4Config of config.json; an invalid value is an error naming the file and the field."""
        build = V4Config.from_hf if self.format == "hf" else V4Config.from_official
        overrides.setdefault("name", self.path.name)
        try:
            return build(self.raw_config, **overrides)
        except (TypeError, ValueError) as e:
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{self.path / 'config.json'}: {e}") from e

    def has_mtp(self) -> bool:
        """Whether the checkpoint holds draft-module tensors (`mtp.*`: April MTP blocks or DSpark stages)."""
        return any(name.startswith("mtp.") for name, _ in self.canonical_keys())

    def check_draft(self, cfg: V4Config) -> None:
        """Refuse a config whose draft module is not the one the checkpoint's `mtp.*` tensors belong to
        (an April MTP checkpoint with a 0731 / 0813 DSpark config, or the other way round)."""
        april = [k for k in self.keys if _APRIL_MTP.search(k)]
        dspark = [k for k in self.keys if _DSPARK.search(k)]
        where = f"{self.path / 'config.json'}"
        if cfg.draft == "dspark" and april:
            raise ValueError(
                f"{where}: the config describes a DSpark drafter (0731 / 0813 release: dspark_* keys, "
                f"{cfg.n_mtp_layers} stages) but the checkpoint holds April MTP tensors ({', '.join(april[:3])} ...); "
                "use the config that came with these weights"
            )
        if cfg.draft != "dspark" and dspark:
            has = "April MTP blocks" if cfg.draft == "mtp" else "no draft module"
            raise ValueError(
                f"{where}: the config describes {has} (no dspark_* keys) but the checkpoint holds the DSpark drafter "
                f"tensors of a 0731 / 0813 release ({', '.join(dspark[:3])} ...); use the config that came with these "
                "weights (it has the dspark_* keys)"
            )

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
