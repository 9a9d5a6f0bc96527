"""Writing checkpoints: transformers' DeepseekV4 layout or DeepSeek's official layout, as safetensors.

Both layouts hold one tensor per expert (`...experts.{e}.w1.weight`); v4lens stacks them.
Tensors are written in the dtype the model holds them in (a bf16 model: bf16 matrices, its
fp32 islands in fp32), so `v4lens.load` gives back the same bits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..model.config import V4Config
from .names import hf_saved_name, official_name
from .safetensors_io import write_file

FORMATS = ("hf", "official")
_STACKED_EXPERTS = re.compile(r"\.experts\.w[123]$")


def save_pretrained(
    model, path: str | Path, format: str = "hf", max_shard_size: int | str = "5GB", dtype=None, metadata=None
) -> Path:
    """Write `model` (a HookedV4) to the directory `path`; returns the path.

    format: "hf" (transformers' `save_pretrained` layout and config.json, loadable by
    `AutoModelForCausalLM.from_pretrained`; the MTP block under `mtp.{i}.*`, which
    transformers ignores) or "official" (DeepSeek's names and ModelArgs config.json).
    max_shard_size: bytes or a string like "5GB"; larger checkpoints are sharded with an index.
    dtype: cast the matrices (not the fp32 islands) before writing, e.g. torch.bfloat16.
    metadata: extra string key/values for the safetensors header.
    """
    islands = model._fp32_islands
    state = model.state_dict()
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() and n not in islands else t for n, t in state.items()}
    return write_checkpoint(path, state, model.cfg, format, max_shard_size, metadata)


def write_checkpoint(
    path: str | Path, state: dict[str, torch.Tensor], cfg: V4Config, format: str = "hf",
    max_shard_size: int | str = "5GB", metadata: dict | None = None, progress: bool = False,
) -> Path:  # fmt: skip
    """Write a v4lens-named state dict (stacked experts) and its config in `format`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, cfg, format)
    write_safetensors(path, layout_tensors(state, format), _bytes(max_shard_size), metadata, progress)
    return path


def layout_tensors(state: dict[str, torch.Tensor], format: str) -> Iterable[tuple[str, torch.Tensor]]:
    """v4lens names -> (name in `format`, tensor), one tensor per expert."""
    for name, t in state.items():
        rows = enumerate(t) if _STACKED_EXPERTS.search(name) else [(None, t)]
        for expert, value in rows:
            key = official_name(name, expert)
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
    """One `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`."""
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
    for stale in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        stale.unlink()  # a previous save's shards would otherwise be read too
    for file, shard in tqdm(list(zip(names, shards)), desc="writing shards", disable=not progress):
        write_file(path / file, shard, meta)
    if len(shards) > 1:
        weight_map = {n: file for file, shard in zip(names, shards) for n, _ in shard}
        index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _bytes(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', not {size!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])
