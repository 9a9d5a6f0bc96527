"""Building models: the seeded random-init scaffold and local safetensors checkpoints.

Nothing here downloads anything. Only safetensors files are read (never pickles).
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..model import HookedV4
from ..model.config import PRESETS, V4Config, preset, resolve_dtype
from .names import canonical_name
from .quant import dequantize
from .safetensors_io import DTYPES, read_header, read_into

# ---------------------------------------------------------------------- shipped checkpoints
# Trained checkpoints inside the package (package data in v4lens/data/), checked before the
# random-init presets. tiny-recall: trained by `python -m v4lens.train` (see data/tiny-recall/README.md).
SHIPPED_DIR = Path(__file__).parents[1] / "data"
SHIPPED = {"tiny-recall": SHIPPED_DIR / "tiny-recall"}


def shipped_checkpoint(name: str) -> Path | None:
    """The directory of a checkpoint shipped with v4lens under `name`, or None."""
    path = SHIPPED.get(str(name))
    return path if path is not None and (path / "config.json").is_file() else None


# ---------------------------------------------------------------------- public entry point
def load(name_or_path: str | Path, device=None, dtype=None, seed: int = 0, **overrides) -> HookedV4:
    """A model in eval mode.

    name_or_path: a checkpoint shipped with v4lens (`"tiny-recall"`: trained on key->value recall,
    see v4lens.train; `seed` is unused), a preset (`"mini-3b"`, `"tiny"`: random-init scaffold,
    the same weights for the same seed on every machine) or a local directory of safetensors (transformers'
    `DeepseekV4ForCausalLM.save_pretrained` layout, or DeepSeek's official names).
    device / dtype: where and in what (fp32 default, or bf16 with fp32 islands) to build it.
    overrides: V4Config fields for a preset (e.g. `use_attn_result=True`).
    """
    path = Path(name_or_path)
    if shipped_checkpoint(str(name_or_path)) is not None:  # trained weights shipped in the package; seed unused
        model = load_checkpoint(shipped_checkpoint(str(name_or_path)), device=device, dtype=dtype, **overrides)
    elif str(name_or_path) in PRESETS:
        if str(name_or_path) in SHIPPED:
            warnings.warn(f"no trained {name_or_path} checkpoint is shipped in this install: random-init weights")
        cfg = preset(str(name_or_path), dtype=resolve_dtype(dtype), device=device, **overrides)
        model = build_empty(cfg, device)
        init_weights(model, seed)
    elif path.is_dir():
        model = load_checkpoint(path, device=device, dtype=dtype, **overrides)
    else:
        raise ValueError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a local checkpoint directory"
        )
    return model.eval()


def build_empty(cfg: V4Config, device=None) -> HookedV4:
    """Allocate the model once on `device` (no initialisation, no second copy)."""
    with torch.device("meta"):
        model = HookedV4(cfg)
    model.to_empty(device=device or "cpu")
    cfg.device = model.device
    return model


# ---------------------------------------------------------------------- random init
_ONES = re.compile(r"(\.w|\.scale)$")
_ZEROS = re.compile(r"(\.base|attn_sink|\.ape|gate\.bias)$")


def init_weights(model: HookedV4, seed: int = 0) -> None:
    """Initialise like the reference / HF: N(0, initializer_range) for matrices, ones for norm weights
    and mHC scales, zeros for biases, sinks and position biases, and a random tid2eid whose rows
    hold distinct experts.

    Each tensor draws from its own CPU generator seeded by (seed, name), so a weight does not
    depend on the device, on the dtype or on which other modules exist.
    """
    std = model.cfg.initializer_range

    @torch.no_grad()  # grad mode is per thread
    def fill(name: str, p: torch.Tensor) -> None:
        if _ONES.search(name):
            p.fill_(1.0)
        elif _ZEROS.search(name):
            p.zero_()
        else:
            gen = _generator(seed, name)
            # fp32 draws (so bf16 weights are the rounded fp32 ones), one expert slice at a time
            for dst in p.unbind(0) if p.ndim == 3 else [p]:
                dst.copy_(torch.empty(dst.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

    with torch.no_grad():
        params = sorted(model.named_parameters(), key=lambda kv: -kv[1].numel())
        # torch kernels release the GIL: filling tensors from two threads halves the build time
        # without changing any value (each tensor has its own generator).
        with ThreadPoolExecutor(max_workers=max(1, min(4, torch.get_num_threads()))) as pool:
            list(pool.map(lambda kv: fill(*kv), params))
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                gen = _generator(seed, name)
                V, k = buf.shape
                rows = torch.rand(V, model.cfg.n_routed_experts, generator=gen).argsort(dim=-1)[:, :k]
                buf.copy_(rows)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 0x9E3779B1 + zlib.crc32(name.encode()))


# ---------------------------------------------------------------------- checkpoints
def detect_format(path: Path) -> str:
    """'hf' (transformers config.json) or 'official' (DeepSeek ModelArgs config.json)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a transformers or DeepSeek checkpoint directory")
    d = json.loads(cfg_file.read_text())
    if d.get("model_type") == "deepseek_v4" or "hidden_size" in d:
        return "hf"
    if "dim" in d and "n_layers" in d:
        return "official"
    raise ValueError(
        f"{cfg_file}: neither a transformers DeepseekV4 config (model_type 'deepseek_v4', hidden_size, ...) "
        "nor DeepSeek's ModelArgs config (dim, n_layers, ...)"
    )


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (from the index if there is one). Pickles are refused."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); v4lens loads safetensors only, because "
                "unpickling can run arbitrary code. Convert them with safetensors.torch.save_file first."
            )
        raise FileNotFoundError(f"{path} has no .safetensors files")
    return files


