"""`V4Config`: every hyper-parameter of a DeepSeek-V4 model, validated, with the presets
(`tiny`, `tiny-recall`, `mini-3b`, `flash`, `flash-0731`, `pro`, `pro-0813`; in `presets.py`) and
conversions from transformers' `DeepseekV4Config` and DeepSeek's `ModelArgs` (in `config_formats.py`).

Field names follow TransformerLens where one exists (`d_model`, `n_layers`, `n_heads`,
`d_vocab`) and DeepSeek's `inference/model.py` otherwise; `config_formats.py` maps every field
to the names of transformers' and DeepSeek's config files.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch

LayerType = Literal["sliding", "csa", "hca"]
SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """`"bf16"`, `"float32"`, `torch.bfloat16`, ... -> a torch dtype (fp32 or bf16 only)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"v4lens runs in float32 or bfloat16 (bf16 with the reference's fp32 islands), got {dtype}"
            )
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _is_int(x: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# V4Config's numeric fields and their lower bounds (checked by V4Config.validate)
_INTS = {
    **dict.fromkeys(("d_vocab", "d_model", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank",
                     "o_lora_rank", "o_groups", "window_size", "max_position_embeddings", "n_routed_experts",
                     "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "attn_chunk_size"), 1),
    **dict.fromkeys(("original_seq_len", "index_n_heads", "index_head_dim", "index_topk", "n_shared_experts",
                     "n_hash_layers", "n_mtp_layers", "bos_token_id", "eos_token_id", "pad_token_id"), 0),
}  # fmt: skip
_REALS = {
    **dict.fromkeys(("rope_theta", "compress_rope_theta", "rope_factor", "beta_fast", "beta_slow", "route_scale",
                     "hc_eps", "norm_eps", "initializer_range"), "> 0"),
    "swiglu_limit": ">= 0",  # 0 turns the clamp off (DeepSeek's ModelArgs default)
}  # fmt: skip


@dataclass
class V4Config:
    """Hyper-parameters of a DeepSeek-V4 model (defaults: V4-Flash), plus v4lens runtime options."""

    # --- sizes
    d_vocab: int = 129280
    d_model: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    window_size: int = 128
    # One ratio per layer (0 sliding, 4 CSA, anything else HCA); may hold n_layers +
    # n_mtp_layers entries, the trailing ones for the MTP blocks (default 0 each).
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    # --- rotary embedding (YaRN on compressed layers only)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536  # 0 turns YaRN off on compressed layers too
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    # --- Lightning Indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # --- DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # --- manifold-constrained hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # --- draft module: n_mtp_layers April MTP blocks, or (dspark_block_size > 0) n_mtp_layers DSpark stages
    n_mtp_layers: int = 1
    dspark_block_size: int = 0  # 0 = no DSpark; else the anchor token + block_size - 1 noise tokens
    dspark_noise_token_id: int = 128799
    dspark_target_layer_ids: tuple[int, ...] = ()  # layers whose output streams DSpark taps, in order
    dspark_markov_rank: int = 256
    # --- special tokens (ids of the V4 tokenizer)
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2
    # --- v4lens runtime options
    name: str = "custom"
    dtype: Any = "float32"
    device: Any = None
    initializer_range: float = 0.02
    use_attn_result: bool = False  # opt-in hook blocks.{l}.attn.hook_result [b,p,h,d]
    use_expert_out: bool = False  # opt-in hook blocks.{l}.mlp.hook_expert_out [b,p,k,d]
    attn_chunk_size: int = 256  # queries per attention/indexer chunk when nothing hooks the whole tensor
    qat: bool = False  # the reference's FP8/FP4 QAT simulation is not implemented

    def __post_init__(self):
        if isinstance(self.compress_ratios, (str, bytes)) or not hasattr(self.compress_ratios, "__iter__"):
            raise TypeError(f"invalid V4Config ({self.name}): compress_ratios must be a sequence of ints, "
                            f"got {self.compress_ratios!r}")  # fmt: skip
        # numpy ints become ints; anything else ("4", 4.5, True) is left for validate() to refuse
        self.compress_ratios = tuple(int(r) if _is_int(r) else r for r in self.compress_ratios)
        if isinstance(self.dspark_target_layer_ids, (list, range)):  # a JSON list; a string is left to validate()
            self.dspark_target_layer_ids = tuple(self.dspark_target_layer_ids)
        self.dtype = resolve_dtype(self.dtype)
        if self.device is not None:
            self.device = torch.device(self.device)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(msg: str, error: type = ValueError):
            raise error(f"invalid V4Config ({self.name}): {msg}")

        # a string "64" or a float 4.5 must not pass as a size (nor True as 1); NaN fails `x > 0`
        for name, low in _INTS.items():
            value = getattr(self, name)
            if not _is_int(value) and not (name == "pad_token_id" and value is None):
                fail(f"{name} must be an int, got {value!r} ({type(value).__name__})", TypeError)
            if value is not None and value < low:
                fail(f"{name} must be {'positive' if low else '>= 0'}, got {value}")
        for name, bound in _REALS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                fail(f"{name} must be a number, got {value!r} ({type(value).__name__})", TypeError)
            if not (math.isfinite(value) and (value > 0 if bound == "> 0" else value >= 0)):
                fail(f"{name} must be a finite number {bound}, got {value}")
        for name in ("use_attn_result", "use_expert_out", "qat", "score_func", "name"):
            kind = str if name in ("score_func", "name") else bool
            if not isinstance(getattr(self, name), kind):
                fail(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}", TypeError)
        if bad := [r for r in self.compress_ratios if not _is_int(r)]:
            fail(f"compress_ratios must hold ints, got {bad[0]!r} in {self.compress_ratios}", TypeError)
        if self.n_heads % self.o_groups:
            fail(f"n_heads ({self.n_heads}) must be divisible by o_groups ({self.o_groups})")
        if self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= self.head_dim:
            fail(f"rope_head_dim ({self.rope_head_dim}) must be even and in (0, head_dim={self.head_dim}]")
        if self.n_activated_experts > self.n_routed_experts:
            fail(f"top-k ({self.n_activated_experts}) > n_routed_experts ({self.n_routed_experts})")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            fail(f"n_hash_layers ({self.n_hash_layers}) must be in [0, n_layers={self.n_layers}]")
        if self.n_shared_experts != 1:
            fail(f"n_shared_experts must be 1 (the reference asserts it), got {self.n_shared_experts}")
        if self.score_func not in SCORE_FUNCS:
            fail(f"score_func {self.score_func!r} not in {SCORE_FUNCS}")
        if len(self.compress_ratios) not in (self.n_layers, self.n_layers + self.n_mtp_layers):
            fail(
                f"compress_ratios has {len(self.compress_ratios)} entries; expected n_layers "
                f"({self.n_layers}) or n_layers + n_mtp_layers ({self.n_layers + self.n_mtp_layers})"
            )
        if any(r < 0 for r in self.compress_ratios):
            fail(f"compress ratios must be >= 0, got {self.compress_ratios}")
        if any(r == 1 for r in self.compress_ratios):
            fail("a compress ratio of 1 would compress nothing; use 0 for a sliding-only layer")
        if any(self.layer_type(i) == "csa" for i in range(self.n_layers + self.n_mtp_layers)):
            if self.index_n_heads <= 0 or self.index_head_dim <= 0 or self.index_topk <= 0:
                fail("CSA layers need positive index_n_heads, index_head_dim and index_topk")
            if self.index_head_dim < self.rope_head_dim:
                fail(f"index_head_dim ({self.index_head_dim}) < rope_head_dim ({self.rope_head_dim})")
        self._validate_dspark(fail)
        if self.qat:
            fail("qat=True (FP8/FP4 QAT simulation) is not implemented; v4lens skips the reference's QAT rounding")
        if not 0 <= self.bos_token_id < self.d_vocab or not 0 <= self.eos_token_id < self.d_vocab:
            fail("bos/eos token ids must lie inside the vocabulary")

    def _validate_dspark(self, fail) -> None:
        """The DSpark fields (V4-Flash-0731 / V4-Pro-0813): ints in range; only a DSpark config sets target layers."""
        for name in ("dspark_block_size", "dspark_noise_token_id", "dspark_markov_rank"):
            if not _is_int(getattr(self, name)):
                fail(f"{name} must be an int, got {getattr(self, name)!r}", TypeError)
        targets = self.dspark_target_layer_ids
        if not isinstance(targets, tuple) or not all(_is_int(t) for t in targets):
            fail(f"dspark_target_layer_ids must be a tuple of layer indices (ints), got {targets!r}", TypeError)
        if self.dspark_block_size < 0:
            fail(f"dspark_block_size must be >= 0 (0 = no DSpark), got {self.dspark_block_size}")
        if self.dspark_block_size == 0:
            if targets:
                fail(f"dspark_target_layer_ids {targets} given but dspark_block_size is 0 (no DSpark)")
            return
        if self.dspark_block_size < 2:
            fail("dspark_block_size must be >= 2 (the anchor and at least one token to draft), got 1")
        if not 0 <= self.dspark_noise_token_id < self.d_vocab:
            fail(f"dspark_noise_token_id ({self.dspark_noise_token_id}) must lie in [0, d_vocab={self.d_vocab})")
        if self.dspark_markov_rank < 1:
            fail(f"dspark_markov_rank must be positive, got {self.dspark_markov_rank}")
        if not targets or len(set(targets)) != len(targets) or not all(0 <= t < self.n_layers for t in targets):
            fail(f"dspark_target_layer_ids must be distinct layers in [0, n_layers={self.n_layers}), got {targets}")
        if self.n_mtp_layers < 1:
            fail("a DSpark config (dspark_block_size > 0) needs n_mtp_layers >= 1: the number of DSpark stages")
        stages = self.compress_ratios[self.n_layers :]
        if any(stages):  # DSpark attention has no compressor: the official configs list 0 for each stage
            fail(f"compress_ratios of the DSpark stages (entries {self.n_layers}..) must be 0, got {stages}")

    # ------------------------------------------------------------------ derived
    @property
    def draft(self) -> Literal["mtp", "dspark"] | None:
        """The draft module: "mtp" (April MTP blocks), "dspark" (0731 / 0813 DSpark stages) or None.

        Both live under `mtp.*` in checkpoints and are counted by n_mtp_layers; never both at once."""
        if self.dspark_block_size > 0:
            return "dspark"
        return "mtp" if self.n_mtp_layers else None

    def compress_ratio(self, layer: int) -> int:
        """Ratio of layer `layer`; layers n_layers.. are the MTP blocks (0 = sliding only when not listed)."""
        if not 0 <= layer < self.n_layers + self.n_mtp_layers:
            raise IndexError(f"layer {layer} out of range")
        return self.compress_ratios[layer] if layer < len(self.compress_ratios) else 0

    def layer_type(self, layer: int) -> LayerType:
        ratio = self.compress_ratio(layer)
        return "sliding" if ratio == 0 else ("csa" if ratio == 4 else "hca")

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers  # MTP blocks (layer >= n_layers) never hash

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype

    # TransformerLens protocol (docs/hooks.md, "TransformerLens interoperability")
    @property
    def d_head(self) -> int:
        return self.head_dim

    @property
    def n_key_value_heads(self) -> int:
        return 1

    @property
    def n_ctx(self) -> int:
        return self.max_position_embeddings

    @property
    def d_mlp(self) -> int:
        return self.moe_inter_dim

    attn_only = False
    normalization_type = "RMS"
    act_fn = "silu"
    positional_embedding_type = "rotary"

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes) -> "V4Config":
        return dataclasses.replace(self, **changes)

    def without_mtp(self) -> "V4Config":
        """The same model without its MTP blocks (e.g. for a checkpoint that holds no mtp.* tensors)."""
        return self.without_draft()

    def without_draft(self) -> "V4Config":
        """The backbone alone: no MTP blocks, no DSpark stages."""
        return self.replace(n_mtp_layers=0, compress_ratios=self.compress_ratios[: self.n_layers],
                            dspark_block_size=0, dspark_target_layer_ids=())  # fmt: skip

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["device"] = None if self.device is None else str(self.device)
        d["compress_ratios"] = list(self.compress_ratios)
        d["dspark_target_layer_ids"] = list(self.dspark_target_layer_ids)
        return d

    def layer_types(self) -> list[LayerType]:
        return [self.layer_type(i) for i in range(self.n_layers)]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts computed from the config; `active` (per token) counts the embedding and head, not the
        draft module (MTP or DSpark), which `total` includes and `total_without_mtp` leaves out."""
        D, H, c, V = self.d_model, self.n_heads, self.head_dim, self.d_vocab
        hc, E, k, I = self.hc_mult, self.n_routed_experts, self.n_activated_experts, self.moe_inter_dim
        mix = (2 + hc) * hc
        hc_params = 2 * (mix * hc * D + mix + 3)

        def attn(layer: int) -> int:
            n = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * c + D * c + c
            n += self.o_groups * self.o_lora_rank * H * c // self.o_groups + D * self.o_groups * self.o_lora_rank + H
            t = self.layer_type(layer)
            if t != "sliding":
                coff = 2 if t == "csa" else 1
                m = self.compress_ratio(layer)
                n += 2 * coff * c * D + m * coff * c + c
            if t == "csa":
                ci, hi = self.index_head_dim, self.index_n_heads
                n += self.q_lora_rank * hi * ci + hi * D + 2 * 2 * ci * D + 4 * 2 * ci + ci
            return n

        def moe(layer: int, active: bool) -> tuple[int, int]:
            expert = 3 * D * I
            router = E * D + (0 if self.is_hash_layer(layer) else E)
            table = V * k if self.is_hash_layer(layer) else 0
            total = router + E * expert + expert
            return total + table, router + (k + 1) * expert

        total = active = 0
        for layer in range(self.n_layers):
            m_total, m_active = moe(layer, True)
            block = attn(layer) + hc_params + 2 * D
            total += block + m_total
            active += block + m_active
        head = V * D + hc * hc * D + hc + 1 + D
        embed = V * D
        total += embed + head
        active += embed + head
        mtp = 0
        for j in range(self.n_mtp_layers):
            layer = self.n_layers + j
            m_total, _ = moe(layer, False)
            mtp += attn(layer) + hc_params + 2 * D + m_total
            if self.draft == "mtp":  # e_proj, h_proj, enorm, hnorm, norm, own hc_head
                mtp += 2 * D * D + 3 * D + hc * hc * D + hc + 1
        if self.draft == "dspark":  # main_proj + main_norm; the last stage's norm, hc_head, Markov and confidence heads
            r = self.dspark_markov_rank
            mtp += len(self.dspark_target_layer_ids) * D * D + 2 * D + hc * hc * D + hc + 1 + 2 * V * r + D + r
        return {"total": total + mtp, "total_without_mtp": total, "active": active}

    # ------------------------------------------------------------------ conversions (config_formats.py)
    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> "V4Config":
        """From a transformers `DeepseekV4Config`, its `to_dict()`, or a config.json path.

        Accepts the explicit `layer_types` + `compress_rates` form and the legacy
        `compress_ratios` list (any ratio, 112 included)."""
        from . import config_formats

        return config_formats.from_hf(hf_config, **overrides)

    def to_hf(self) -> Any:
        """A transformers `DeepseekV4Config` with the same math (explicit layer_types + compress_rates)."""
        from . import config_formats

        return config_formats.to_hf(self)

    @classmethod
    def from_official(cls, model_args: Any, **overrides) -> "V4Config":
        """From DeepSeek's `inference/config.json` (ModelArgs field names) or a dict of them."""
        from . import config_formats

        return config_formats.from_official(model_args, **overrides)

    def to_official(self) -> dict:
        """ModelArgs-style dict (DeepSeek's inference/config.json names)."""
        from . import config_formats

        return config_formats.to_official(self)


def __getattr__(name: str):
    """`PRESETS` and `preset` live in presets.py (which imports this module); `from v4lens.model.config import
    PRESETS, preset` keeps working through this lazy lookup (PEP 562) without an import cycle."""
    if name in ("PRESETS", "preset"):
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
