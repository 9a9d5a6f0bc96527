"""Exact logit attribution through mHC: every logit as a sum of the embedding and the sub-layer writes.

V4 has no single additive residual. Each sub-layer s reads its streams and rebuilds them as

    X' = combᵀ_s · X + post_s ⊗ f_s          (X: [n, d] streams, f_s: the sub-layer output [d])

and the head reads y = Σ_k pre_k X_k, then the final RMSNorm and the unembedding. With every
mixing weight (each later sub-layer's comb, hc_head's pre) and the final norm's 1/rms frozen at
their values in the run being explained, the map from the writes to the logit is linear:

    y     = α_embed · e + Σ_s α_s · f_s,        α_s = preᵀ · comb_S ⋯ comb_{s+1} · post_s   (a scalar per token)
    logit = u · (w ⊙ y) / rms(y)                 (u: the unembedding row or any direction)

so each write contributes α_s · (u ⊙ w / rms) · f_s, and the parts sum to the model's value
(to fp32 rounding in an fp32 model; a bf16 model rounds its streams to bf16 after every
sub-layer, so there the parts sum to the value within that rounding, ~0.5% on `tiny`).
Attention writes split further into heads (the grouped output projection is linear) and MoE
writes into routed expert slots and the shared expert. `stream_lineage` gives the vector form
before hc_head: how much of each write reaches each final stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import HookedV4
from .layout import require_hooks


def decomposition_hooks(model: HookedV4, heads: bool = False, experts: bool = False) -> list[str]:
    """The hook names `decompose` reads (pass as `names_filter` to `run_with_cache`)."""
    names = ["hook_embed", "hc_head.hook_pre", "hc_head.hook_out", "ln_final.hook_normalized", "hook_logits"]
    for l in range(model.cfg.n_layers):
        p = f"blocks.{l}."
        names += [p + "attn_hc.hook_post", p + "attn_hc.hook_comb", p + "mlp_hc.hook_post", p + "mlp_hc.hook_comb"]
        names += [p + "hook_attn_out", p + "hook_mlp_out"]
        if heads:
            names.append(p + "attn.hook_z")
        if experts:
            names += [p + "ln2.hook_normalized", p + "mlp.hook_expert_ids", p + "mlp.hook_expert_weights",
                      p + "mlp.hook_shared_out"]  # fmt: skip
    return names


@dataclass
class Decomposition:
    """`values[c, b, i]`: component c's contribution at batch b and position `positions[i]`.

    `labels[c]` names it ("embed", "L3.attn", "L3.attn.h5", "L3.mlp", "L3.mlp.slot1",
    "L3.mlp.shared"); `total[b, i]` is the model's own value; `values.sum(0)` equals it up to
    rounding. `expert_ids[l]` [b, P, k] says which expert each slot of layer l held.
    """

    values: torch.Tensor
    labels: list[str]
    total: torch.Tensor
    positions: list[int]
    expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)

    def top(self, k: int = 10, batch: int = 0, position: int = -1) -> list[tuple[str, float]]:
        """The k components with the largest |contribution| at one (batch, position index)."""
        v = self.values[:, batch, position]
        order = v.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(v[i])) for i in order]

    def to_dataframe(self):
        """Long-form pandas table: component, batch, position, value."""
        import pandas as pd

        C, B, P = self.values.shape
        return pd.DataFrame({
            "component": [self.labels[c] for c in range(C) for _ in range(B * P)],
            "batch": [b for _ in range(C) for b in range(B) for _ in range(P)],
            "position": [self.positions[i] for _ in range(C) for _ in range(B) for i in range(P)],
            "value": self.values.reshape(-1).tolist(),
        })  # fmt: skip


@torch.no_grad()
def decompose(
    model: HookedV4, cache=None, target=None, *, tokens: torch.Tensor | None = None, positions=-1,
    heads: bool = False, experts: bool = False,
) -> Decomposition:  # fmt: skip
    """Split a logit (or logit difference, or any direction) into embedding + sub-layer contributions.

    cache: from `model.run_with_cache(tokens, names_filter=decomposition_hooks(model, heads, experts))`
    (or any cache holding those hooks); or pass `tokens=` and the cache is made here.
    target: a token id (int), token ids [b] or [b, p] (the logit of that token), a pair
    `(a, b)` of those (logit(a) − logit(b)), or a direction in the unembedding's input space:
    [d], [b, d] or [b, p, d] (the value explained is direction · ln_final output).
    positions: an int, a list of ints, or None for all positions.
    heads / experts: split attention into heads and MoE into routed slots + shared expert.

    Example::

        dec = decompose(model, tokens=tokens, target=(answer_id, distractor_id), heads=True)
        dec.top(5)           # [("L3.attn.h2", 1.7), ("embed", -0.9), ...]
        dec.values.sum(0)    # == dec.total (up to rounding)
    """
    if cache is None:
        if tokens is None:
            raise ValueError("decompose needs a cache or tokens=")
        _, cache = model.run_with_cache(tokens, names_filter=decomposition_hooks(model, heads, experts))
    _require(cache, decomposition_hooks(model, heads, experts))
    cfg = model.cfg
    b, S = cache["hook_embed"].shape[:2]
    pos = list(range(S)) if positions is None else [positions] if isinstance(positions, int) else list(positions)
    pos = [p % S for p in pos]
    at = torch.tensor(pos, device=cache["hook_embed"].device)

    def get(name: str) -> torch.Tensor:  # [b, P, ...] at the chosen positions, fp32
        return cache[name][:, at].float()

    # direction in y space (before the final norm): u ⊙ w / rms(y)
    u = _unembed_direction(model, target, b, len(pos), at)
    y = get("hc_head.hook_out")
    inv_rms = torch.rsqrt(y.square().mean(-1, keepdim=True) + model.ln_final.eps)
    g = u * model.ln_final.w.float() * inv_rms  # [b, P, d]
    total = (u * get("ln_final.hook_normalized")).sum(-1)

    coefficients, _ = _propagate(model, cache, at)  # α per write, each [b, P]
    values, labels, expert_ids = [], [], {}

    def add(label: str, write: torch.Tensor, alpha: torch.Tensor) -> None:  # write [b, P, d]
        values.append(alpha * (write * g).sum(-1))
        labels.append(label)

    add("embed", get("hook_embed"), coefficients["embed"])
    for l, block in enumerate(model.blocks):
        p = f"blocks.{l}."
        if heads:
            results = block.attn.head_results(cache[p + "attn.hook_z"][:, at]).float()  # [b,P,H,d]
            for h in range(cfg.n_heads):
                add(f"L{l}.attn.h{h}", results[:, :, h], coefficients[f"L{l}.attn"])
        else:
            add(f"L{l}.attn", get(p + "hook_attn_out"), coefficients[f"L{l}.attn"])
        if experts:
            x = cache[p + "ln2.hook_normalized"][:, at]
            ids, weights = cache[p + "mlp.hook_expert_ids"][:, at], cache[p + "mlp.hook_expert_weights"][:, at]
            slots = block.mlp.experts(x.flatten(0, 1), ids.flatten(0, 1), weights.flatten(0, 1), per_slot=True)
            slots = slots.view(b, len(pos), -1, cfg.d_model).float()
            for k in range(slots.shape[2]):
                add(f"L{l}.mlp.slot{k}", slots[:, :, k], coefficients[f"L{l}.mlp"])
            add(f"L{l}.mlp.shared", get(p + "mlp.hook_shared_out"), coefficients[f"L{l}.mlp"])
            expert_ids[l] = ids
        else:
            add(f"L{l}.mlp", get(p + "hook_mlp_out"), coefficients[f"L{l}.mlp"])
    return Decomposition(torch.stack(values), labels, total, pos, expert_ids)


@torch.no_grad()
def stream_lineage(model: HookedV4, cache, positions=None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """How much of each write reaches each final stream (mixing frozen at this run's values).

    Returns (lineage [C, b, P, n], labels [C], coefficients [C, b, P]): lineage[c, ..., k] is the
    weight with which write c (the embedding, or a sub-layer output) appears in final stream k
    before hc_head; coefficients = hc_head's pre · lineage, the weight in the collapsed state.
    Needs the `*_hc.hook_post`, `*_hc.hook_comb` and `hc_head.hook_pre` hooks.

    Example::

        lineage, labels, _ = stream_lineage(model, cache, positions=[-1])
        lineage[labels.index("L0.attn"), 0, 0]     # [n]: layer 0's attention write in each final stream
    """
    S = cache["hc_head.hook_pre"].shape[1]
    pos = list(range(S)) if positions is None else [positions] if isinstance(positions, int) else list(positions)
    at = torch.tensor([p % S for p in pos], device=cache["hc_head.hook_pre"].device)
    coefficients, lineage = _propagate(model, cache, at)
    labels = list(lineage)
    return torch.stack([lineage[k] for k in labels]), labels, torch.stack([coefficients[k] for k in labels])


def _propagate(model: HookedV4, cache, at: torch.Tensor) -> tuple[dict, dict]:
    """Walk the sub-layers backwards carrying R = comb_Sᵀ ⋯ comb_{s+1}ᵀ ([b,P,n,n]: streams right
    after write s -> final streams). lineage_s = R · post_s; α_s = pre_head · lineage_s."""
    pre_head = cache["hc_head.hook_pre"][:, at].float()  # [b,P,n]
    b, P, n = pre_head.shape
    R = torch.eye(n, device=pre_head.device).expand(b, P, n, n)
    lineage = {}
    for l in reversed(range(model.cfg.n_layers)):
        for half, hc in (("mlp", "mlp_hc"), ("attn", "attn_hc")):
            post = cache[f"blocks.{l}.{hc}.hook_post"][:, at].float()
            comb = cache[f"blocks.{l}.{hc}.hook_comb"][:, at].float()  # comb[j, k]: input j -> output k
            lineage[f"L{l}.{half}"] = torch.einsum("bpkj,bpj->bpk", R, post)
            R = torch.einsum("bpkm,bpjm->bpkj", R, comb)  # R · combᵀ
    lineage["embed"] = R.sum(-1)  # the embedding sits in every stream with weight 1
    lineage = dict(reversed(list(lineage.items())))  # embed, L0.attn, L0.mlp, L1.attn, ...
    coefficients = {k: torch.einsum("bpk,bpk->bp", pre_head, v) for k, v in lineage.items()}
    return coefficients, lineage


def _unembed_direction(model: HookedV4, target, b: int, P: int, at: torch.Tensor) -> torch.Tensor:
    """The target as a direction u [b, P, d] (fp32) in the unembedding's input space."""
    W = model.head.weight
    if isinstance(target, tuple):
        return _unembed_direction(model, target[0], b, P, at) - _unembed_direction(model, target[1], b, P, at)
    t = torch.as_tensor(target, device=W.device)
    if t.is_floating_point():  # a direction
        d = t.float()
        if d.ndim == 1:
            return d.expand(b, P, -1)
        if d.ndim == 2:
            return d[:, None].expand(b, P, -1)
        return d[:, at]
    if t.ndim == 0:
        t = t.expand(b, P)
    elif t.ndim == 1:
        t = t[:, None].expand(b, P)
    else:
        t = t[:, at]
    return W[t].float()


def _require(cache, names: list[str]) -> None:
    require_hooks(
        cache, names, "run model.run_with_cache(tokens, names_filter=decomposition_hooks(model, heads, experts))"
    )
