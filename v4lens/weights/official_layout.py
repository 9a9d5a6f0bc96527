"""The tensors of an official DeepSeek-V4 release, enumerated from its config alone.

`official_tensor_names(cfg)` lists the names a checkpoint in DeepSeek's official layout holds, as
shipped: the same names v4lens writes and reads (`weights.names.official_name` of the module tree,
one tensor per expert), plus the `<name>.scale` block scales of the quantised matrices (as DeepSeek ships them):

- FP8 (e4m3, 128×128 e8m0 scales): the attention's `wq_a`, `wq_b`, `wkv`, `wo_a` (FP8 on the hub; only
  DeepSeek's convert.py folds its scale into bf16), `wo_b`, the indexer's `wq_b`, the shared expert's
  `w1`/`w2`/`w3`, and the draft module's input projections (MTP `e_proj`/`h_proj`, DSpark `main_proj`);
- FP4 (e2m1, 1×32 scales): every routed expert's `w1`/`w2`/`w3`;
- everything else (embedding, head, norms, mHC, sinks, router, compressors, indexer `weights_proj`,
  Markov and confidence heads) is stored unquantised, without a scale.

A DSpark config (0731 / 0813) has, per stage s, an ordinary block `mtp.{s}.*` (score-routed MoE, ratio 0),
plus `mtp.0.main_proj` and `mtp.0.main_norm`, and on the last stage its `norm`, `hc_head_{fn,base,scale}`,
the Markov head's `markov_w1`/`markov_w2` and the confidence head's `proj` (DeepSeek's 0731 inference code).
"""

from __future__ import annotations

import re

import torch

from ..model import HookedV4
from ..model.block import Block
from ..model.config import V4Config
from .names import official_name

# official names of the matrices stored quantised with a `.scale` beside them
_SCALED = re.compile(
    r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.indexer\.wq_b|\.shared_experts\.w[123]|\.experts\.\d+\.w[123]"
    r"|\.(e_proj|h_proj|main_proj))\.weight$"
)


def official_tensor_names(cfg: V4Config) -> list[str]:
    """Every tensor name of an official-layout checkpoint of `cfg` (FP8/FP4 scales included), in order."""
    backbone = cfg.without_draft() if cfg.draft == "dspark" else cfg
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        names = _module_names(HookedV4(backbone))
        if cfg.draft == "dspark":
            for s in range(cfg.n_mtp_layers):  # each stage: an ordinary block with layer id n_layers + s
                block = _module_names(Block(cfg, cfg.n_layers + s), prefix="blocks.0.")  # named as a layer ...
                stage = [f"mtp.{s}." + n.removeprefix("layers.0.") for n in block]  # ... then moved under mtp.{s}
                if s == 0:
                    stage += ["mtp.0.main_proj.weight", "mtp.0.main_norm.weight"]
                if s == cfg.n_mtp_layers - 1:
                    stage += [f"mtp.{s}.{n}" for n in ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
                              "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
                              "confidence_head.proj.weight")]  # fmt: skip
                names += stage
    out = []
    for name in names:
        out.append(name)
        if _SCALED.search(name):
            out.append(name.removesuffix(".weight") + ".scale")
    return out


def official_tensor_count(cfg: V4Config) -> int:
    """How many tensors an official release of `cfg` holds (72,317 for V4-Flash-0731, 149,782 for V4-Pro-0813)."""
    return len(official_tensor_names(cfg))


def _module_names(module: torch.nn.Module, prefix: str = "") -> list[str]:
    """Official names of a module's saved tensors (parameters and persistent buffers), one per expert."""
    out = []
    for name, t in module.state_dict().items():
        if re.search(r"\.experts\.w[123]$", name):  # stacked [E, ...] in v4lens, one tensor per expert on disk
            out += [official_name(prefix + name, e) for e in range(t.shape[0])]
        else:
            out.append(official_name(prefix + name))
    return out
