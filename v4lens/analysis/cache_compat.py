"""TransformerLens's residual-stream methods of `ActivationCache`, made right for n mHC streams.

TransformerLens's `decompose_resid`, `stack_head_results`, `get_full_resid_decomposition`,
`apply_ln_to_stack`, `logit_attrs` and `accumulated_resid` assume one additive residual [b, p, d]
that every layer reads whole. V4 has none: the residual is n streams, and each reader — the mHC
before a sub-layer, or hc_head before the final norm — collapses them with its own per-token
weights `pre`. With every mixing weight frozen at this run's values, what one reader reads is
still a sum of the writes (docs: v4lens.analysis.decomposition):

    x_reader = α_embed · e + Σ_s α_s · f_s,     α_s = preᵀ · comb ⋯ comb · post_s   (a scalar per token)

so here "the residual into (layer, mlp_input)" is what that reader reads: block `layer`'s
`attn_hc.hook_out` (the input of ln1), its `mlp_hc.hook_out` (ln2) with mlp_input, or, for
layer = n_layers, `hc_head.hook_out` (the input of ln_final). A component is α_s · f_s, a d_model
vector that can be dotted with a probe or SAE direction, and the components sum to the reader's
input (to fp32 rounding). `apply_ln_to_stack` applies that reader's RMSNorm (weight included) with
the statistic of the real input, so a stack that sums to the input sums to the norm's output, and
`logit_attrs` on the head's stack sums to the logits (`v4lens.decompose` gives the same numbers).

`accumulated_resid` reads each block boundary's streams through hc_head (what the logit lens reads),
`compute_head_results` caches per-head results through the grouped output projection, and MoE
layers split into experts (`get_full_resid_decomposition`'s rows `L{l}E{e}`): they have no fixed
neurons, so the neuron methods raise and say so.
"""

from __future__ import annotations

import logging

import einops
import torch
from transformer_lens.utilities.slice import Slice

from ..model.norm import rms_normalize
from .layout import require_hooks

logger = logging.getLogger(__name__)
_NO_NEURONS = (
    "{method}: DeepSeek-V4's MLPs are mixtures of experts: a layer has no fixed set of neurons (each token runs "
    "its top-k routed experts and a shared one) and their hidden activations are not hooked. Per-expert "
    "contributions to the residual: cache.get_full_resid_decomposition(expand_neurons=True) (rows 'L{{l}}E{{e}}' "
    "and 'L{{l}}E_shared'); per routed slot and shared expert in a logit: v4lens.decompose(model, cache, target, "
    "experts=True)."
)
_NO_SSM = (
    "{method}: DeepSeek-V4 has no SSM / recurrent layers. Its sparse attention's pattern over the candidates is "
    "cache['pattern', l], the candidates' token positions cache['key_index', l]."
)


def _as_slice(s) -> Slice:
    """TransformerLens's slices: an int picks one position and drops the axis (`Slice.unwrap` would keep it)."""
    return s if isinstance(s, Slice) else Slice(s)


