"""`V4Config`: every hyper-parameter of a DeepSeek-V4 model, validated, with presets
and conversions from transformers' `DeepseekV4Config` and DeepSeek's `ModelArgs`.

Field names follow TransformerLens where one exists (`d_model`, `n_layers`, `n_heads`,
`d_vocab`) and DeepSeek's `inference/model.py` otherwise. ../shared/SPEC.md §B1 maps
every field to both upstream names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
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
            raise ValueError(f"v4lens runs in float32 or bfloat16 (SPEC decision 3), got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class V4Config:
    """Hyper-parameters of a DeepSeek-V4 model (SPEC §B1), plus v4lens runtime options."""

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
    # --- rotary embedding (SPEC §A11)
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
    # --- multi-token prediction
    n_mtp_layers: int = 1
    # --- special tokens (SPEC §D)
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
    qat: bool = False  # SPEC decision 2: QAT simulation is not implemented

    def __post_init__(self):
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        self.dtype = resolve_dtype(self.dtype)
        if self.device is not None:
            self.device = torch.device(self.device)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(msg: str):
            raise ValueError(f"invalid V4Config ({self.name}): {msg}")

        positive = [
            "d_vocab", "d_model", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_lora_rank",
            "o_groups", "window_size", "n_routed_experts", "n_activated_experts", "moe_inter_dim",
            "hc_mult", "hc_sinkhorn_iters", "attn_chunk_size",
        ]  # fmt: skip
        for name in positive:
            if int(getattr(self, name)) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
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
        if self.n_mtp_layers < 0:
            fail(f"n_mtp_layers must be >= 0, got {self.n_mtp_layers}")
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
        if self.original_seq_len < 0 or self.rope_factor <= 0:
            fail("original_seq_len must be >= 0 and rope_factor > 0")
        if self.qat:
            fail("qat=True (FP8/FP4 QAT simulation, SPEC §A12) is not implemented; see SPEC decision 2")
        if not 0 <= self.bos_token_id < self.d_vocab or not 0 <= self.eos_token_id < self.d_vocab:
            fail("bos/eos token ids must lie inside the vocabulary")

    # ------------------------------------------------------------------ derived
    def compress_ratio(self, layer: int) -> int:
        """Ratio of layer `layer`; layers n_layers.. are the MTP blocks (SPEC decision 5)."""
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

    # TransformerLens protocol (HOOKS.md "TransformerLens interoperability")
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
        return self.replace(n_mtp_layers=0, compress_ratios=self.compress_ratios[: self.n_layers])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["device"] = None if self.device is None else str(self.device)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    def layer_types(self) -> list[LayerType]:
        return [self.layer_type(i) for i in range(self.n_layers)]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts computed from the config (SPEC decision 7, executive summary 6)."""
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
            mtp += attn(layer) + hc_params + 2 * D + m_total + 2 * D * D + 3 * D + hc * hc * D + hc + 1
        return {"total": total + mtp, "total_without_mtp": total, "active": active}

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> "V4Config":
        """From a transformers `DeepseekV4Config`, its `to_dict()`, or a config.json path.

        Accepts the explicit `layer_types` + `compress_rates` form and the legacy
        `compress_ratios` list (any ratio, 112 included: SPEC decision 4).
        """
        d = _as_dict(hf_config)
        n_layers = d.get("num_hidden_layers", 43)
        n_mtp = d.get("num_nextn_predict_layers", 1)
        if d.get("compress_ratios") is not None:
            ratios = list(d["compress_ratios"])
        else:
            rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
            rates.update(d.get("compress_rates") or {})
            for legacy, key in (("compress_rate_csa", "compressed_sparse_attention"),
                                ("compress_rate_hca", "heavily_compressed_attention")):  # fmt: skip
                if d.get(legacy) is not None:
                    rates[key] = d[legacy]
            layer_types = d.get("layer_types")
            if layer_types is None:  # HF's default is V4-Pro's layout (SPEC §C8)
                layer_types = ["heavily_compressed_attention"] * min(n_layers, 2) + [
                    "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                    for i in range(max(n_layers - 2, 0))
                ]
            per_type = {"sliding_attention": 0, **rates}
            try:
                ratios = [per_type[t] for t in layer_types]
            except KeyError as e:
                raise ValueError(f"unknown layer type {e} in layer_types") from None
        ratios = ratios[: n_layers + n_mtp]
        if len(ratios) == n_layers and d.get("v4lens_mtp_compress_ratios"):  # written by v4lens' save_pretrained
            ratios += list(d["v4lens_mtp_compress_ratios"])[:n_mtp]
        mlp_types = d.get("mlp_layer_types")
        if mlp_types is not None:
            n_hash = sum(1 for t in mlp_types if t == "hash_moe")
            if list(mlp_types[:n_hash]) != ["hash_moe"] * n_hash:
                raise ValueError("v4lens needs the hash MoE layers first (mlp_layer_types prefix)")
        else:
            n_hash = d.get("num_hash_layers", 3)
        head_dim = d.get("head_dim", 512)
        if d.get("qk_rope_head_dim") is not None:
            rope_dim = int(d["qk_rope_head_dim"])
        else:
            rope_dim = int(head_dim * (d.get("partial_rotary_factor") or 64 / 512))
        rp = d.get("rope_parameters") or {}
        compress_rp = rp.get("compress") if isinstance(rp.get("compress"), dict) else None
        if compress_rp is None:
            compress_rp = d.get("rope_scaling") or {k: v for k, v in rp.items() if k not in ("main", "compress")}
        yarn = (compress_rp or {}).get("rope_type", (compress_rp or {}).get("type")) == "yarn"
        kwargs = dict(
            d_vocab=d.get("vocab_size", 129280),
            d_model=d.get("hidden_size", 4096),
            n_layers=n_layers,
            n_heads=d.get("num_attention_heads", 64),
            head_dim=head_dim,
            rope_head_dim=rope_dim,
            q_lora_rank=d.get("q_lora_rank", 1024),
            o_lora_rank=d.get("o_lora_rank", 1024),
            o_groups=d.get("o_groups", 8),
            window_size=d.get("sliding_window", 128),
            compress_ratios=tuple(ratios),
            rope_theta=float((rp.get("main") or {}).get("rope_theta", d.get("rope_theta", 10000.0))),
            compress_rope_theta=float((compress_rp or {}).get("rope_theta", d.get("compress_rope_theta", 160000.0))),
            rope_factor=float(compress_rp.get("factor") or 1.0) if yarn else 1.0,
            original_seq_len=int(compress_rp.get("original_max_position_embeddings") or 0) if yarn else 0,
            beta_fast=float(compress_rp.get("beta_fast") or 32) if yarn else 32.0,
            beta_slow=float(compress_rp.get("beta_slow") or 1) if yarn else 1.0,
            max_position_embeddings=d.get("max_position_embeddings", 1048576),
            index_n_heads=d.get("index_n_heads", 64),
            index_head_dim=d.get("index_head_dim", 128),
            index_topk=d.get("index_topk", 512),
            n_routed_experts=d.get("n_routed_experts", 256),
            n_shared_experts=d.get("n_shared_experts", 1),
            n_activated_experts=d.get("num_experts_per_tok", 6),
            moe_inter_dim=d.get("moe_intermediate_size", 2048),
            n_hash_layers=min(n_hash, n_layers),
            score_func=d.get("scoring_func", "sqrtsoftplus"),
            route_scale=d.get("routed_scaling_factor", 1.5),
            swiglu_limit=d.get("swiglu_limit", 10.0),
            hc_mult=d.get("hc_mult", 4),
            hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20),
            hc_eps=d.get("hc_eps", 1e-6),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            n_mtp_layers=n_mtp,
            bos_token_id=d.get("bos_token_id") if d.get("bos_token_id") is not None else 0,
            eos_token_id=_first(d.get("eos_token_id"), 1),
            initializer_range=d.get("initializer_range", 0.02),
        )
        if yarn and compress_rp.get("attention_factor") not in (None, 1.0):
            raise ValueError("v4lens follows the reference: no YaRN attention factor (SPEC §C4)")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> "Any":
        """A transformers `DeepseekV4Config` with the same math (explicit layer_types + compress_rates)."""
        from transformers import DeepseekV4Config

        types = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
        hca = {self.compress_ratio(i) for i in range(self.n_layers) if self.layer_type(i) == "hca"}
        if len(hca) > 1:
            raise ValueError(f"transformers allows one HCA ratio per model; this config has {sorted(hca)}")
        rope = {"rope_type": "default"}
        if self.original_seq_len > 0:
            rope = {
                "rope_type": "yarn", "factor": self.rope_factor, "attention_factor": 1.0,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
            }  # fmt: skip
        return DeepseekV4Config(
            vocab_size=self.d_vocab, hidden_size=self.d_model, moe_intermediate_size=self.moe_inter_dim,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, head_dim=self.head_dim,
            q_lora_rank=self.q_lora_rank, num_experts_per_tok=self.n_activated_experts,
            n_routed_experts=self.n_routed_experts, n_shared_experts=self.n_shared_experts,
            scoring_func=self.score_func, routed_scaling_factor=self.route_scale,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            layer_types=[types[self.layer_type(i)] for i in range(self.n_layers)],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca.pop() if hca else 128},
            compress_rope_theta=self.compress_rope_theta, hc_mult=self.hc_mult,
            hc_sinkhorn_iters=self.hc_sinkhorn_iters, hc_eps=self.hc_eps,
            mlp_layer_types=["hash_moe" if self.is_hash_layer(i) else "moe" for i in range(self.n_layers)],
            swiglu_limit=self.swiglu_limit, sliding_window=self.window_size, o_groups=self.o_groups,
            o_lora_rank=self.o_lora_rank, index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
            index_topk=self.index_topk, num_nextn_predict_layers=self.n_mtp_layers,
            rms_norm_eps=self.norm_eps, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            partial_rotary_factor=self.rope_head_dim / self.head_dim, rope_parameters=rope,
            initializer_range=self.initializer_range,
        )  # fmt: skip

    @classmethod
    def from_official(cls, model_args: Any, **overrides) -> "V4Config":
        """From DeepSeek's `inference/config.json` (ModelArgs field names, SPEC §B1)."""
        d = _as_dict(model_args)
        n_layers = d.get("n_layers", 7)
        kwargs = dict(
            d_vocab=d.get("vocab_size", 129280),
            d_model=d.get("dim", 4096),
            n_layers=n_layers,
            n_heads=d.get("n_heads", 64),
            head_dim=d.get("head_dim", 512),
            rope_head_dim=d.get("rope_head_dim", 64),
            q_lora_rank=d.get("q_lora_rank", 1024),
            o_lora_rank=d.get("o_lora_rank", 1024),
            o_groups=d.get("o_groups", 8),
            window_size=d.get("window_size", 128),
            compress_ratios=tuple(d.get("compress_ratios", (0, 0, 4, 128, 4, 128, 4, 0))),
            rope_theta=d.get("rope_theta", 10000.0),
            compress_rope_theta=d.get("compress_rope_theta", 40000.0),
            rope_factor=d.get("rope_factor", 40.0),
            original_seq_len=d.get("original_seq_len", 0),
            beta_fast=d.get("beta_fast", 32),
            beta_slow=d.get("beta_slow", 1),
            index_n_heads=d.get("index_n_heads", 64),
            index_head_dim=d.get("index_head_dim", 128),
            index_topk=d.get("index_topk", 512),
            n_routed_experts=d.get("n_routed_experts", 8),
            n_shared_experts=d.get("n_shared_experts", 1),
            n_activated_experts=d.get("n_activated_experts", 2),
            moe_inter_dim=d.get("moe_inter_dim", 4096),
            n_hash_layers=d.get("n_hash_layers", 0),
            score_func=d.get("score_func", "sqrtsoftplus"),
            route_scale=d.get("route_scale", 1.0),
            swiglu_limit=d.get("swiglu_limit", 0.0),
            hc_mult=d.get("hc_mult", 4),
            hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20),
            hc_eps=d.get("hc_eps", 1e-6),
            norm_eps=d.get("norm_eps", 1e-6),
            n_mtp_layers=d.get("n_mtp_layers", 1),
        )
        if "max_seq_len" in d and "original_seq_len" in d and d["original_seq_len"]:
            kwargs["max_position_embeddings"] = int(d["original_seq_len"] * d.get("rope_factor", 1))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_official(self) -> dict:
        """ModelArgs-style dict (DeepSeek's inference/config.json names)."""
        return {
            "vocab_size": self.d_vocab, "dim": self.d_model, "moe_inter_dim": self.moe_inter_dim,
            "n_layers": self.n_layers, "n_hash_layers": self.n_hash_layers, "n_mtp_layers": self.n_mtp_layers,
            "n_heads": self.n_heads, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "n_activated_experts": self.n_activated_experts,
            "score_func": self.score_func, "route_scale": self.route_scale, "swiglu_limit": self.swiglu_limit,
            "q_lora_rank": self.q_lora_rank, "head_dim": self.head_dim, "rope_head_dim": self.rope_head_dim,
            "norm_eps": self.norm_eps, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "window_size": self.window_size,
            "compress_ratios": [self.compress_ratio(i) for i in range(self.n_layers + self.n_mtp_layers)],
            "compress_rope_theta": self.compress_rope_theta, "original_seq_len": self.original_seq_len,
            "rope_theta": self.rope_theta, "rope_factor": self.rope_factor, "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow, "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim, "index_topk": self.index_topk, "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
        }  # fmt: skip


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, (str, Path)):
        return json.loads(Path(obj).read_text())
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        d = obj.to_dict()
        for name in ("qk_rope_head_dim",):
            if hasattr(obj, name):
                d[name] = getattr(obj, name)
        return d
    return dict(vars(obj))


