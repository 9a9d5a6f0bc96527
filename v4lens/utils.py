"""TransformerLens-style helpers that know V4's hook names.

`get_act_name` is TransformerLens's `utils.get_act_name` for v4lens: it returns a hook name that
exists. TransformerLens's own turns `("comb", 1)` into `blocks.1.hook_comb`, which V4 does not
have; this one raises instead, naming `blocks.1.attn_hc.hook_comb` and `blocks.1.mlp_hc.hook_comb`.

    >>> from v4lens.utils import get_act_name
    >>> get_act_name("pattern", 1)                      # TransformerLens's names where V4 has them
    'blocks.1.attn.hook_pattern'
    >>> get_act_name("topk", 1)                          # the one hook_topk of a block
    'blocks.1.attn.indexer.hook_topk'
    >>> get_act_name("comb", 1, "mlp_hc")                # layer_type: the module, where a name is ambiguous
    'blocks.1.mlp_hc.hook_comb'
"""

from __future__ import annotations

import functools
import re

from transformer_lens.utilities import get_act_name as tl_act_name

from .analysis.hook_names import resolve_hook_name

__all__ = ["get_act_name"]

_NUMBERED = re.compile(r"^(blocks|mtp|dspark\.stages)\.\d+\.")


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None, *, model=None) -> str:
    """The full v4lens hook name for `name` (a full name or a short one), block `layer`, module `layer_type`.

    Raises KeyError listing the candidates when the name is ambiguous in the block (`"comb"`,
    `"kv"`), unknown (with similar names), or a TransformerLens name with no V4 counterpart
    (`"resid_post"`, `"k"`, the MLP neuron activations `"post"`: the message says what V4 has).

    model: a `HookedV4`, a `V4Config` or a preset name, to check against that model's hooks (its
    layer types, hash layers, opt-in hooks; a negative layer counts from its last block). Without
    it the name is checked against the hooks any V4 block has, so `get_act_name("topk", 0)`
    returns the CSA indexer's name even for a model whose block 0 is a sliding-window block.
    """
    key = name if layer is None and layer_type is None else (name, layer, layer_type)[: 2 if layer_type is None else 3]
    if model is not None:
        names, n_layers = _model_names(model)
        return resolve_hook_name(key, names, n_layers)
    if layer is not None and int(layer) < 0:
        raise ValueError(
            f"get_act_name({name!r}, {layer}): a negative layer needs model= (to count from its last block)"
        )
    if layer is None and _NUMBERED.sub(lambda m: m[1] + ".0.", name) in _catalogue()[2]:
        return name  # a full name (its pattern exists; any block, MTP block or stage number)
    # every hook any block may have, as this layer's (or as the layer the name holds: "comb1", "blocks.1.hook_comb")
    in_name = re.match(r"blocks\.(\d+)\.", tl_act_name(name)) if layer is None else None
    names = _generic_names(layer if in_name is None else int(in_name[1]))
    n_layers = None
    return resolve_hook_name(key, names, n_layers)


def _model_names(model) -> tuple[frozenset[str], int]:
    from .model import HookedV4
    from .model.config import V4Config

    if isinstance(model, HookedV4):
        return frozenset(model.hook_dict), model.cfg.n_layers
    if isinstance(model, str):
        from .model.presets import preset

        model = preset(model)
    if isinstance(model, V4Config):
        return _config_names(model), model.n_layers
    raise TypeError(
        f"get_act_name(model=...) takes a HookedV4, a V4Config or a preset name, not {type(model).__name__}"
    )


_BY_CONFIG: dict[str, frozenset[str]] = {}  # repr(cfg) -> its hook names (a V4Config is not hashable)


def _config_names(cfg) -> frozenset[str]:
    """The hook names of a model built from `cfg`, on the meta device (no memory, a few ms)."""
    from .model import HookedV4

    key = repr(cfg)
    if key not in _BY_CONFIG:
        _BY_CONFIG[key] = frozenset(HookedV4(cfg, device="meta").hook_dict)
    return _BY_CONFIG[key]


@functools.lru_cache(maxsize=1)
def _catalogue() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(top-level names, block suffixes, every name with its numbers set to 0) over all of V4's hooks:
    every layer type, hash and learned MoE, the opt-in hooks, an MTP block and the DSpark drafter."""
    from .model.presets import preset

    opt_in = {"use_attn_result": True, "use_expert_out": True}
    names = _config_names(preset("tiny").replace(**opt_in)) | _config_names(preset("tiny-dspark").replace(**opt_in))
    top = frozenset(n for n in names if not n.startswith("blocks."))
    suffixes = frozenset(n.split(".", 2)[2] for n in names if n.startswith("blocks."))
    numbered = frozenset(_NUMBERED.sub(lambda m: m[1] + ".0.", n) for n in names)
    return top, suffixes, numbered


def _generic_names(layer) -> frozenset[str]:
    """Every top-level hook and every hook any block may have, as block `layer`'s (block 0's without a layer:
    enough to say that a name is a per-block one)."""
    top, suffixes, _ = _catalogue()
    return top | {f"blocks.{0 if layer is None else int(layer)}.{s}" for s in suffixes}
