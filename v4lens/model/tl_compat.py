"""TransformerLens's `HookedTransformer` surface on `HookedV4`: the V4 answer where one exists, a pointer where not.

`HookedV4` subclasses `HookedRootModule` (hooks and caching), not `HookedTransformer`, yet code
written for TransformerLens reaches for `model.W_O`, `model.OV`, `model.fold_layer_norm(...)`.
Every such name does one of two things here:

- gives the V4 answer, exactly: `W_O` / `b_O` (each head's write into d through the grouped output
  projection), `b_U`, `accumulated_bias` (zeros: V4 adds no bias vector to the residual),
  `tokens_to_residual_directions`, `all_head_labels`, `loss_fn`, `to_tokens`, `get_token_position`,
  `to_single_str_token`, `set_tokenizer`, `load_and_process_state_dict` (loading, no processing), and
  the optional hooks `set_use_attn_result` / `set_use_expert_out`;
- or raises an `AttributeError` (so `hasattr` is False) saying why V4 has no such thing and what to
  use instead (`W_Q`, `W_K`, `W_V`, `QK`, `OV`, the MLP matrices, weight processing, ...).

Why the query / key / value matrices raise: V4 attention is multi-query with one shared key = value
vector per token, kv = rope(kv_norm(wkv · x)), and queries go through a low-rank latent with its own
RMSNorm, then a per-head RMS normalisation, then RoPE. Both sides are normalised after their
projections and the last `rope_head_dim` channels rotate with position, so there is no fixed
per-head bilinear form W_Q W_Kᵀ or W_V W_O. The output side is linear: `W_O` is exact.
"""

from __future__ import annotations

import torch
from einops import rearrange
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

from .attention import Attention
from .guards import CheckedHookPoint, claim
from .inputs import check_token_range, token_tensor
from .loss import lm_cross_entropy
from .moe import MoE
from .padding import text_tokens

_QKV = (
    "V4 attention is multi-query: one key = value vector per token is shared by every head, "
    "kv = rope(kv_norm(wkv · ln1(x))) (kv_norm is an RMSNorm after the projection, and RoPE turns the last "
    "rope_head_dim channels by position), and on CSA/HCA layers compressed entries with their own weights "
    "(attn.compressor) are candidates too. Queries are q = rope(rms(wq_b · q_norm(wq_a · ln1(x)))), a "
    "low-rank latent normalised twice. So no matrix maps the residual to one head's {0}. The weights: "
    "model.blocks[l].attn.wq_a [r_q, d], q_norm.w, wq_b [h*c, r_q], wkv [c, d], kv_norm.w; the tensors: "
    "blocks.{{l}}.attn.hook_q [b, p, h, c], hook_q_latent, hook_kv [b, p, c], attn.compressor.hook_kv"
)
_MLP = (
    "each block's MLP is a mixture of experts (top-k routed experts plus one shared expert, SwiGLU with a "
    "clamped gate and up projection, no biases), so there is no single {0}. The weights: "
    "model.blocks[l].mlp.experts.w1 (gate) / w3 (up) [E, I, d] and w2 (down) [E, d, I], and "
    "mlp.shared_experts.w1 / w3 [I, d], w2 [d, I]; each slot's output: model.set_use_expert_out(True), "
    "then blocks.{{l}}.mlp.hook_expert_out [b, p, k, d]"
)
_NO_POS = ("V4 has no learned position embedding: position enters through RoPE on the last rope_head_dim channels "
           "of queries and keys (v4lens.model.rope). The token embedding is model.W_E")  # fmt: skip
_PROCESS = (
    "v4lens keeps the reference's weights unprocessed: its norms are RMSNorms (no mean is subtracted, so "
    "there is nothing to centre), folding ln1 / ln2 into the projections would change the rounding of "
    "every bf16 projection and the meaning of the norm hooks, ln_final reads the hc_head collapse of the n "
    "streams, and queries and keys are re-normalised after their projections (nothing to refactor). "
    "model.tokens_to_residual_directions gives unembedding directions with ln_final's weight folded in"
)
_COMPOSITION = "composition scores need per-head OV and QK matrices, which V4 attention does not have (see model.OV)"