def _first(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)


# ---------------------------------------------------------------------- presets
def _tiny(**kw) -> V4Config:
    """Every attention type (sliding, CSA, HCA with a non-128 ratio), hash and routed MoE, MTP.

    Real vocabulary so the V4 tokenizer's ids are valid; everything else tiny.
    """
    base = dict(
        name="tiny", d_vocab=129280, d_model=64, n_layers=4, n_heads=4, head_dim=32, rope_head_dim=8,
        q_lora_rank=32, o_lora_rank=16, o_groups=2, window_size=8, compress_ratios=(0, 4, 6, 4, 0),
        index_n_heads=2, index_head_dim=16, index_topk=3, n_routed_experts=8, n_activated_experts=2,
        moe_inter_dim=32, n_hash_layers=1, n_mtp_layers=1,
    )  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _tiny_recall(**kw) -> V4Config:
    """The model `v4lens.load("tiny-recall")` ships trained (v4lens/train.py, v4lens/checkpoints/tiny-recall).

    128-token synthetic vocabulary (layout in v4lens.train); layer 0 sliding (window 8) with a
    hash-routed MoE, layer 1 CSA (ratio 4, Lightning Indexer picking the top 2 entries), layer 2
    HCA (ratio 8); 4 routed experts (top-2) + 1 shared; mHC with 4 streams; no MTP block.
    """
    base = dict(
        name="tiny-recall", d_vocab=128, d_model=64, n_layers=3, n_heads=4, head_dim=32, rope_head_dim=8,
        q_lora_rank=32, o_lora_rank=16, o_groups=2, window_size=8, compress_ratios=(0, 4, 8),
        index_n_heads=2, index_head_dim=16, index_topk=2, n_routed_experts=4, n_activated_experts=2,
        moe_inter_dim=64, n_hash_layers=1, n_mtp_layers=0, hc_mult=4, max_position_embeddings=4096,
        original_seq_len=0,  # no YaRN: sequences are short
    )  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _mini_3b(**kw) -> V4Config:
    """SPEC decision 7: the seed's small-scale replica of V4-Flash."""
    base = dict(
        name="mini-3b", d_vocab=129280, d_model=1536, n_layers=28, n_heads=24, head_dim=64, rope_head_dim=32,
        q_lora_rank=512, o_lora_rank=512, o_groups=4, window_size=64,
        compress_ratios=(0, 0) + (4, 112) * 12 + (4, 0), index_n_heads=16, index_head_dim=96, index_topk=192,
        n_routed_experts=24, n_activated_experts=4, moe_inter_dim=768, n_hash_layers=2, n_mtp_layers=1,
        max_position_embeddings=1048576, rope_factor=16.0, original_seq_len=65536, compress_rope_theta=160000.0,
        rope_theta=10000.0, route_scale=1.5, swiglu_limit=10.0, hc_mult=4,
    )  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _flash(**kw) -> V4Config:
    """V4-Flash's dimensions (config only: 284B parameters do not fit here)."""
    base = dict(name="flash")
    base.update(kw)
    return V4Config(**base)


PRESETS = {"tiny": _tiny, "tiny-recall": _tiny_recall, "mini-3b": _mini_3b, "flash": _flash}


def preset(name: str, **overrides) -> V4Config:
    """A preset config by name (`tiny`, `tiny-recall`, `mini-3b`, `flash`), with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
