"""transformers' `DeepseekV4ForCausalLM` as an oracle: the same weights in both models.

Used by the parity tests and the benchmarks. transformers keeps some tensors in fp32
(`_keep_in_fp32_modules_strict`) and fuses the routed experts' gate and up projections.
Its Lightning Indexer picks with `torch.topk`, which breaks exact ties (frequent: a score is
exactly 0 when no index head fires) in an order that depends on the row length, i.e. on how
many entries the *future* of the sequence holds; v4lens breaks them by lowest entry id
(`v4lens.model.indexer.topk_lowest_index_first`), and the oracle built here is made to do the same.
"""

from __future__ import annotations

import torch

from ..model import HookedV4
from .names import canonical_name


def hf_model_like(model: HookedV4, dtype: torch.dtype | None = None, device=None):
    """A transformers `DeepseekV4ForCausalLM` with `model`'s config and weights (eval mode)."""
    from transformers import DeepseekV4ForCausalLM

    hf_cfg = model.cfg.to_hf()
    hf_cfg._attn_implementation = "eager"
    dtype = dtype or model.cfg.dtype
    with torch.device("meta"):
        hf = DeepseekV4ForCausalLM(hf_cfg)
    # choose dtypes while still on the meta device, so only one copy is ever allocated
    hf = hf.to(dtype)
    for name, p in hf.named_parameters():  # what transformers keeps in fp32 when it loads bf16
        if any(k in name for k in hf._keep_in_fp32_modules_strict):
            p.data = p.data.float()
    for name, b in hf.named_buffers():
        if "e_score_correction_bias" in name:
            b.data = b.data.float()
    hf.to_empty(device=device or model.device)
    copy_weights_to_hf(model, hf)
    _reset_rotary(hf)
    return use_lowest_index_ties(hf).eval()


def use_lowest_index_ties(hf):
    """Make a transformers DeepSeek-V4 model's indexers break exact ties like v4lens (see the module docstring)."""
    for module in hf.modules():
        if type(module).__name__ == "DeepseekV4Indexer" and not hasattr(module.forward, "__wrapped__"):
            module.forward = _with_lowest_index_ties(module.forward)
    return hf


def _with_lowest_index_ties(forward):
    """`forward` with `Tensor.topk` replaced, during the call, by v4lens's tie-breaking top-k."""
    import functools

    from ..model.indexer import topk_lowest_index_first

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        original = torch.Tensor.topk

        def topk(self, k, dim=-1, largest=True, sorted=True):
            if not (largest and dim in (-1, self.ndim - 1) and self.is_floating_point()):
                return original(self, k, dim=dim, largest=largest, sorted=sorted)
            indices = topk_lowest_index_first(self, k)
            return torch.return_types.topk((self.gather(-1, indices), indices))

        torch.Tensor.topk = topk
        try:
            return forward(*args, **kwargs)
        finally:
            torch.Tensor.topk = original

    return wrapped


def copy_weights_to_hf(model: HookedV4, hf) -> None:
    """Copy every v4lens parameter/buffer into the matching transformers tensor."""
    ours = dict(model.named_parameters())
    ours.update(model.named_buffers())
    with torch.no_grad():
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("experts.gate_up_proj"):
                prefix = canonical_name(name.removesuffix("gate_up_proj") + "w1")
                prefix = prefix.removesuffix("w1")
                value = torch.cat([ours[prefix + "w1"], ours[prefix + "w3"]], dim=1)
            elif name.endswith("experts.down_proj"):
                value = ours[canonical_name(name.removesuffix("down_proj") + "w2").removesuffix("w2") + "w2"]
            else:
                key = canonical_name(name)
                if key not in ours:
                    raise KeyError(f"transformers tensor {name} maps to {key}, which v4lens does not have")
                value = ours[key]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{name}: transformers shape {tuple(t.shape)} vs v4lens {tuple(value.shape)}")
            t.copy_(value.to(t.dtype))


def _reset_rotary(hf) -> None:
    """Recompute the rotary inverse frequencies (they were allocated on the meta device)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    for module in hf.modules():
        if isinstance(module, DeepseekV4RotaryEmbedding):
            for layer_type in module.layer_types:
                fn = module.compute_default_rope_parameters
                if module.rope_type[layer_type] != "default":
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                    fn = ROPE_INIT_FUNCTIONS[module.rope_type[layer_type]]
                inv_freq, scaling = fn(module.config, device=None, layer_type=layer_type)
                device = next(hf.parameters()).device
                setattr(module, f"{layer_type}_inv_freq", inv_freq.to(device))
                setattr(module, f"{layer_type}_original_inv_freq", inv_freq.clone().to(device))
                setattr(module, f"{layer_type}_attention_scaling", scaling)