_QUANTISED = ("F8_E4M3", "I8", "U8")  # stored weight dtypes that come with a scale tensor


class Checkpoint:
    """A local checkpoint directory opened for reading: its layout, config and tensors.

    Each file is validated by safetensors when opened; tensor data is then read with
    positional reads of the byte ranges its header gives (thread-safe, no memory-mapped pages
    that would count in the process's RSS). FP8 / FP4 weights with a `<name>.scale` (or
    `.weight_scale_inv`) are dequantised to fp32 on read. Use as a context manager, or call
    `close()`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.format = detect_format(self.path)
        self.raw_config = json.loads((self.path / "config.json").read_text())
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._entry: dict[str, tuple[Path, int, dict]] = {}  # key -> (file, data start, header entry)
        for f in safetensors_files(self.path):
            for key, (data_start, entry) in read_header(f).items():
                self._entry[key] = (f, data_start, entry)
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

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored, or dequantised to fp32 if it is an FP8 / FP4 weight."""
        tensor = self._read(key)
        if key in self._scale:
            try:
                tensor = dequantize(tensor, self._read(self._scale[key]))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self._entry[key][0]}: cannot dequantise {key}: {e}") from e
        return tensor

    def read_into(self, key: str, dst: torch.Tensor) -> None:
        """Fill `dst` with the tensor (cast, dequantised). A plain tensor already in `dst`'s dtype
        goes from the file straight into `dst`'s CPU memory: loading holds one copy of the model."""
        direct = (
            key not in self._scale and dst.device.type == "cpu" and dst.is_contiguous()
            and DTYPES.get(self.stored_dtype(key)) == dst.dtype
        )  # fmt: skip
        if direct:
            self._read(key, out=dst.detach())
        else:
            with torch.no_grad():
                dst.copy_(self.get(key))

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

    def canonical_keys(self) -> dict[tuple[str, int | None], str]:
        """(v4lens name, expert index or None) -> stored key, for every tensor v4lens uses."""
        out = {}
        for key in self.keys:
            name, expert = canonical_name(key, with_expert=True)
            if name is not None:
                out[(name, expert)] = key
        return out

    def config(self, **overrides) -> V4Config:
        build = V4Config.from_hf if self.format == "hf" else V4Config.from_official
        overrides.setdefault("name", self.path.name)
        return build(self.raw_config, **overrides)

    def has_mtp(self) -> bool:
        return any(name.startswith("mtp.") for name, _ in self.canonical_keys())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_checkpoint(path: Path, device=None, dtype=None, **overrides) -> HookedV4:
    """Load a transformers-layout or official-layout directory, streaming tensor by tensor."""
    with Checkpoint(path) as ckpt:
        cfg = ckpt.config(dtype=resolve_dtype(dtype), device=device, **overrides)
        if cfg.n_mtp_layers and not ckpt.has_mtp():
            warnings.warn(f"{path} has no mtp.* tensors (transformers drops them): building the model without MTP")
            cfg = cfg.without_mtp()
        model = build_empty(cfg, device)
        load_tensors(model, ckpt)
    return model


def load_tensors(model: HookedV4, ckpt: Checkpoint) -> None:
    """Copy every checkpoint tensor into its v4lens parameter; error on missing, extra or mis-shaped ones."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    filled: set[str] = set()
    expert_rows: dict[str, set[int]] = {}
    unexpected = []
    reads: list[tuple[str, torch.Tensor]] = []  # everything is matched and checked before any data is read
    for key in ckpt.keys:
        target_name, expert = canonical_name(key, with_expert=True)
        if target_name is None:
            continue  # tensors v4lens deliberately ignores (e.g. mtp.*.embed)
        if target_name not in targets:
            unexpected.append(key)
            continue
        dst = targets[target_name]
        if expert is not None:
            if dst.ndim != 3 or expert >= dst.shape[0]:
                raise ValueError(f"checkpoint tensor {key}: expert {expert} does not exist in {target_name}")
            dst = dst[expert]
            expert_rows.setdefault(target_name, set()).add(expert)
        if ckpt.shape(key) != tuple(dst.shape):
            raise ValueError(
                f"checkpoint tensor {key} has shape {ckpt.shape(key)} but v4lens {target_name}"
                f"{'' if expert is None else f'[{expert}]'} expects {tuple(dst.shape)}"
            )
        reads.append((key, dst))
        if expert is None:
            filled.add(target_name)
    for name, rows in expert_rows.items():
        if len(rows) == targets[name].shape[0]:
            filled.add(name)
    missing = sorted(set(targets) - filled)
    if unexpected or missing:
        parts = []
        if missing:
            partial = {n: sorted(set(range(targets[n].shape[0])) - expert_rows[n]) for n in missing if n in expert_rows}
            parts.append(f"missing tensors for {missing[:20]}{' ...' if len(missing) > 20 else ''}")
            if partial:
                parts.append(f"missing experts {partial}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))
    # file reads and torch copies release the GIL: a few threads keep the disk / page cache busy
    reads.sort(key=lambda kv: -kv[1].numel())
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda kv: ckpt.read_into(*kv), reads))
