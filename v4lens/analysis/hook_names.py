"""Short hook names -> v4lens's full hook names, or a KeyError that lists the candidates.

TransformerLens turns `("comb", 1)` into `blocks.1.hook_comb`, a name V4 does not have (its two
`hook_comb` live in `attn_hc` and `mlp_hc`). `resolve_hook_name` knows V4's names instead:

- a name that exists is returned as is; TransformerLens's spelling is used where V4 has a hook of
  that name with the same meaning (`("pattern", 1)` -> `blocks.1.attn.hook_pattern`);
- otherwise the one hook of block l named `hook_{name}` (`("topk", 1)` -> `blocks.1.attn.indexer.hook_topk`),
  narrowed by `layer_type` to the module it belongs to (`("comb", 1, "mlp_hc")`);
- two or more such hooks, none, or a TransformerLens name whose meaning no V4 hook has
  (`resid_post`, `k`, `v`, the MLP neuron activations `pre` / `post` / `mid`, a norm's `scale`):
  a KeyError naming the candidates, or what V4 has instead.

`V4ActivationCache.__getitem__` resolves against its model's hooks; `v4lens.utils.get_act_name`
against a model's, or against every hook any V4 layer type has.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection

from transformer_lens.utilities import get_act_name as tl_act_name

_LAYER_TYPE_ALIAS = {"a": "attn", "attention": "attn", "m": "mlp", "b": None, "block": None, "blocks": None, "": None}
_STREAMS = (
    "the residual is n parallel streams [b, p, n, d], hooked as blocks.{l}.hook_streams_pre / hook_streams_mid /"
    " hook_streams_post: use cache['streams_post', l], cache.streams(l) or cache.accumulated_streams(); what a"
    " sub-layer reads is its collapse blocks.{l}.attn_hc.hook_out / mlp_hc.hook_out (hc_head.hook_out for the head)"
)
_NEURONS = (
    "in TransformerLens this is an MLP's neuron activation; V4's MLP is a mixture of experts whose hidden"
    " activations are not hooked (routing: mlp.hook_expert_ids / hook_expert_weights, each slot's output:"
    " mlp.hook_expert_out). V4's hook_pre / hook_post are mHC weights [b, p, n]: name the module"
    " (layer_type 'attn_hc' or 'mlp_hc') or pass the full name"
)
# TransformerLens short names whose meaning no V4 hook of the same name has: never matched by name alone
TL_ONLY = {
    "resid_pre": _STREAMS, "resid_mid": _STREAMS, "resid_post": _STREAMS,
    "k": "V4 attention is multi-query with one shared key = value vector per token: blocks.{l}.attn.hook_kv"
         " [b, p, c] (and compressed entries in attn.compressor.hook_kv)",
    "pre": _NEURONS, "post": _NEURONS, "mid": _NEURONS, "pre_linear": _NEURONS,
    "scale": "v4lens's RMSNorms hook only their output (hook_normalized); the input each one scales is"
             " blocks.{l}.attn_hc.hook_out (ln1), blocks.{l}.mlp_hc.hook_out (ln2) or hc_head.hook_out (ln_final)",
}  # fmt: skip
TL_ONLY["v"] = TL_ONLY["k"]
_FULL_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(?:(.+)\.)?hook_(\w+)")


def resolve_hook_name(key, names: Collection[str], n_layers: int | None = None) -> str:
    """The full hook name `key` stands for among `names` (the hooks that exist), or a KeyError listing candidates.

    key: a full name, a short name ("embed", "pattern1"), or (name, layer[, layer_type]) with a
    negative layer counted from `n_layers`.

    >>> resolve_hook_name(("topk", 1), model.hook_dict)
    'blocks.1.attn.indexer.hook_topk'
    >>> resolve_hook_name(("comb", 1), model.hook_dict)      # KeyError: ... ['blocks.1.attn_hc.hook_comb', 'blocks.1.mlp_hc.hook_comb']
    """
    if isinstance(key, str):
        if key in names:
            return key
        full = _FULL_BLOCK_NAME.fullmatch(key)  # e.g. TransformerLens's get_act_name("comb", 1) = blocks.1.hook_comb
        if full:
            return _in_block(key, full[3], int(full[1]), full[2], names)
        tl = tl_act_name(key)  # "pattern1" -> blocks.1.attn.hook_pattern, "logits" -> hook_logits
        if tl in names:
            return tl
        if tl != key and _FULL_BLOCK_NAME.fullmatch(tl):
            return resolve_hook_name(tl, names, n_layers)
        return _top_level(key, names)
    short, layer, layer_type = (tuple(key) + (None, None))[:3]
    if not isinstance(short, str):
        raise KeyError(f"{key!r}: the first element of a key must be a hook name, got {type(short).__name__}")
    if layer is None:
        return resolve_hook_name(short, names, n_layers)
    layer = int(layer)
    if layer < 0 and n_layers is not None:
        layer += n_layers
    return _in_block(key, short, layer, layer_type, names)


def _in_block(key, short: str, layer: int, layer_type: str | None, names: Collection[str]) -> str:
    prefix = f"blocks.{layer}."
    layer_type = _LAYER_TYPE_ALIAS.get(layer_type, layer_type)
    bare = short.removeprefix("hook_")
    # 1. spelled out: TransformerLens's name, ("attn_hc.hook_comb", l), ("streams_post", l), ("comb", l, "mlp_hc")
    # (the module named first: TransformerLens's spelling puts "q" in "attn" whatever layer_type says)
    spelled = [f"{prefix}{layer_type}.hook_{bare}", f"{prefix}{layer_type}.{short}"] if layer_type else []
    spelled += [tl_act_name(bare, layer, layer_type)] if bare not in TL_ONLY else []
    spelled += [prefix + short, prefix + "hook_" + bare]
    for name in spelled:
        if name in names:
            return name
    # 2. the hooks of block `layer` with that name, in the module `layer_type` if given
    ending = short if "." in short else "hook_" + bare
    found = sorted(n for n in names if n.startswith(prefix) and ("." + n[len(prefix) :]).endswith("." + ending))
    if layer_type:
        found = [n for n in found if _module_path(n, prefix) == layer_type
                 or _module_path(n, prefix).endswith("." + layer_type)]  # fmt: skip
    if len(found) == 1 and bare not in TL_ONLY:
        return found[0]
    where = f" in block {layer}" + (f"'s {layer_type!r} module" if layer_type else "")
    if bare in TL_ONLY:
        others = f" V4's hooks named hook_{bare}{where}: {found}." if found else ""
        raise KeyError(f"{key!r}: {TL_ONLY[bare].replace('{l}', str(layer))}.{others}")
    if found:
        module = _module_path(found[0], prefix) or "block"
        raise KeyError(
            f"{key!r} is ambiguous: candidates {found}. Pass the full name or a layer_type, e.g. "
            f"({bare!r}, {layer}, {module!r})"
        )
    if not any(n.startswith(prefix) for n in names):
        layers = sorted({int(m[1]) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))})
        raise KeyError(f"{key!r}: there is no block {layer} (blocks: {layers[:1] + layers[-1:]})")
    suffixes = sorted({n[len(prefix) :] for n in names if n.startswith(prefix)})
    close = [prefix + s for s in difflib.get_close_matches(ending, suffixes, n=4, cutoff=0.5)]
    close += [prefix + s for s in suffixes if bare in s and prefix + s not in close]
    raise KeyError(f"{key!r}: no hook named {ending}{where}." + (f" Similar: {close[:6]}" if close else ""))


def _module_path(name: str, prefix: str) -> str:
    """blocks.1.attn.indexer.hook_topk -> 'attn.indexer'; blocks.1.hook_attn_out -> ''."""
    rest = name[len(prefix) :]
    return rest.rsplit(".", 1)[0] if "." in rest else ""


def _top_level(key: str, names: Collection[str]) -> str:
    """A name with no layer: a unique top-level hook of that name (not in a block, MTP block or drafter)."""
    bare = key.removeprefix("hook_")
    if bare in TL_ONLY:
        raise KeyError(f"{key!r}: {TL_ONLY[bare]}.")
    ending = key if "." in key else "hook_" + bare
    inner = ("blocks.", "mtp.", "dspark.")
    found = sorted(n for n in names if not n.startswith(inner) and (n == ending or n.endswith("." + ending)))
    if len(found) == 1:
        return found[0]
    if found:
        raise KeyError(f"{key!r} is ambiguous: candidates {found}; pass the full name")
    per_block = sorted({re.sub(r"^blocks\.\d+\.", "blocks.{l}.", n) for n in names
                        if n.startswith("blocks.") and ("." + n).endswith("." + ending)})  # fmt: skip
    if per_block:
        raise KeyError(f"{key!r} is a per-block hook ({per_block}): pass a layer, e.g. ({bare!r}, 0)")
    close = difflib.get_close_matches(key, sorted(names), n=4, cutoff=0.6)
    raise KeyError(f"{key!r} is not a hook name." + (f" Similar: {close}" if close else ""))