# name -> why V4 has none, and what to use
_NOT_IN_V4 = {
    "W_Q": _QKV.format("query"),
    "W_K": _QKV.format("key"),
    "W_V": _QKV.format("value"),
    "b_Q": "V4's attention projections have no biases; " + _QKV.format("query"),
    "b_K": "V4's attention projections have no biases; " + _QKV.format("key"),
    "b_V": "V4's attention projections have no biases; " + _QKV.format("value"),
    "QK": (
        "the attention score has no fixed bilinear form: queries and keys are RMS-normalised after their "
        "projections and their last rope_head_dim channels rotate by position. Read the scores at "
        "blocks.{l}.attn.hook_attn_scores [b, h, p, K] (which token or compressed entry each of the K columns "
        "is: attn.hook_key_index), or q (attn.hook_q) against the keys (attn.hook_kv)"
    ),
    "OV": (
        "only the output half of the value path is a fixed matrix: values are kv_norm(wkv · x), rotated on their "
        "last rope_head_dim channels by the source position and back by the query position. model.W_O "
        "[L, h, c, d] maps each head's z (blocks.{l}.attn.hook_z) exactly to its write into d "
        "(blocks.{l}.attn.hook_result after model.set_use_attn_result(True))"
    ),
    "W_in": _MLP.format("input matrix"),
    "W_gate": _MLP.format("gate matrix"),
    "W_out": _MLP.format("output matrix"),
    "b_in": _MLP.format("input bias"),
    "b_out": _MLP.format("output bias"),
    "W_pos": _NO_POS,
    "W_E_pos": _NO_POS,
    "pos_embed": _NO_POS,
    "hook_pos_embed": _NO_POS,
    "unembed": (
        "the head is model.head.weight [V, d] (model.W_U is its transpose, fp32 GEMM), read after hc_head "
        "collapses the n streams and ln_final normalises them; logits are at hook_logits"
    ),
    "hook_tokens": "v4lens has no hook on the input tokens: a cache keeps them as cache.tokens",
    "input_to_embed": (
        "the embedding is hook_embed [b, p, d] and the streams entering block 0 are "
        "blocks.0.hook_streams_pre [b, p, n, d] (the embedding copied into n streams); read or "
        "edit them with hooks"
    ),
    "get_residual": "the residual is n streams [b, p, n, d]: blocks.{l}.hook_streams_pre / _mid / _post",
    "fold_layer_norm": _PROCESS,
    "center_writing_weights": _PROCESS,
    "center_unembed": _PROCESS,
    "refactor_factored_attn_matrices": _PROCESS,
    "process_weights": _PROCESS,
    "all_composition_scores": _COMPOSITION,
    "composition_layer_indices": _COMPOSITION,
    "OV_for_attn_layers": "see model.OV: V4 attention has no fixed per-head OV matrix",
    "QK_for_attn_layers": "see model.QK: V4 attention has no fixed per-head QK matrix",
    "init_weights": (
        "v4lens.load(preset, seed=...) builds a seeded model; v4lens.weights.loading.init_weights"
        "(model, seed) re-initialises one"
    ),
    "move_model_modules_to_device": (
        "use model.to(device); to spread a large model over devices, v4lens.load(..., device_map=...)"
    ),
    "sample_datapoint": "v4lens ships no training dataset: pass your own text or tokens",
    "load_sample_training_dataset": "v4lens ships no training dataset: pass your own text or tokens",
    "get_params": (
        "V4's weights keep their own names (model.named_parameters(); v4lens.weights.names translates "
        "them to DeepSeek's and transformers' names)"
    ),
}


