"""V4Config <-> the two config formats checkpoints come with: transformers' `DeepseekV4Config`
(config.json with `hidden_size`, `layer_types`, ...) and DeepSeek's `ModelArgs` (inference/config.json
with `dim`, `compress_ratios`, ...). `V4Config.from_hf` / `to_hf` / `from_official` / `to_official`
call these; the field mapping follows the published configs of both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import V4Config


def from_hf(hf_config: Any, **overrides) -> V4Config:
    """From a transformers `DeepseekV4Config`, its `to_dict()`, or a config.json path.

    Accepts the explicit `layer_types` + `compress_rates` form and the legacy
    `compress_ratios` list (any ratio, 112 included: 4 means CSA, any other non-zero ratio HCA).
    """
    d = _as_dict(hf_config)
    n_layers = d.get("num_hidden_layers", 43)
    n_mtp = d.get("num_nextn_predict_layers", 1)
    dspark = _dspark_fields(d)
    if dspark:
        # The released transformers-style configs of the DSpark models (V4-Flash-0731, V4-Pro-0813) still say
        # num_nextn_predict_layers: 1, but their checkpoints hold three stages. Inferred rule: the stage count
        # is the number of compress_ratios entries after the backbone's (46 - 43 = 3 for Flash-0731), or the
        # stage ratios v4lens writes, else the official code's 3.
        extra = len(d.get("compress_ratios") or ()) - n_layers
        written = d.get("v4lens_mtp_compress_ratios") if d.get("compress_ratios") is None else None
        n_mtp = extra if extra > 0 else len(written) if written else 3
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
        if layer_types is None:  # HF's default is V4-Pro's layout (no sliding-only layers)
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
        **dspark,
        bos_token_id=d.get("bos_token_id") if d.get("bos_token_id") is not None else 0,
        eos_token_id=_first(d.get("eos_token_id"), 1),
        initializer_range=d.get("initializer_range", 0.02),
    )
    if yarn and compress_rp.get("attention_factor") not in (None, 1.0):
        raise ValueError("v4lens follows DeepSeek's reference, which applies no YaRN attention factor (mscale)")
    kwargs.update(overrides)
    return _build(kwargs, hf_config)

def to_hf(self: V4Config) -> Any:
    """A transformers `DeepseekV4Config` with the same math (explicit layer_types + compress_rates)."""
    from transformers import DeepseekV4Config

    types = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
    hca = {self.compress_ratio(i) for i in range(self.n_layers) if self.layer_type(i) == "hca"}
    dspark = _dspark_keys(self)  # transformers keeps unknown keys in the config (and ignores them)
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
        initializer_range=self.initializer_range, **dspark,
    )  # fmt: skip

def from_official(model_args: Any, **overrides) -> V4Config:
    """From DeepSeek's `inference/config.json` (ModelArgs field names)."""
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
        n_mtp_layers=d.get("n_mtp_layers", 1),  # DSpark configs: the number of stages (3 in 0731 / 0813)
        **_dspark_fields(d),
    )
    if "max_seq_len" in d and "original_seq_len" in d and d["original_seq_len"]:
        kwargs["max_position_embeddings"] = int(d["original_seq_len"] * d.get("rope_factor", 1))
    kwargs.update(overrides)
    return _build(kwargs, model_args)

def to_official(self: V4Config) -> dict:
    """ModelArgs-style dict (DeepSeek's inference/config.json names)."""
    return _dspark_keys(self) | {
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

_DSPARK_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")


def _dspark_fields(d: dict) -> dict:
    """The dspark_* keys of a config file (same names in both vocabularies) that are present."""
    return {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in _DSPARK_KEYS if d.get(k) is not None}


def _dspark_keys(cfg: V4Config) -> dict:
    """The dspark_* keys to write: only for a DSpark config (April configs are written as they were)."""
    if cfg.draft != "dspark":
        return {}
    return {k: list(v) if isinstance(v := getattr(cfg, k), tuple) else v for k in _DSPARK_KEYS}


# A config.json is a few KB; reading is capped so that a file symlinked to /dev/zero (or a huge
# one) is an error instead of a read that lasts until memory runs out.
MAX_CONFIG_BYTES = 1 << 20


def read_config_json(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """The JSON object in `path`; ValueError naming the file if it is larger than `max_bytes`,
    not JSON, or not a JSON object (a list, a string, ...)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(
            f"{path} is larger than {max_bytes / 2**20:g} MiB, far more than a config or index file holds; "
            "not reading it (a symlink to a device, or the wrong file?)"
        )
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), not a JSON {type(d).__name__}")
    return d


def _build(kwargs: dict, source: Any) -> V4Config:
    """V4Config(**kwargs); an invalid value read from a file names the file too."""
    try:
        return V4Config(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(source, (str, Path)):
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{source}: {e}") from e
        raise


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, (str, Path)):
        return read_config_json(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, (list, tuple, int, float, bool)) or obj is None:
        raise TypeError(f"expected a config (a dict, a config object or a config.json path), got {type(obj).__name__}")
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
