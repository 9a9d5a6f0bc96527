"""What a V4 model needs in memory in each weight mode, and where accelerate would place it.

Computed from the config alone, on the meta device (no memory, no weights):

- `weight_bytes(cfg)`: bytes of the weights in each mode — "fp32" and "bf16" resident (as
  `v4lens.load` builds them: fp32 islands stay fp32), and "stored", as DeepSeek ships them: FP8
  e4m3 matrices with 128×128 e8m0 scales, FP4 e2m1 routed experts (two per byte) with 1×32 e8m0
  scales, the rest in the release's dtypes (bf16; fp32 mHC, sinks, compressor `ape`, router bias;
  int32 hash tables). Split into routed experts and everything else, since the experts are what
  an offload keeps off the GPU.
- `plan_placement(cfg, max_memory, mode)`: accelerate's `infer_auto_device_map` over the model's
  top modules (embedding, each block, the draft module's blocks, the head; a block is never
  split), with each tensor sized as `mode` stores it. `max_memory` names devices as accelerate
  does ({0: "141GB", "cpu": "512GB", "disk": "4TB"}, or "cuda:0" for 0); the first device that
  has room takes each module in order.

This is the planning half of running the full-size models: it says what fits where before
anything is downloaded or allocated (`v4lens info MODEL --memory`).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass

import torch

from ..model.config import V4Config
from .memory import parse_bytes

MODES = ("fp32", "bf16", "stored")
# v4lens names of the matrices DeepSeek ships in FP8 (128×128 scales) and of the FP4 routed experts
_FP8 = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.indexer\.wq_b|\.shared_experts\.w[123]|\.(e_proj|h_proj)|"
                  r"^dspark\.main_proj)$")  # fmt: skip
_FP4 = re.compile(r"\.mlp\.experts\.w[123]$")
_FP32 = re.compile(r"(_hc\.(fn|base|scale)|hc_head\.(fn|base|scale)|\.attn_sink|\.ape|\.gate\.bias)$")


def stored_bytes(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one v4lens tensor as DeepSeek stores it (its scales included)."""
    n = math.prod(shape)
    if _FP4.search(name):  # [E, out, in]: packed two per byte, one e8m0 scale per 1×32 block
        E, out, inp = shape
        return E * out * (inp // 2 + math.ceil(inp / 32))
    if _FP8.search(name):  # [out, in]: one byte each, one e8m0 scale per 128×128 block
        out, inp = shape
        return n + math.ceil(out / 128) * math.ceil(inp / 128)
    if _FP32.search(name):
        return 4 * n
    if dtype in (torch.int32, torch.int64):  # tid2eid: int32 in the release
        return 4 * n
    return 2 * n  # bf16


def _meta_model(cfg: V4Config, dtype: torch.dtype):
    from ..model import HookedV4

    with torch.device("meta"):
        return HookedV4(cfg.replace(dtype=dtype, device=None))


@dataclass
class WeightBytes:
    """Bytes per mode: {"fp32": ..., "bf16": ..., "stored": ...} for the routed experts and the rest."""

    experts: dict[str, int]
    other: dict[str, int]

    def total(self, mode: str) -> int:
        return self.experts[mode] + self.other[mode]


def weight_bytes(cfg: V4Config) -> WeightBytes:
    """The weights' bytes in each mode (see the module docstring), from the config alone."""
    experts, other = dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0)
    for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _meta_model(cfg, dtype)
        for name, t in model.state_dict().items():
            (experts if _FP4.search(name) else other)[mode] += t.numel() * t.element_size()
    for name, t in model.state_dict().items():  # the bf16 model's tensors, sized as stored
        (experts if _FP4.search(name) else other)["stored"] += stored_bytes(name, tuple(t.shape), t.dtype)
    return WeightBytes(experts, other)


