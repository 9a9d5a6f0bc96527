"""Writing checkpoints: transformers' DeepseekV4 layout or DeepSeek's official layout, as safetensors.

Both layouts hold one tensor per expert (`...experts.{e}.w1.weight`); v4lens stacks them.
Tensors are written in the dtype the model holds them in (a bf16 model: bf16 matrices, its
fp32 islands in fp32), so `v4lens.load` gives back the same bits.

Every writer goes through `weights.atomic.writing_checkpoint`: a folder that is not empty and not a
checkpoint v4lens wrote is refused unless overwrite=True, only files v4lens wrote are replaced, and
the new files reach the folder only once all of them are complete (an interrupted save leaves the
old checkpoint as it was).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..model.config import V4Config, resolve_dtype
from .at_rest import QuantizedWeight
from .atomic import writing_checkpoint
from .names import hf_saved_name, official_name
from .safetensors_io import write_file

FORMATS = ("hf", "official")
_STACKED_EXPERTS = re.compile(r"\.experts\.w[123]$")


def save_pretrained(
    model, path: str | Path, format: str = "hf", max_shard_size: int | str = "5GB", dtype=None, metadata=None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write `model` (a HookedV4) to the directory `path`; returns the path.

    format: "hf" (transformers' `save_pretrained` layout and config.json, loadable by
    `AutoModelForCausalLM.from_pretrained`; the MTP block or the DSpark drafter under their official
    `mtp.{i}.*` names, which transformers ignores) or "official" (DeepSeek's names and ModelArgs config.json).
    max_shard_size: bytes or a string like "5GB"; larger checkpoints are sharded with an index.
    dtype: cast the matrices (not the fp32 islands) before writing: torch.float32 / torch.bfloat16 or
    "fp32" / "float32" / "bf16" / "bfloat16" (the dtypes v4lens loads back).
    metadata: extra string key/values for the safetensors header.
    overwrite: write into a non-empty folder that v4lens did not write (its model*.safetensors, index,
    config.json and slice.json are replaced; other files are kept). Without it that is a FileExistsError.
    """
    dtype = _save_dtype(dtype)
    shard_size_bytes(max_shard_size)  # a bad size fails before the state dict is cast
    islands = model._fp32_islands
    state = model.state_dict()
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() and n not in islands else t for n, t in state.items()}
    return write_checkpoint(path, state, model.cfg, format, max_shard_size, metadata, overwrite=overwrite)


def _save_dtype(dtype) -> torch.dtype | None:
    """Only dtypes `v4lens.load` reads back: saving fp16 or int8 would write a checkpoint it refuses."""
    ok = dtype is None or dtype in (torch.float32, torch.bfloat16) or dtype in ("fp32", "float32", "bf16", "bfloat16")
    if not ok:
        raise ValueError(
            "dtype must be torch.float32 or torch.bfloat16 (or 'fp32' / 'float32' / 'bf16' / 'bfloat16'), "
            f"the dtypes v4lens loads; got {dtype!r}"
        )
    return None if dtype is None else resolve_dtype(dtype)


def write_checkpoint(
    path: str | Path, state: dict[str, torch.Tensor], cfg: V4Config, format: str = "hf",
    max_shard_size: int | str = "5GB", metadata: dict | None = None, progress: bool = False, *,
    overwrite: bool = False, extra_files: dict[str, str] | None = None, ours=(),
) -> Path:  # fmt: skip
    """Write a v4lens-named state dict (stacked experts) and its config in `format`, atomically.

    extra_files: more files of the checkpoint (name -> text: slice.json, train.json), written with it.
    overwrite / ours: see `weights.atomic.check_target`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    shard_bytes = shard_size_bytes(max_shard_size)
    with writing_checkpoint(path, overwrite, ours) as tmp:
        write_config(tmp, cfg, format)
        stages = cfg.n_mtp_layers if cfg.draft == "dspark" else 0  # DSpark's names depend on its stage count
        write_safetensors(tmp, layout_tensors(state, format, stages), shard_bytes, metadata, progress)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def layout_tensors(
    state: dict[str, torch.Tensor], format: str, dspark_stages: int = 0
) -> Iterable[tuple[str, torch.Tensor]]:  # fmt: skip
    """v4lens names -> (name in `format`, tensor), one tensor per expert. dspark_stages: the model's DSpark
    stage count (0: not DSpark), which places the drafter's heads on its last stage."""
    for name, t in state.items():
        stacked = _STACKED_EXPERTS.search(name)
        kept = t.stored_tensors if isinstance(t, QuantizedWeight) else None  # a weight kept quantised (weights.at_rest)
        for expert in range(t.shape[0]) if stacked else [None]:
            key = official_name(name, expert, dspark_stages)
            if kept is not None and format == "official":  # written back as it was read: data and scale
                q, s = kept()
                yield key, (q if expert is None else q[expert])
                yield key.removesuffix(".weight") + ".scale", (s if expert is None else s[expert])
                continue
            value = t if expert is None else t[expert]  # one expert at a time (dequantised if kept quantised)
            if kept is not None and expert is None:
                value = t.dequantize()
            if name.endswith("tid2eid"):  # official: int32; transformers writes its int64 buffer
                value = value.to(torch.int32 if format == "official" else torch.int64)
            yield (hf_saved_name(key) if format == "hf" else key), value


def write_config(path: Path, cfg: V4Config, format: str) -> None:
    if format == "hf":
        hf = cfg.to_hf()
        hf.architectures = ["DeepseekV4ForCausalLM"]
        d = hf.to_dict()
        d["dtype"] = str(cfg.torch_dtype).removeprefix("torch.")
        if cfg.n_mtp_layers:  # transformers has no MTP; keep its attention type for v4lens
            d["v4lens_mtp_compress_ratios"] = [cfg.compress_ratio(cfg.n_layers + j) for j in range(cfg.n_mtp_layers)]
    else:
        d = cfg.to_official()
        d["dtype"] = "bf16"  # ModelArgs' only unquantised choice; fp32 tensors load into it too
    (path / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int,
    metadata: dict | None = None, progress: bool = False,
) -> None:  # fmt: skip
    """One `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`,
    into the folder `path`, which holds no other safetensors (write_checkpoint gives it a fresh one)."""
    from tqdm.auto import tqdm

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
        total += nbytes
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in tqdm(list(zip(names, shards)), desc="writing shards", disable=not progress):
        write_file(path / file, shard, meta)
    if len(shards) > 1:
        weight_map = {n: file for file, shard in zip(names, shards) for n, _ in shard}
        index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def shard_size_bytes(size: int | str) -> int:
    """max_shard_size (bytes, or a string like "5GB" / "100KB") -> a positive number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper()) if isinstance(size, str) else None
    if match:
        n = int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])
    elif isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        raise ValueError(f"max_shard_size must be a number of bytes or a string like '5GB', not {size!r}")
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r} ({n} bytes)")
    return n
