"""Placing a loaded model over devices with accelerate: `load(..., device_map=..., offload_folder=...)`.

accelerate's big-model machinery does the work (`dispatch_model`): each block runs on its device and
its inputs are moved there (activations cross devices as the forward does); a block mapped to
"disk" is written to `offload_folder` and its weights are read back for its forward only, then
dropped (accelerate's `AlignDevicesHook` with the whole block preloaded). Hooks fire on the device
of their block; the decoding cache keeps each layer's state on its layer's device.

The device map names top modules: `embed`, `blocks.{i}`, `hc_head`, `ln_final`, `head`, `mtp.{j}`,
`dspark` or `dspark.stages.{s}` plus the drafter's own tensors (`dspark.main_proj`, ...); a prefix
covers what is below it (`"blocks"` for every block). Values: "cpu", "cuda:i" (or i), "disk". What
the model reads outside a block's forward — the embedding, the head and its final norm and collapse,
MTP blocks, the drafter's own tensors — must sit on one real device (the main device, where the
input tokens go); only main blocks and DSpark stages may go elsewhere (another device, the CPU, disk). "auto" plans the map with
accelerate's `infer_auto_device_map` on per-device budgets (`max_memory={0: "80GB", "cpu": "200GB"}`): the
main modules on the first device, the blocks over what is left in order; "balanced" spreads the blocks
evenly over the GPUs (accelerate's `get_balanced_memory`) before the CPU and disk.

`offload_folder` must be new or empty (a folder holding files is refused: they are not ours to replace,
and accelerate would take an index.json there as complete). A checkpoint folder is read straight into its placement (`load_placed`: one module in memory at a time);
a preset, or a model loaded with `keep_quantized=True`, is built in host memory first, then placed
(`dispatch`); blocks kept quantised cannot go to disk yet.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

_DEVICE = re.compile(r"cpu|disk|cuda(:\d+)?|\d+")
# read by HookedV4 outside any block's forward: must share the main device
_MAIN = ("embed", "hc_head", "ln_final", "head")
_PRELOADED = ["Block", "MTPBlock", "DSparkStage"]  # accelerate loads a whole one of these for its forward


def normalize_device_map(model, device_map: dict) -> dict[str, str | int]:
    """Check a {module prefix: device} map against `model` -> {module: device} covering every tensor once.
    Errors name the module or device at fault; nothing is moved."""
    if not isinstance(device_map, dict) or not device_map:
        raise TypeError(f"device_map must be 'auto', 'balanced' or a non-empty dict {{module: device}}, got {device_map!r}")
    out = {}
    known = set(dict(model.named_modules())) | {n for n, _ in model.named_parameters()}
    for name, device in device_map.items():
        if not isinstance(name, str) or name not in known or name == "":
            raise ValueError(f"device_map: {name!r} is not a module of the model (e.g. 'embed', 'blocks.3', 'head')")
        if isinstance(device, bool) or not _DEVICE.fullmatch(str(device)):
            raise ValueError(f"device_map[{name!r}]: {device!r} is not a device ('cpu', 'cuda:0' or 0, 'disk')")
        out[name] = int(device) if str(device).isdigit() else ("cuda:0" if device == "cuda" else device)
    covered: dict[str, str] = {}
    for tensor_name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        owners = [m for m in out if tensor_name == m or tensor_name.startswith(m + ".")]
        if not owners:
            raise ValueError(f"device_map does not place {tensor_name} (add its module, e.g. "
                             f"{tensor_name.rsplit('.', 1)[0]!r} or a prefix of it)")  # fmt: skip
        if len(owners) > 1:
            raise ValueError(f"device_map places {tensor_name} twice: {owners}")
        covered[tensor_name] = owners[0]
    main = {out[covered[n]] for n, _ in model.named_parameters() if n.split(".")[0] in _MAIN}
    if len(main) != 1 or "disk" in main:
        raise ValueError(f"device_map: embed, hc_head, ln_final and head must share one device that is not 'disk' "
                         f"(the model reads them outside any block), got {sorted(map(str, main))}")  # fmt: skip
    (main,) = main
    for tensor_name, owner in covered.items():  # MTP blocks and the drafter's heads are read outside a forward too
        if out[owner] != main and not re.match(r"(blocks|dspark\.stages)\.\d+\.", tensor_name):
            raise ValueError(f"device_map: {owner!r} must sit on the main device {main!r} with the embedding and head "
                             f"({tensor_name} is read outside a block's forward); only main blocks and DSpark stages "
                             "may go elsewhere")  # fmt: skip
    return out


def _checked_map(model, device_map, offload_folder, max_memory) -> dict:
    if device_map in ("auto", "balanced"):
        device_map = auto_device_map(model, max_memory, balanced=device_map == "balanced")
    elif max_memory is not None and isinstance(max_memory, dict):
        raise ValueError("max_memory as a per-device dict goes with device_map='auto'")
    device_map = normalize_device_map(model, device_map)
    disk = [m for m, d in device_map.items() if d == "disk"]
    if disk and offload_folder is None:
        raise ValueError(f"device_map sends {disk[:3]} to 'disk': give offload_folder= (a directory for their weights)")
    if disk and Path(offload_folder).is_dir() and any(Path(offload_folder).iterdir()):
        # its files are not ours to replace, and accelerate would take an index.json there as complete
        raise ValueError(f"offload_folder {str(offload_folder)!r} is not empty: give a new or empty directory for "
                         "the weights of the blocks on disk (v4lens does not overwrite or mix in other files)")  # fmt: skip
    return device_map


def load_placed(path: Path, device_map, offload_folder=None, dtype=None, max_memory=None, **overrides):
    """A checkpoint folder read straight into its placement: the whole checkpoint is matched and checked first,
    then each mapped module is filled on the CPU and moved to its device, or written to `offload_folder` and
    dropped — so a model larger than memory loads with one module in memory at a time."""
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    from ..model import HookedV4
    from .checkpoint import Checkpoint
    from .loading import checkpoint_config, load_tensors

    with Checkpoint(path) as ckpt:
        cfg = checkpoint_config(ckpt, dtype, None, overrides)
        with torch.device("meta"):
            model = HookedV4(cfg)
        device_map = _checked_map(model, device_map, offload_folder, max_memory)
        load_tensors(model, ckpt, dry_run=True)  # every error before anything is read or written
        index: dict = {}
        for name, device in device_map.items():
            module = model.get_submodule(name)
            module.to_empty(device="cpu")
            load_tensors(model, ckpt, only=name)
            if device == "disk":
                Path(offload_folder).mkdir(parents=True, exist_ok=True)
                for pname, p in list(module.named_parameters()):
                    index = offload_weight(p.detach(), f"{name}.{pname}", str(offload_folder), index=index)
                    set_module_tensor_to_device(model, f"{name}.{pname}", "meta")
                del p
                _give_back_freed_memory()
            else:
                module.to(device)
        if index:
            save_offload_index(index, str(offload_folder))
    return _dispatch(model, device_map, offload_folder)


def _give_back_freed_memory() -> None:
    """glibc keeps freed heap pages of tensors below its mmap threshold (which grows to 32 MB after large
    frees): without this, each block written to disk would leave its memory resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def dispatch(model, device_map, offload_folder=None, max_memory=None):
    """Place `model` (loaded, on the CPU) by `device_map` ("auto", "balanced" or a dict, see the module docstring)."""
    from accelerate.utils import offload_state_dict, set_module_tensor_to_device

    device_map = _checked_map(model, device_map, offload_folder, max_memory)
    disk = [m for m, d in device_map.items() if d == "disk"]
    # parameters only: buffers (hash tables) stay in memory, where accelerate moves them for the forward
    on_disk = {n: t for n, t in model.named_parameters() if any(n.startswith(m + ".") for m in disk)}
    if any(hasattr(t, "stored_tensors") for t in on_disk.values()):
        raise ValueError("blocks kept quantised (keep_quantized=True) cannot be offloaded to disk yet; place them on a "
                         "device, or load without keep_quantized")  # fmt: skip
    if on_disk:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        offload_state_dict(str(offload_folder), {n: t.detach() for n, t in on_disk.items()})
        for n in on_disk:
            set_module_tensor_to_device(model, n, "meta")
    return _dispatch(model, device_map, offload_folder)


