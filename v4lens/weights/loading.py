"""Building models: the seeded random-init scaffold and local safetensors checkpoints.

Nothing here downloads anything. Only safetensors files are read (never pickles).
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..model import HookedV4
from ..model.config import V4Config, resolve_dtype
from ..model.presets import PRESETS
from ..model.presets import preset as preset_config
from .checkpoint import Checkpoint, detect_format, safetensors_files  # noqa: F401  (re-exported)
from .memory import ModelTooLargeError, check_memory, model_bytes, parse_bytes  # noqa: F401  (re-exported)
from .names import canonical_name, official_name

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
def load(
    name_or_path: str | Path | None = None, device=None, dtype=None, seed: int = 0, *,
    preset: str | None = None, max_memory: int | str | None = None, draft: str | None = "preset",
    keep_quantized: bool = False, device_map=None, offload_folder=None, expert_offload: str | None = None,
    expert_cache: int | str = "4GB", **overrides,
) -> HookedV4:  # fmt: skip
    """A model in eval mode.

    name_or_path: a checkpoint shipped with v4lens (`"tiny-recall"`: trained on key->value recall,
    see v4lens.train; `seed` is unused), a preset (`"mini-3b"`, `"tiny"`: random-init scaffold,
    the same weights for the same seed on every machine) or a local directory of safetensors (transformers'
    `DeepseekV4ForCausalLM.save_pretrained` layout, or DeepSeek's official names). A name that is
    also a checkpoint folder in the current directory is refused as ambiguous: say `"./tiny"` for
    the folder (a Path is always a folder) or `preset="tiny"` for the preset.
    preset: a preset or shipped checkpoint by name, never a folder (instead of name_or_path).
    device / dtype: where and in what (fp32 default, or bf16 with fp32 islands) to build it.
    max_memory: the most bytes the model may take (an int, or a string like "20GB"); default: the
        device's free memory. A model that does not fit is refused (ModelTooLargeError, a
        MemoryError and ValueError) before anything is allocated.
    draft: a preset's draft module: "preset" (default: the preset's own), "mtp" (one April MTP block),
        "dspark" (the DSpark drafter of V4-Flash-0731: 3 stages tapping the last three backbone layers, blocks
        of 5, noise token 128799, Markov rank 256; `tiny` takes tiny-dspark's) or None (none), e.g.
        `load("mini-3b", draft="dspark")`; see `v4lens.model.presets.preset`. A checkpoint decides its own
        draft module: any other value with a checkpoint is an error.
    keep_quantized: (a checkpoint with FP8 / FP4 tensors) keep them as stored in memory, dequantised at each
        use (`v4lens.weights.at_rest`): about the checkpoint's size in memory, the same outputs bit for bit;
        such weights cannot be edited in place.
    device_map: place the model over devices with accelerate ("auto" or "balanced" with max_memory={device: budget}, or
        {module: device} with devices "cpu", "cuda:i", "disk"); offload_folder: where "disk" blocks go. The
        model is loaded on the CPU first, then placed (`v4lens.weights.dispatch`).
    expert_offload: (a checkpoint) keep the routed experts in host memory ("cpu") or in the checkpoint's
        files ("disk") and bring the ones the router picks to `device`, through a cache of `expert_cache`
        bytes of experts on it (`model.expert_cache`; `v4lens.weights.expert_offload`).
    overrides: V4Config fields for a preset (e.g. `use_attn_result=True`).
    """
    check_seed(seed, "load")
    if expert_offload is not None:
        if expert_offload not in ("cpu", "disk"):
            raise ValueError(f"expert_offload must be 'cpu' or 'disk' (where the routed experts stay), got {expert_offload!r}")
        if device_map is not None:
            raise ValueError("expert_offload and device_map do not combine yet: give device= for the rest of the model")
        if name_or_path is None or _model_name(name_or_path, preset) is not None:
            raise ValueError("expert_offload reads a checkpoint folder's experts; pass the folder, not a preset")
    if device_map is not None or offload_folder is not None:
        from .dispatch import dispatch

        if device_map is None:
            raise ValueError("offload_folder goes with device_map (the blocks it maps to 'disk')")
        if max_memory is not None and not isinstance(max_memory, dict):
            raise ValueError(f"with device_map, max_memory is a per-device dict ({{0: '80GB', 'cpu': '200GB'}}) for "
                             f"device_map='auto', got {max_memory!r}")  # fmt: skip
        if device not in (None, "cpu") and device != torch.device("cpu"):
            raise ValueError(f"device={device!r} and device_map: give the devices in device_map only")
        folder = name_or_path is not None and _model_name(name_or_path, preset) is None
        if folder and not keep_quantized:  # read straight into the placement, one module at a time
            from .dispatch import load_placed

            return load_placed(Path(name_or_path), device_map, offload_folder, dtype, max_memory, **overrides).eval()
        budget = max_memory if not isinstance(max_memory, dict) else None
        model = load(name_or_path, None, dtype, seed, preset=preset, max_memory=budget, draft=draft,
                     keep_quantized=keep_quantized, **overrides)  # fmt: skip
        return dispatch(model, device_map, offload_folder, max_memory).eval()
    name = _model_name(name_or_path, preset)
    is_preset = name is not None and name in PRESETS and shipped_checkpoint(name) is None
    if keep_quantized and is_preset:
        raise ValueError(f"keep_quantized=True keeps a checkpoint's FP8 / FP4 tensors quantised; {name!r} is a preset "
                         "(random-init weights, nothing quantised): pass a checkpoint folder")  # fmt: skip
    if draft != "preset" and not is_preset:
        raise ValueError(f"draft={draft!r} chooses a preset's draft module; {name or str(name_or_path)!r} is a "
                         "checkpoint, whose tensors decide its draft module (leave draft= out)")  # fmt: skip
    if name is not None and shipped_checkpoint(name) is not None:  # trained weights shipped in the package
        path = shipped_checkpoint(name)
        model = load_checkpoint(path, device=device, dtype=dtype, max_memory=max_memory, keep_quantized=keep_quantized,
                                **overrides)  # fmt: skip
    elif name is not None and name in PRESETS:
        if name in SHIPPED:
            warnings.warn(f"no trained {name} checkpoint is shipped in this install: random-init weights")
        cfg = preset_config(name, draft=draft, dtype=resolve_dtype(dtype), device=device, **overrides)
        model = build_empty(cfg, device, max_memory)
        init_weights(model, seed)
    elif name is None and Path(name_or_path).is_dir():
        model = load_checkpoint(Path(name_or_path), device=device, dtype=dtype, max_memory=max_memory,
                                keep_quantized=keep_quantized, expert_offload=expert_offload,
                                expert_cache=expert_cache, **overrides)  # fmt: skip
    else:
        raise ValueError(
            f"{name if name is not None else name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
            "nor a local checkpoint directory"
        )
    return model.eval()


def _model_name(name_or_path, preset: str | None) -> str | None:
    """The preset / shipped checkpoint `load` was asked for by name, or None for a directory."""
    if preset is not None:
        if name_or_path is not None:
            raise ValueError(f"give a name or path, or preset=, not both (got {name_or_path!r} and preset={preset!r})")
        if not isinstance(preset, str) or (preset not in PRESETS and preset not in SHIPPED):
            raise ValueError(f"preset={preset!r} is not a preset; presets: {', '.join(PRESETS)}")
        return preset
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a preset name or a checkpoint directory (or give preset=...), "
                        f"got {name_or_path!r}")  # fmt: skip
    names = {*PRESETS, *SHIPPED}
    if isinstance(name_or_path, str) and name_or_path in names:
        if (Path(name_or_path) / "config.json").is_file():  # "tiny" is a preset and ./tiny a checkpoint
            raise ValueError(
                f"{name_or_path!r} is both a model v4lens knows by name and a checkpoint folder here "
                f"({Path(name_or_path).resolve()}); say which: v4lens.load('./{name_or_path}') for the folder, "
                f"or v4lens.load(preset='{name_or_path}') for the named model"
            )
        return name_or_path
    if isinstance(name_or_path, Path) and str(name_or_path) in names and not name_or_path.is_dir():
        return str(name_or_path)  # a Path is a folder; with no such folder, Path("tiny") keeps meaning the preset
    return None


def build_empty(cfg: V4Config, device=None, max_memory=None) -> HookedV4:
    """Allocate the model once on `device` (no initialisation, no second copy), after checking that it
    fits (`max_memory`, default the device's free memory): ModelTooLargeError otherwise."""
    check_memory(cfg, device, max_memory)  # a lower bound from the config, before even the meta build
    with torch.device("meta"):
        model = HookedV4(cfg)
    check_memory(cfg, device, max_memory, model_bytes(model))  # exact: fp32 islands and buffers included
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
    check_seed(seed, "init_weights")
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


def check_seed(seed, where: str) -> None:
    """The random init's seed: an int in [0, 2**32) (`_generator` mixes it into a 64-bit seed)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"{where}: seed must be an int in [0, 2**32) (it seeds the random init), got {seed!r}")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 0x9E3779B1 + zlib.crc32(name.encode()))


# ---------------------------------------------------------------------- checkpoints
def load_checkpoint(path: Path, device=None, dtype=None, max_memory=None, keep_quantized=False, expert_offload=None,
                    expert_cache="4GB", **overrides) -> HookedV4:  # fmt: skip
    """Load a transformers-layout or official-layout directory, streaming tensor by tensor (FP8 / FP4 tensors
    dequantised, or with keep_quantized kept as stored: `v4lens.weights.at_rest`)."""
    with Checkpoint(path) as ckpt:
        cfg = checkpoint_config(ckpt, dtype, device, overrides)
        if expert_offload is not None:
            from .expert_offload import build_offloaded

            cache = parse_bytes(expert_cache, "expert_cache")
            model, read = build_offloaded(cfg, ckpt, device, max_memory, expert_offload, cache, keep_quantized)
            load_tensors(model, ckpt, already_read=read)
        elif keep_quantized:
            from .at_rest import build_quantized

            model, read = build_quantized(cfg, ckpt, device, max_memory)
            load_tensors(model, ckpt, already_read=read)
        else:
            model = build_empty(cfg, device, max_memory)
            load_tensors(model, ckpt)
    return model


def checkpoint_config(ckpt: Checkpoint, dtype, device, overrides: dict) -> V4Config:
    """The model config of an open checkpoint: its config.json with `overrides`, checked against its draft
    tensors; without mtp.* tensors (transformers drops them) the draft module is left out, with a warning."""
    cfg = ckpt.config(dtype=resolve_dtype(dtype), device=device, **overrides)
    ckpt.check_draft(cfg)  # April MTP tensors with a DSpark config, or the other way round: before allocating
    if cfg.n_mtp_layers and not ckpt.has_mtp():
        kind = "its DSpark drafter" if cfg.draft == "dspark" else "MTP"
        warnings.warn(f"{ckpt.path} has no mtp.* tensors (transformers drops them): building the model without {kind}")
        cfg = cfg.without_draft()
    return cfg


def _stored_name(name: str, dspark_stages: int) -> str:
    """The official (and transformers-layout) name of a DSpark tensor; `{e}` for each expert of a stacked one."""
    return official_name(name, dspark_stages=dspark_stages).replace(".experts.w", ".experts.{e}.w")


def load_tensors(model: HookedV4, ckpt: Checkpoint, already_read: frozenset | set = frozenset(), *,
                 only: str | None = None, dry_run: bool = False) -> None:  # fmt: skip
    """Copy every checkpoint tensor into its v4lens parameter; error on missing, extra or mis-shaped ones.

    The `mtp.*` tensors are read as the model's draft module: April MTP blocks, or DSpark stages and heads.
    already_read: stored keys whose parameters hold them already (kept quantised): matched, not read.
    only: read just the tensors of this module (a name prefix; the rest of the model may be on meta);
    dry_run: match and check everything, read nothing (the model may be on meta)."""
    cfg = model.cfg
    stages = cfg.n_mtp_layers if cfg.draft == "dspark" else 0
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    filled: set[str] = set()
    expert_rows: dict[str, set[int]] = {}
    unexpected = []
    reads: list[tuple[str, torch.Tensor]] = []  # everything is matched and checked before any data is read
    if only is not None:
        targets = {n: t for n, t in targets.items() if n.startswith(only + ".")}
    for key in ckpt.keys:
        target_name, expert = canonical_name(key, with_expert=True, dspark_stages=stages)
        if target_name is None:
            continue  # tensors v4lens deliberately ignores (e.g. mtp.*.embed)
        if only is not None and not (target_name or "").startswith(only + "."):
            continue  # another module's (a dry run over the whole model has checked them)
        if target_name not in targets:
            unexpected.append(key)
            continue
        dst = targets[target_name]
        shape = tuple(dst.shape)
        if expert is not None:
            if dst.ndim != 3 or expert >= dst.shape[0]:
                raise ValueError(f"checkpoint tensor {key}: expert {expert} does not exist in {target_name}")
            shape = shape[1:]
            expert_rows.setdefault(target_name, set()).add(expert)
        if ckpt.shape(key) != shape:
            raise ValueError(
                f"checkpoint tensor {key} has shape {ckpt.shape(key)} but v4lens {target_name}"
                f"{'' if expert is None else f'[{expert}]'} expects {shape}"
            )
        if key not in already_read:  # detached: no autograd view bookkeeping (load may run under no_grad)
            reads.append((key, dst.detach() if expert is None else dst.detach()[expert]))
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
            # a DSpark tensor's stored name depends on the config (the heads sit on the last stage): give it too
            shown = [f"{n} ({_stored_name(n, stages)})" if n.startswith("dspark.") and n not in partial else n
                     for n in missing[:20]]  # fmt: skip
            parts.append(f"missing tensors for {shown}{' ...' if len(missing) > 20 else ''}")
            if partial:
                parts.append(f"missing experts {partial}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))
    if dry_run:
        return
    # file reads and torch copies release the GIL: a few threads keep the disk / page cache busy
    reads.sort(key=lambda kv: -kv[1].numel())
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda kv: ckpt.read_into(*kv), reads))
    if ckpt.non_finite:  # one warning for all: a corrupt shard can hold hundreds
        bad = sorted(set(ckpt.non_finite))
        warnings.warn(
            f"{ckpt.path}: non-finite values (NaN / Inf) in {len(bad)} tensor(s): {bad[:20]}"
            f"{' ...' if len(bad) > 20 else ''}; the model's outputs through them will be NaN / Inf"
        )