@dataclass
class Placement:
    """Where each top module goes (`device_map`, accelerate's format) and the bytes each device holds."""

    mode: str
    device_map: dict[str, int | str]
    bytes_per_device: dict[int | str, int]
    max_memory: dict[int | str, int]

    def summary(self) -> list[str]:
        """One line per device: its modules (ranges of blocks collapsed) and bytes against its budget."""
        by_device: dict = {}
        for module, device in self.device_map.items():
            if module.startswith("dspark.") and not module.startswith("dspark.stages"):
                module = "dspark (its own tensors)"  # main_proj, norms, head collapse, Markov and confidence heads
                if module in by_device.get(device, []):
                    continue
            by_device.setdefault(device, []).append(module)
        lines = []
        for device, modules in by_device.items():
            used, budget = self.bytes_per_device.get(device, 0), self.max_memory.get(device)
            label = f"cuda:{device}" if isinstance(device, int) else device
            where = _collapse(modules) if modules != [""] else "the whole model"
            lines.append(f"{label}: {where} — {used / 1e9:.1f} GB of {budget / 1e9:.1f} GB")
        return lines


def plan_placement(cfg: V4Config, max_memory: dict, mode: str = "bf16", balanced: bool = False) -> Placement:
    """accelerate's device map for `cfg` with tensors sized as `mode` ("fp32", "bf16" or "stored") keeps them.

    max_memory: {device: bytes or "141GB"}; devices 0, 1, ... (or "cuda:0"), "cpu", "disk". What the model
    reads outside a block's forward (embedding, head and its norm and collapse, MTP blocks, the drafter's
    own tensors) goes to the first device (the main one, where the tokens go); accelerate places the main
    blocks and DSpark stages over what is left, first device first, or spread evenly over the GPUs with
    `balanced=True` (accelerate's `get_balanced_memory`). A budget that cannot hold the largest block
    anywhere, or the main modules on the first device, is an error naming both sizes."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    budgets = _budgets(max_memory)
    model = _meta_model(cfg, torch.float32 if mode == "fp32" else torch.bfloat16)
    if mode == "stored":
        _resize_as_stored(model)
    sizes = _unsplit_module_bytes(model)
    biggest = max(sizes, key=sizes.get)
    if sizes[biggest] > max(budgets.values()):
        raise ValueError(f"{biggest} takes {sizes[biggest] / 1e9:.2f} GB ({mode}), more than any device's budget "
                         f"({max(budgets.values()) / 1e9:.2f} GB): it cannot be placed whole")  # fmt: skip
    placed = torch.nn.Module()  # what may leave the main device: the blocks and the DSpark stages
    placed.blocks = model.blocks
    if getattr(model, "dspark", None) is not None:
        placed.dspark = torch.nn.Module()
        placed.dspark.stages = model.dspark.stages
    main_bytes = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                     if not name.startswith(("blocks.", "dspark.stages.")))  # fmt: skip
    devices = sorted((d for d in budgets if isinstance(d, int)), key=int) + [d for d in ("cpu", "disk") if d in budgets]
    main = next(d for d in devices if d != "disk") if set(devices) != {"disk"} else None
    if main is None or main_bytes > budgets[main]:
        raise ValueError(f"the embedding, head and other modules read outside a block take {main_bytes / 1e9:.2f} GB "
                         f"({mode}) and must sit together on the first device, {main!r}, whose budget is "
                         f"{budgets.get(main, 0) / 1e9:.2f} GB")  # fmt: skip
    left = dict(budgets) | {main: budgets[main] - main_bytes}
    quiet = logging.getLogger("accelerate.utils.modeling")  # planning for GPUs this machine may not have
    level, quiet.level = quiet.level, logging.ERROR
    unsplit = ["Block", "MTPBlock", "DSparkStage"]
    try:
        with warnings.catch_warnings():  # its advice on offload buffers is about loading, not planning
            warnings.simplefilter("ignore", UserWarning)
            if balanced and sum(isinstance(d, int) for d in left) > 1:
                left = get_balanced_memory(placed, max_memory=left, no_split_module_classes=unsplit)
            blocks_map = infer_auto_device_map(placed, max_memory=left, no_split_module_classes=unsplit)
    finally:
        quiet.setLevel(level)
    if "" in blocks_map:  # everything fits one device
        blocks_map = {name: blocks_map[""] for name in ("blocks", "dspark.stages") if name.split(".")[0] in dict(placed.named_children())}
    blocks_map = {("dspark.stages" if m == "dspark" else m): d for m, d in blocks_map.items()}  # the wrapper's names
    device_map = {name: main for name, child in model.named_children() if name != "blocks" and _bytes(child)}
    if "dspark" in device_map:  # the drafter's own tensors stay on main; its stages go where planned
        del device_map["dspark"]
        device_map |= {f"dspark.{name}": main for name, child in model.dspark.named_children()
                       if name != "stages" and _bytes(child)}  # fmt: skip
        device_map |= {f"dspark.{name}": main for name, _ in model.dspark.named_parameters(recurse=False)}
    device_map |= blocks_map
    stages = {d for m, d in device_map.items() if m.startswith("dspark.stages")}
    if stages == {main}:  # the whole drafter on the main device: one entry
        device_map = {m: d for m, d in device_map.items() if not m.startswith("dspark.")} | {"dspark": main}
    used: dict = {}
    for module, device in list(device_map.items()):
        size = _bytes(model.get_submodule(module)) if module in dict(model.named_modules()) else _param_bytes(model, module)
        if size == 0:  # hook points and empty module lists hold nothing
            del device_map[module]
            continue
        used[device] = used.get(device, 0) + size
    if left := {d: n for d, n in used.items() if d not in budgets}:
        raise ValueError(f"{cfg.name} ({mode}, {sum(used.values()) / 1e9:.1f} GB) does not fit max_memory: "
                         f"{sum(left.values()) / 1e9:.1f} GB left over; add room or a 'disk' entry")  # fmt: skip
    return Placement(mode, dict(device_map), used, budgets)


def _param_bytes(model: torch.nn.Module, name: str) -> int:
    t = model.get_parameter(name)
    return t.numel() * t.element_size()


def _budgets(max_memory: dict) -> dict[int | str, int]:
    if not isinstance(max_memory, dict) or not max_memory:
        raise TypeError(f"max_memory must be a non-empty dict {{device: bytes}}, got {max_memory!r}")
    out = {}
    for device, value in max_memory.items():
        key = device
        if isinstance(device, str) and re.fullmatch(r"cuda:\d+", device):
            key = int(device.split(":")[1])
        if not (isinstance(key, int) and not isinstance(key, bool) and key >= 0) and key not in ("cpu", "disk"):
            raise ValueError(f"max_memory: unknown device {device!r}; use 0, 1, ... (or 'cuda:0'), 'cpu' or 'disk'")
        out[key] = parse_bytes(value, f"max_memory[{device!r}]")
    return out


def _resize_as_stored(model: torch.nn.Module) -> None:
    """Replace each meta tensor by one of the stored size (a 1-D uint8 tensor of that many bytes), so accelerate
    sizes modules as the checkpoint stores them."""
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(module, kind).items()):
                if t is None:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                stored = torch.empty(stored_bytes(full, tuple(t.shape), t.dtype), dtype=torch.uint8, device="meta")
                getattr(module, kind)[name] = torch.nn.Parameter(stored, requires_grad=False) if kind == "_parameters" else stored


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _unsplit_module_bytes(model) -> dict[str, int]:
    """Bytes of every module accelerate keeps whole: blocks, MTP blocks, DSpark stages, and the top leaves."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Block", "MTPBlock", "DSparkStage"):
            out[name] = _bytes(module)
    out.update({name: t.numel() * t.element_size() for name, t in model.state_dict().items()
                if not any(name.startswith(prefix + ".") for prefix in out)})  # fmt: skip
    return out


def _collapse(modules: list[str]) -> str:
    """["embed", "blocks.0", "blocks.1", "blocks.2", "head"] -> "embed, blocks.0-2, head"."""
    parts, run = [], None
    for m in modules + [None]:
        match = re.fullmatch(r"(.+)\.(\d+)", m) if m else None
        if run and match and match.group(1) == run[0] and int(match.group(2)) == run[2] + 1:
            run[2] += 1
            continue
        if run:
            parts.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else ""))
            run = None
        if match:
            run = [match.group(1), int(match.group(2)), int(match.group(2))]
        elif m:
            parts.append(m)
    return ", ".join(parts)