class ResidualMethods:
    """Mixin for `V4ActivationCache`: TransformerLens's residual-stream methods, for n mHC streams."""

    # ------------------------------------------------------------------ the reader and the writes
    def _layer(self, layer: int | None, mlp_input: bool = False) -> int:
        L = self.model.cfg.n_layers
        layer = L if layer is None or layer == -1 else layer
        if not 0 <= layer <= L:
            raise ValueError(f"layer must lie in [0, n_layers={L}] (or be None / -1: the head), got {layer}")
        if mlp_input and layer == L:
            raise ValueError(f"mlp_input=True needs a block's layer (< n_layers={L}): layer {L} is the head")
        return layer

    def _reader(self, layer: int, mlp_input: bool) -> tuple[str, str, torch.nn.Module]:
        """(input hook [b,p,d], pre weights hook [b,p,n], norm module) of what reads the residual at (layer, mlp_input)."""
        if layer == self.model.cfg.n_layers:
            return "hc_head.hook_out", "hc_head.hook_pre", self.model.ln_final
        hc, ln = ("mlp_hc", "ln2") if mlp_input else ("attn_hc", "ln1")
        return f"blocks.{layer}.{hc}.hook_out", f"blocks.{layer}.{hc}.hook_pre", getattr(self.model.blocks[layer], ln)

    def _get(self, name: str, fp32: bool = True) -> torch.Tensor:
        """Cached tensor `name` with a batch axis (added back if the cache has none), fp32 unless told."""
        t = self.cache_dict[name]
        t = t if self.has_batch_dim else t.unsqueeze(0)
        return t.float() if fp32 else t

    def _require(self, names: list[str], method: str) -> None:
        require_hooks(self, names, f"{method} reads them: run model.run_with_cache(tokens) without a names_filter, "
                                   "or one that keeps these")  # fmt: skip

    def _coefficients(self, layer: int, mlp_input: bool, method: str) -> dict[str, torch.Tensor]:
        """α [b, p] of every write the reader at (layer, mlp_input) sees: 'embed', '{l}_attn_out', '{l}_mlp_out'.

        Walks the sub-layers back from the reader carrying R = comb_Sᵀ ⋯ comb_{s+1}ᵀ [b,p,n,n] (streams
        right after write s -> streams the reader collapses); α_s = preᵀ · R · post_s.
        """
        subs = [(l, half) for l in range(layer) for half in ("attn", "mlp")] + ([(layer, "attn")] if mlp_input else [])
        _, pre_name, _ = self._reader(layer, mlp_input)
        hooks = [f"blocks.{l}.{half}_hc.hook_{w}" for l, half in subs for w in ("post", "comb")]
        self._require([pre_name, *hooks], method)
        pre = self._get(pre_name)  # [b, p, n]
        R = torch.eye(pre.shape[-1], device=pre.device).expand(*pre.shape, pre.shape[-1])
        alphas = {}
        for l, half in reversed(subs):
            post, comb = self._get(f"blocks.{l}.{half}_hc.hook_post"), self._get(f"blocks.{l}.{half}_hc.hook_comb")
            alphas[f"{l}_{half}_out"] = torch.einsum("...k,...kj,...j->...", pre, R, post)
            R = torch.einsum("...km,...jm->...kj", R, comb)  # comb[j, m]: input stream j -> output stream m
        alphas["embed"] = torch.einsum("...k,...kj->...", pre, R)  # the embedding starts in every stream
        return dict(reversed(list(alphas.items())))

    @staticmethod
    def _write_name(label: str) -> str:
        """The hook holding the write behind a label of `_coefficients`: '2_mlp_out' -> 'blocks.2.hook_mlp_out'."""
        if label == "embed":
            return "hook_embed"
        l, kind = label.split("_", 1)
        return f"blocks.{l}.hook_{kind}"

    def _finish(self, stack: torch.Tensor, pos_slice) -> torch.Tensor:
        """[C, b, p, ...] -> drop the batch axis if the cache has none, then slice positions (TransformerLens: dim -2)."""
        stack = stack if self.has_batch_dim else stack[:, 0]
        return _as_slice(pos_slice).apply(stack, dim=-2)

    @torch.no_grad()
    def _head_results(self, l: int) -> torch.Tensor:
        """Each head's write [b, p, H, d] (fp32): the cached `attn.hook_result`, else through the grouped output projection."""
        name = f"blocks.{l}.attn.hook_result"
        if name in self.cache_dict:
            return self._get(name)
        self._require([f"blocks.{l}.attn.hook_z"], "per-head results")
        attn = self.model.blocks[l].attn
        return attn.head_results(self._get(f"blocks.{l}.attn.hook_z", fp32=False).to(attn.wo_a.dtype)).float()

    @torch.no_grad()
    def _expert_writes(self, l: int) -> torch.Tensor:
        """Layer l's MoE write split by expert id: [b, p, E + 1, d] (fp32), the shared expert last."""
        p, E = f"blocks.{l}.mlp.", self.model.cfg.n_routed_experts
        self._require([p + "hook_expert_ids", p + "hook_expert_weights", p + "hook_shared_out"], "expert results")
        ids = self._get(p + "hook_expert_ids", fp32=False)  # [b, p, k]
        if p + "hook_expert_out" in self.cache_dict:  # what the model used (cfg.use_expert_out)
            slots = self._get(p + "hook_expert_out")
        else:
            self._require([f"blocks.{l}.ln2.hook_normalized"], "expert results")
            x, w = self._get(f"blocks.{l}.ln2.hook_normalized", fp32=False), self._get(p + "hook_expert_weights")
            slots = self.model.blocks[l].mlp.experts(x.flatten(0, 1), ids.flatten(0, 1), w.flatten(0, 1), per_slot=True)
            slots = slots.view(*ids.shape, -1).float()  # [b, p, k, d]; empty slots (-1) are zero
        per_expert = slots.new_zeros(*ids.shape[:-1], E, slots.shape[-1])
        index = ids.clamp(min=0)[..., None].expand_as(slots)
        per_expert.scatter_add_(-2, index, slots * (ids >= 0)[..., None])
        return torch.cat([per_expert, self._get(p + "hook_shared_out")[..., None, :]], dim=-2)

    # ------------------------------------------------------------------ TransformerLens's methods
    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                        incl_embeds=True, return_labels=False):  # fmt: skip
        """What the reader at (layer, mlp_input) reads, split into the embedding and each sub-layer's write.

        [C, b, p, d]: component c = α_c · write_c, labels 'embed', '{l}_attn_out', '{l}_mlp_out' (mode
        'attn' / 'mlp' keeps one kind). With mode='all' and incl_embeds the components sum to the
        reader's input: `hc_head.hook_out` for layer None / n_layers, block l's `attn_hc.hook_out`,
        or its `mlp_hc.hook_out` with mlp_input. apply_ln: through that reader's RMSNorm.

        >>> parts, labels = cache.decompose_resid(return_labels=True)
        >>> parts.sum(0)          # == cache["hc_head.hook_out"]; parts @ probe_direction: each write's share
        """
        layer = self._layer(layer, mlp_input)
        alphas = self._coefficients(layer, mlp_input, "decompose_resid")
        keep = {"all": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}[mode]
        labels = [k for k in alphas if (k == "embed" and incl_embeds) or (k != "embed" and k.split("_")[1] in keep)]
        self._require(["hook_embed"] + [self._write_name(k) for k in labels], "decompose_resid")
        parts = [alphas[k][..., None] * self._get(self._write_name(k)) for k in labels]
        empty = self._get("hook_embed").new_zeros(0, *self._get("hook_embed").shape)
        stack = self._finish(torch.stack(parts) if parts else empty, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                          has_batch_dim=True, recompute_ln=False):  # fmt: skip
        """Each component through the RMSNorm of the reader at (layer, mlp_input): x · w / rms(reader's input).

        The statistic is the real input's (`hc_head.hook_out` for ln_final, `attn_hc.hook_out` for ln1,
        `mlp_hc.hook_out` for ln2), so a stack summing to that input sums to the norm's output
        (`ln_final.hook_normalized`, ...). Unlike TransformerLens (which folds the norm weight into the
        next layer) the weight w is applied: `stack @ model.W_U` are logits. recompute_ln with the head:
        each component normalised by its own statistic (the logit lens). Returns fp32.
        """
        layer = self._layer(layer, mlp_input)
        input_name, _, norm = self._reader(layer, mlp_input)
        pos_slice, batch_slice = _as_slice(pos_slice), _as_slice(batch_slice)
        w = norm.w.float()
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == self.model.cfg.n_layers:
            return rms_normalize(residual_stack, norm.eps) * w
        self._require([input_name], "apply_ln_to_stack")
        x = self[input_name].float()  # [b, p, d] or [p, d]
        inv_rms = pos_slice.apply(torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps), dim=-2)
        if self.has_batch_dim:
            inv_rms = batch_slice.apply(inv_rms, dim=0)
        return residual_stack.float() * inv_rms * w

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim=True):  # fmt: skip
        """Each component's share of a logit (or of logit(tokens) − logit(incorrect_tokens)).

        residual_stack: components of what hc_head reads (`decompose_resid()`, `stack_head_results()`,
        `get_full_resid_decomposition()`); they go through ln_final (`apply_ln_to_stack`) and are
        dotted with the tokens' unembedding rows. For a stack summing to `hc_head.hook_out` the
        attributions sum to the model's logits. tokens: a string, an int, [b] or [b, p] ids.
        """
        batch_slice = _as_slice(batch_slice)
        directions = self._token_directions(tokens)
        if incorrect_tokens is not None:
            other = self._token_directions(incorrect_tokens)
            if other.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape: directions {tuple(directions.shape)} "
                                 f"vs {tuple(other.shape)}")  # fmt: skip
            directions = directions - other
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)  # fmt: skip
        if (has_batch_dim and batch_slice.mode != "int" and scaled.ndim == 4 and directions.ndim == 2
                and directions.shape[0] == scaled.shape[1]):  # fmt: skip
            directions = directions.unsqueeze(-2)  # one target per example: broadcast over positions
        return (scaled * directions).sum(-1)

    def _token_directions(self, tokens) -> torch.Tensor:
        """Unembedding rows [..., d] (fp32) of a token string, id, or tensor of ids."""
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        W = self.model.head.weight
        return W[torch.as_tensor(tokens, device=W.device)].float()

    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False,
                          return_labels=False):  # fmt: skip
        """The residual at every block boundary up to `layer`, as the head would read it: [B, b, p, d].

        Each boundary's n streams go through hc_head (its weights computed from those streams, as in
        the forward and the logit lens): labels '{l}_pre' (streams entering block l), '{l}_mid' with
        incl_mid (and for `layer` with mlp_input), 'final_post' (the last block's output: equal to
        `hc_head.hook_out`). apply_ln: through ln_final, each with its own statistic, so
        `accumulated_resid(apply_ln=True) @ model.W_U` are the logit lens's logits. The n streams
        themselves: `accumulated_streams`.
        """
        L, layer = self.model.cfg.n_layers, self._layer(layer, mlp_input)
        labels, streams = [], []
        for l in range(layer + 1):
            if l == L:
                labels.append("final_post")
                streams.append(self.streams(L - 1, "post"))
                continue
            labels.append(f"{l}_pre")
            streams.append(self.streams(l, "pre"))
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                labels.append(f"{l}_mid")
                streams.append(self.streams(l, "mid"))
        with torch.no_grad():
            read = [self.model.hc_head(s if self.has_batch_dim else s[None]) for s in streams]
        if apply_ln:
            ln = self.model.ln_final
            read = [(ln.w * rms_normalize(y, ln.eps)).to(y.dtype) for y in read]
        stack = self._finish(torch.stack(read), pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None,
                           apply_ln=False, mlp_input=False):  # fmt: skip
        """Each head's part of what the reader at (layer, mlp_input) reads: [layer·H, b, p, d], labels 'L{l}H{h}'.

        Head h of layer l contributes α_l · result_{l,h} (its write through the grouped output projection,
        scaled by how much of layer l's attention write the reader collapses); the heads of a layer sum
        to its component in `decompose_resid`. Heads of layers < layer (and of `layer` with mlp_input).
        incl_remainder: a last row with the rest of the reader's input (embedding and MLPs).
        """
        layer = self._layer(layer, mlp_input)
        stack, labels = self._heads(layer, mlp_input, "stack_head_results")
        if incl_remainder:
            input_name = self._reader(layer, mlp_input)[0]
            self._require([input_name], "stack_head_results(incl_remainder=True)")
            stack = torch.cat([stack, (self._get(input_name) - stack.sum(0))[None]])
            labels.append("remainder")
        stack = self._finish(stack, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def _heads(self, layer: int, mlp_input: bool, method: str) -> tuple[torch.Tensor, list[str]]:
        """[C, b, p, d] (batch axis kept, positions whole) of the heads before the reader, and their labels."""
        alphas = self._coefficients(layer, mlp_input, method)
        H = self.model.cfg.n_heads
        parts = [alphas[f"{l}_attn_out"][..., None, None] * self._head_results(l)
                 for l in range(layer + (1 if mlp_input else 0))]  # fmt: skip
        if not parts:
            return self._get("hook_embed").new_zeros(0, *self._get("hook_embed").shape), []
        stack = einops.rearrange(torch.cat(parts, dim=-2), "b p c d -> c b p d")
        return stack, [f"L{l}H{h}" for l in range(len(parts)) for h in range(H)]

    def compute_head_results(self) -> None:
        """Cache each head's write, `blocks.{l}.attn.hook_result` [b, p, H, d], through the grouped output projection.

        The same tensor `use_attn_result=True` hooks: heads sum to `hook_attn_out` (up to the order
        of the additions). Existing results are kept.
        """
        if self._ensure_head_results():
            logger.warning("Tried to compute head results when they were already cached")

    def _ensure_head_results(self) -> bool:
        all_cached = True
        for l in range(self.model.cfg.n_layers):
            name = f"blocks.{l}.attn.hook_result"
            if name in self.cache_dict:
                continue
            all_cached = False
            self._require([f"blocks.{l}.attn.hook_z"], "compute_head_results")
            z = self._get(f"blocks.{l}.attn.hook_z", fp32=False)
            with torch.no_grad():
                result = self.model.blocks[l].attn.head_results(z.to(self.model.blocks[l].attn.wo_a.dtype)).to(z.dtype)
            self.cache_dict[name] = result if self.has_batch_dim else result[0]
        return all_cached

    def get_full_resid_decomposition(self, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False,
                                     pos_slice=None, return_labels=False, project_output_onto=None):  # fmt: skip
        """What the reader at (layer, mlp_input) reads, split into heads, experts (or MLP writes) and the embedding.

        Rows: every head 'L{l}H{h}' (as `stack_head_results`), then per MoE layer its experts
        'L{l}E{e}' (expert e's weighted output, zero where the token did not pick it) and 'L{l}E_shared'
        with expand_neurons (an MoE has no fixed neurons: experts are its units), else '{l}_mlp_out';
        then 'embed'. V4 has no biases, so there is no 'bias' row: the rows sum to the reader's input.
        project_output_onto: [d] or [d, k] directions (after apply_ln): the rows' projections.
        """
        layer = self._layer(layer, mlp_input)
        heads, labels = self._heads(layer, mlp_input, "get_full_resid_decomposition")
        alphas = self._coefficients(layer, mlp_input, "get_full_resid_decomposition")
        parts = [heads]
        for l in range(layer):
            alpha = alphas[f"{l}_mlp_out"]
            if expand_neurons:
                experts = self._expert_writes(l) * alpha[..., None, None]  # [b, p, E+1, d]
                parts.append(einops.rearrange(experts, "b p e d -> e b p d"))
                labels += [f"L{l}E{e}" for e in range(experts.shape[2] - 1)] + [f"L{l}E_shared"]
            else:
                self._require([f"blocks.{l}.hook_mlp_out"], "get_full_resid_decomposition")
                parts.append((alpha[..., None] * self._get(f"blocks.{l}.hook_mlp_out"))[None])
                labels.append(f"{l}_mlp_out")
        self._require(["hook_embed"], "get_full_resid_decomposition")
        parts.append((alphas["embed"][..., None] * self._get("hook_embed"))[None])
        labels.append("embed")
        stack = self._finish(torch.cat(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        if project_output_onto is not None:
            stack = stack @ project_output_onto.to(stack.device, torch.float32)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ no V4 meaning: say what to use
    def get_neuron_results(self, *args, **kwargs):
        raise NotImplementedError(_NO_NEURONS.format(method="get_neuron_results"))

    def stack_neuron_results(self, *args, **kwargs):
        raise NotImplementedError(_NO_NEURONS.format(method="stack_neuron_results"))

    def compute_ssm_state(self, *args, **kwargs):
        raise NotImplementedError(_NO_SSM.format(method="compute_ssm_state"))

    def compute_ssm_effective_attention(self, *args, **kwargs):
        raise NotImplementedError(_NO_SSM.format(method="compute_ssm_effective_attention"))