def _dispatch(model, device_map: dict, offload_folder):
    """accelerate's hooks on a model whose modules sit where `device_map` says (disk ones in offload_folder)."""
    import warnings

    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device

    disk = [m for m, d in device_map.items() if d == "disk"]
    main = device_map["embed"] if "embed" in device_map else next(d for m, d in device_map.items() if m in _MAIN)
    modules = dict(model.named_modules())
    for name, device in device_map.items():  # a module's own tensors named singly (the drafter's, when its
        if name not in modules:              # stages sit elsewhere): accelerate hooks modules only, so move them
            set_module_tensor_to_device(model, name, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following device_map keys do not match any submodules")
        dispatch_model(model, device_map=device_map, main_device=main, offload_dir=str(offload_folder) if disk else None,
                       preload_module_classes=_PRELOADED)  # fmt: skip
    for name in disk:  # after accelerate has dropped the block's weights again (its hook wraps forward)
        model.get_submodule(name).register_forward_hook(lambda *_: _give_back_freed_memory())
    model.cfg.device = model.embed.weight.device  # the main device: where input tokens go
    model.v4lens_device_map = dict(device_map)
    return model


def auto_device_map(model, max_memory, balanced: bool = False) -> dict:
    """accelerate's plan over `max_memory` ({device: bytes or "80GB"}): whole blocks, the modules read outside
    a block on the first device (`placement.plan_placement`); `balanced` spreads the blocks evenly over GPUs."""
    from .placement import plan_placement

    if not isinstance(max_memory, dict):
        raise ValueError("device_map='auto' needs max_memory={device: budget}, e.g. {0: '80GB', 'cpu': '200GB'}")
    kept = any(hasattr(p, "stored_tensors") for p in model.parameters())
    mode = "stored" if kept else ("fp32" if model.cfg.dtype == torch.float32 else "bf16")
    return plan_placement(model.cfg, max_memory, mode, balanced=balanced).device_map