class TransformerLensMethods:
    """Mixin of `HookedV4`: TransformerLens's `HookedTransformer` methods and properties (module doc)."""

    def __getattr__(self, name: str):
        # nn.Module's lookup (parameters, buffers, submodules) first; a TransformerLens name V4 lacks
        # then fails with the reason instead of "object has no attribute"
        try:
            return super().__getattr__(name)
        except AttributeError:
            why = _NOT_IN_V4.get(name)
            if why is None:
                raise
        raise AttributeError(f"HookedV4 has no {name!r}: {why}")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise NotImplementedError("HookedV4.from_pretrained: use v4lens.load(name_or_dir) (a preset or a checkpoint)")

    @classmethod
    def from_pretrained_no_processing(cls, *args, **kwargs):
        raise NotImplementedError("HookedV4.from_pretrained_no_processing: use v4lens.load(name_or_dir); "
                                  "v4lens never processes weights")  # fmt: skip

    # ------------------------------------------------------------------ weights with a V4 meaning
    @property
    def W_O(self) -> torch.Tensor:
        """Each head's output matrix [L, h, c, d]: z (blocks.{l}.attn.hook_z [b, p, h, c]) @ W_O[l, h] is
        head h's write into d (hook_result), exactly up to rounding. Head h of group g = h // (h/G) goes
        through its slice of wo_a[g] and then group g's columns of wo_b; the product is formed in fp32
        and returned in the model's dtype. Memory: L·h·c·d values (11 GB bf16 on V4-Flash)."""
        return torch.stack([self._head_write(block.attn) for block in self.blocks])

    def _head_write(self, attn) -> torch.Tensor:
        G, R, c = self.cfg.o_groups, self.cfg.o_lora_rank, self.cfg.head_dim
        wo_a = rearrange(attn.wo_a.float(), "(g r) (j c) -> g j r c", g=G, c=c)  # [G, h/G, R, c]
        wo_b = rearrange(attn.wo_b.float(), "d (g r) -> g d r", r=R)  # [G, d, R]
        per_head = torch.einsum("gdr,gjrc->gjcd", wo_b, wo_a)  # [G, h/G, c, d]
        return per_head.reshape(-1, c, self.cfg.d_model).to(self.device, self.cfg.dtype)

    @property
    def b_O(self) -> torch.Tensor:
        """Zeros [L, d]: V4's attention output projections have no bias."""
        return torch.zeros(self.cfg.n_layers, self.cfg.d_model, dtype=self.cfg.dtype, device=self.device)

    @property
    def b_U(self) -> torch.Tensor:
        """Zeros [V] (fp32, the logits' dtype): the head has no bias."""
        return torch.zeros(self.cfg.d_vocab, dtype=torch.float32, device=self.device)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """Zeros [d]: no bias vector is added to V4's residual (attention and experts have no output bias;
        the mHC's `base` shifts mixing logits, and the router's bias only steers the choice of experts)."""
        if not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"accumulated_bias: layer must lie in [0, n_layers={self.cfg.n_layers}], got {layer}")
        return torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype, device=self.device)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Unembedding directions of `tokens` (a token string, an int, or int64 ids of any shape) -> fp32 [..., d].

        The head reads one d-vector per position: x = hc_head.hook_out (the collapse of the n streams),
        then ln_final, then head.weight. The direction returned is ln_final's weight times the token's
        row of head.weight (TransformerLens's convention with the final norm folded), so for the real x
            logit[token] = (x / rms(x)) · direction,    rms(x) = sqrt(mean(x²) + eps)
        exactly up to rounding. It is a direction in the space of hc_head's output, not in the n streams
        [n, d]: hc_head's collapse weights depend on the input (see v4lens.analysis.decomposition).
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            tokens = torch.tensor(tokens)
        head = self.head.weight  # [V, d]; on a model spread over devices, where the head is
        ids = token_tensor(tokens, "tokens").to(head.device).long()
        if ids.numel():
            check_token_range(ids, self.cfg.d_vocab, "tokens")
        return head[ids].float() * self.ln_final.w.float().to(head.device)

    def all_head_labels(self) -> list[str]:
        """["L0H0", "L0H1", ...]: every attention head of the main blocks, layer-major."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    attn_head_labels = all_head_labels  # TransformerBridge's name: every V4 block has attention

    # ------------------------------------------------------------------ tokens and loss
    def to_tokens(self, input, prepend_bos: bool = True, padding_side=None, move_to_device: bool = True,
                  truncate: bool = True) -> torch.Tensor:  # fmt: skip
        """Text or a list of texts -> int64 tokens [b, p] (TransformerLens's `to_tokens`).

        BOS is prepended unless a text already starts with it, as a rendered chat prompt does. Texts of
        different lengths are padded with cfg.pad_token_id on `padding_side`: "right" (None, the default:
        V4 looks only backwards, so pads after a row never change its real positions) or "left" (pass
        the batch to forward with `padding_side="left"` or an `attention_mask`: v4lens.model.padding).
        truncate: cut texts longer than cfg.max_position_embeddings; move_to_device: on the model's device."""
        tokens, _ = text_tokens(self, input, prepend_bos, padding_side, truncate)
        return tokens if move_to_device else tokens.cpu()

    def to_single_str_token(self, int_token: int) -> str:
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes one int token id, got {int_token!r}")
        return self.tokenizer.decode([int_token])

    def set_tokenizer(self, tokenizer, default_padding_side: str = "right") -> None:
        """Use `tokenizer` for to_tokens / to_str_tokens / to_string (v4lens pads on the right)."""
        if default_padding_side != "right":
            raise ValueError(f"set_tokenizer: v4lens pads texts on the right by default, got default_padding_side="
                             f"{default_padding_side!r}; pass padding_side='left' to to_tokens / forward / generate "
                             "instead")  # fmt: skip
        self.tokenizer = tokenizer

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool = True) -> int:
        """Position of the first (mode="first") or last ("last") occurrence of `single_token` (a string of one
        token or an id) in `input` (a text, or tokens [p] / [1, p])."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        tokens = (
            self.to_tokens(input, prepend_bos=prepend_bos) if isinstance(input, str) else token_tensor(input, "input")
        )
        if tokens.ndim == 2 and tokens.shape[0] != 1:
            raise ValueError(f"get_token_position takes one sequence, got tokens of shape {tuple(tokens.shape)}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = (tokens.reshape(-1) == token).nonzero()[:, 0]
        if not len(hits):
            raise ValueError(f"token {token} does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask=None, per_token: bool = False):
        """Next-token cross-entropy of logits [b, p, V] for tokens [b, p]: what forward(return_type="loss")
        returns (trailing pad tokens left out); with `attention_mask` [b, p], TransformerLens's masking."""
        if attention_mask is None:
            return lm_cross_entropy(logits, tokens, per_token=per_token, pad_token_id=self.cfg.pad_token_id)
        return lm_cross_entropy_loss(logits, tokens, attention_mask=attention_mask, per_token=per_token)

    # ------------------------------------------------------------------ weights in, unprocessed
    def load_and_process_state_dict(self, state_dict, fold_ln: bool = False, center_writing_weights: bool = False,
                                    center_unembed: bool = False, fold_value_biases: bool = False,
                                    refactor_factored_attn_matrices: bool = False) -> None:  # fmt: skip
        """Load a v4lens state dict (strict). Weight processing is refused (`fold_value_biases` is a no-op:
        V4 has no value bias); the flags default to False, unlike TransformerLens."""
        self.process_weights_(fold_ln, center_writing_weights, center_unembed, refactor_factored_attn_matrices)
        self.load_state_dict(state_dict, strict=True)

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                         refactor_factored_attn_matrices: bool = False) -> None:  # fmt: skip
        """Refuses every processing TransformerLens does (the reasons: model.fold_layer_norm's error)."""
        asked = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights, "center_unembed": center_unembed,
                 "refactor_factored_attn_matrices": refactor_factored_attn_matrices}  # fmt: skip
        if on := [name for name, flag in asked.items() if flag]:
            raise ValueError(f"{', '.join(on)}: {_PROCESS}. Pass them as False")

    def fold_value_biases(self, state_dict):
        """`state_dict` unchanged: V4 attention has no value bias to fold."""
        return state_dict

    # ------------------------------------------------------------------ optional hooks
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Add (True) or remove (False) blocks.{l}.attn.hook_result [b, p, h, d] (each head's write into d)
        in every block, MTP and DSpark stage; `model.hook_dict` follows. Hooks on removed points go with them."""
        self._switch_hook("use_attn_result", use_attn_result, Attention, "hook_result", before=None)

    def set_use_expert_out(self, use_expert_out: bool) -> None:
        """Add (True) or remove (False) blocks.{l}.mlp.hook_expert_out [b, p, k, d] (each routing slot's
        weighted expert output) in every MoE; `model.hook_dict` follows."""
        self._switch_hook("use_expert_out", use_expert_out, MoE, "hook_expert_out", before="hook_shared_out")

    def _switch_hook(self, field: str, on: bool, kind: type, hook: str, before: str | None) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"set_{field} takes True or False, got {on!r}")
        with claim(self, f"set_{field}", exclusive=True):  # hook points are module state, like hooks
            for module in self.modules():
                if not isinstance(module, kind) or hasattr(module, hook) == on:
                    continue
                if on:
                    # where a model built with the option has it, so hook_dict's order is the same
                    point = CheckedHookPoint()
                    point.train(module.training)  # a new module starts in training mode; patching refuses that
                    setattr(module, hook, point)
                    if before is not None:
                        order = list(module._modules)
                        order.remove(hook)
                        order.insert(order.index(before), hook)
                        entries = {name: module._modules[name] for name in order}
                        module._modules.clear()
                        module._modules.update(entries)
                else:
                    getattr(module, hook).remove_hooks("both", including_permanent=True)
                    delattr(module, hook)
            setattr(self.cfg, field, on)
            self.setup()  # rebuild hook_dict / mod_dict

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self._no_per_head_input("set_use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self._no_per_head_input("set_use_attn_in", use_attn_in)

    def _no_per_head_input(self, what: str, on: bool) -> None:
        if on:
            raise ValueError(
                f"{what}(True): V4 attention has no per-head input to split. Each token's attention input is one "
                "collapsed vector (blocks.{l}.attn_hc.hook_out, normalised at blocks.{l}.ln1.hook_normalized); keys "
                "and values are projected once for all heads (attn.hook_kv) and queries through a shared latent "
                "(attn.hook_q_latent); per-head queries are attn.hook_q [b, p, h, c]"
            )

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        if use_hook_mlp_in:
            raise ValueError(
                "set_use_hook_mlp_in(True): V4 always hooks the MoE input, under other names: "
                "blocks.{l}.mlp_hc.hook_out (the collapse of the n streams, [b, p, d]) and "
                "blocks.{l}.ln2.hook_normalized (after the norm, what the router and experts read)"
            )
