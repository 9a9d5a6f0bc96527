"""DeepSeekMoE: an fp32 router over routed experts plus one shared expert.

Scores are sqrt(softplus(gate logits)) (or softmax / sigmoid). Learned layers pick the top-k
of score + bias (the bias only steers selection); the first `n_hash_layers` layers take
their experts from a fixed token-id table `tid2eid` instead. The chosen experts' unbiased
scores are normalised and scaled by `route_scale`. Experts are SwiGLU with the gate clamped
above and the up projection clamped both ways; the routing weight multiplies the hidden
activation before the down projection, and outputs are summed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from .config import V4Config
from .linear import linear, native_bf16_products
from .params import fp32_param, param


def clamped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU(min(w1·x, L)) ⊙ clamp(w3·x, -L, L) in fp32 (GEMMs in the model dtype). [n, D] -> [n, I]."""
    gate = linear(x, w1).float()
    up = linear(x, w3).float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def product_rows(count: int, x: torch.Tensor) -> int:
    """Rows an expert's products run on for `count` tokens: on CPU in bf16, `count` rounded up to one of
    16 sizes per octave (at most 1/16 more rows, ~3% on average), else `count`.

    PyTorch keeps every bf16 product shape it has run as a oneDNN primitive (~0.6 MiB each, up to 1,024
    in each of two caches) and builds a new one for each new shape (~0.3-1.5 ms). Each expert's token
    count is a new shape: one 8k-token forward of mini-3b left ~900 of them, 0.53 GiB. Rounded counts
    repeat across experts, layers and input lengths. The extra rows are computed and dropped; oneDNN
    computes each row of a product on its own, so the kept rows are bit-identical (tested). A CPU
    without native bf16 products multiplies in fp32 instead (linear.py), with no oneDNN primitives.
    """
    if count < 32 or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not native_bf16_products():
        return count
    step = 1 << (count.bit_length() - 5)
    return -(-count // step) * step


class Experts(nn.Module):
    """Routed experts stacked: w1, w3 [E, I, D] (gate, up) and w2 [E, D, I] (down)."""

    def __init__(self, cfg: V4Config, device=None):
        super().__init__()
        E, I, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.d_model
        self.w1 = param((E, I, D), cfg.dtype, device)
        self.w2 = param((E, D, I), cfg.dtype, device)
        self.w3 = param((E, I, D), cfg.dtype, device)
        self.limit = cfg.swiglu_limit

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, per_slot: bool = False
    ) -> torch.Tensor:
        """Each expert runs once on the tokens routed to it.

        x [N, D], ids [N, k] (-1 = empty slot), weights [N, k] fp32 -> the weighted sum over slots,
        accumulated in fp32 in increasing expert order like the reference ([N, D] fp32), or with
        per_slot=True each slot's weighted output ([N, k, D], model dtype; empty slots zero).
        """
        N, k = ids.shape
        chosen = self._one_token_distinct(ids)
        if chosen is not None:
            return self._one_token(x, chosen, weights, per_slot)
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert id
        counts = torch.bincount(flat_ids.clamp(min=0)[flat_ids >= 0], minlength=self.w1.shape[0]).tolist()
        n_empty = int((flat_ids < 0).sum())
        token_of_slot = order // k
        slot_weights = weights.flatten()[order]
        if per_slot:
            outputs = x.new_zeros(N * k, x.shape[-1])
        else:
            outputs = x.new_zeros(N, x.shape[-1], dtype=torch.float32)
        prefetch = getattr(self.w1, "prefetch", None)  # experts kept elsewhere: start reading the ones used
        if prefetch is not None:
            prefetch([e for e, count in enumerate(counts) if count], self.w3, self.w2)
        start = n_empty  # empty slots (-1) sort first
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            sl = slice(start, start + count)
            tokens, routing = token_of_slot[sl], slot_weights[sl, None]
            rows = product_rows(count, x)
            if rows > count:  # extra rows (token 0, routing weight 0) computed and dropped: see product_rows
                tokens, routing = F.pad(tokens, (0, rows - count)), F.pad(routing, (0, 0, 0, rows - count))
            hidden = clamped_swiglu(x[tokens], self.w1[expert], self.w3[expert], self.limit)
            hidden = hidden * routing  # routing weight before w2, in fp32
            y = linear(hidden.to(x.dtype), self.w2[expert])[:count]
            tokens = tokens[:count]
            if per_slot:
                outputs[order[sl]] = y
            else:
                outputs.index_add_(0, tokens, y.float())
            start += count
        return outputs.view(N, k, -1) if per_slot else outputs

    def _one_token_distinct(self, ids: torch.Tensor) -> list[int] | None:
        """ids [1, k] as a list when one token's slots name distinct experts (or are empty), else None.
        Offloaded experts (which prefetch what a step uses) take the general path."""
        if ids.shape[0] != 1 or getattr(self.w1, "prefetch", None) is not None:
            return None
        chosen = ids[0].tolist()
        used = [e for e in chosen if e >= 0]
        return chosen if len(set(used)) == len(used) else None

    def _one_token(self, x: torch.Tensor, chosen: list[int], weights: torch.Tensor, per_slot: bool) -> torch.Tensor:
        """`forward` for one token whose slots name distinct experts (a decoding step): the same products,
        in the same increasing expert order, without sorting and grouping slots (bit-identical).
        x [1, D], chosen: the k expert ids (-1 = empty slot), weights [1, k] fp32."""
        k = len(chosen)
        outputs = x.new_zeros(k, x.shape[-1]) if per_slot else x.new_zeros(1, x.shape[-1], dtype=torch.float32)
        for slot in sorted((s for s in range(k) if chosen[s] >= 0), key=chosen.__getitem__):
            expert = chosen[slot]
            hidden = clamped_swiglu(x, self.w1[expert], self.w3[expert], self.limit)
            hidden = hidden * weights[:, slot : slot + 1]  # routing weight before w2, in fp32
            y = linear(hidden.to(x.dtype), self.w2[expert])
            if per_slot:
                outputs[slot] = y[0]
            else:
                outputs.add_(y.float())
        return outputs.view(1, k, -1) if per_slot else outputs


class SharedExpert(nn.Module):
    def __init__(self, cfg: V4Config, device=None):
        super().__init__()
        I, D = cfg.moe_inter_dim, cfg.d_model
        self.w1 = param((I, D), cfg.dtype, device)
        self.w2 = param((D, I), cfg.dtype, device)
        self.w3 = param((I, D), cfg.dtype, device)
        self.limit = cfg.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(clamped_swiglu(x, self.w1, self.w3, self.limit).to(x.dtype), self.w2)


class Gate(nn.Module):
    """Router parameters: `weight` [E, D]; `bias` [E] fp32 (learned layers) or `tid2eid` [V, k] (hash layers)."""

    def __init__(self, cfg: V4Config, hashed: bool, device=None):
        super().__init__()
        self.weight = param((cfg.n_routed_experts, cfg.d_model), cfg.dtype, device)
        if hashed:
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.d_vocab, cfg.n_activated_experts, dtype=torch.long, device=device)
            )
            self.bias = None
        else:
            self.bias = fp32_param(torch.empty(cfg.n_routed_experts, device=device))


class MoE(nn.Module):
    """Hooks: `hook_router_logits` [b,p,E] fp32, `hook_router_scores` [b,p,E] fp32,
    `hook_hash_ids` [b,p,k] int64 (hash layers), `hook_expert_ids` [b,p,k] int64 (-1 = empty
    slot), `hook_expert_weights` [b,p,k] fp32, `hook_expert_out` [b,p,k,d] (cfg.use_expert_out),
    `hook_shared_out` [b,p,d]. Editing ids re-routes (weights follow the new experts' scores),
    editing weights re-weights.
    """

    def __init__(self, cfg: V4Config, layer: int, device=None):
        super().__init__()
        self.cfg = cfg
        self.hashed = cfg.is_hash_layer(layer)
        self.gate = Gate(cfg, self.hashed, device=device)
        self.experts = Experts(cfg, device=device)
        self.shared_experts = SharedExpert(cfg, device=device)
        self.hook_router_logits = HookPoint()
        self.hook_router_scores = HookPoint()
        if self.hashed:
            self.hook_hash_ids = HookPoint()
        self.hook_expert_ids = HookPoint()
        self.hook_expert_weights = HookPoint()
        if cfg.use_expert_out:
            self.hook_expert_out = HookPoint()
        self.hook_shared_out = HookPoint()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_func == "softmax":
            return logits.softmax(dim=-1)
        if self.cfg.score_func == "sigmoid":
            return logits.sigmoid()
        return F.softplus(logits).sqrt()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """x [b,S,D] (ffn-normed), tokens [b,S] (needed by hash layers) -> [b,S,D]."""
        cfg = self.cfg
        b, S, D = x.shape
        E, k = cfg.n_routed_experts, cfg.n_activated_experts
        logits = self.hook_router_logits(F.linear(x.float(), self.gate.weight.float()))
        scores = self.hook_router_scores(self.scores(logits))
        if self.hashed:
            if tokens is None:
                raise ValueError("hash-routed MoE layers need token ids (they route by tid2eid[token])")
            ids = self.hook_hash_ids(self.gate.tid2eid[tokens])
        else:
            ids = (scores + self.gate.bias).topk(k, dim=-1).indices
        ids = self.hook_expert_ids(ids)
        _check_expert_ids(ids, E, self.hook_expert_ids.name)
        weights = torch.where(ids >= 0, scores.gather(-1, ids.clamp(min=0)), 0.0)
        if cfg.score_func != "softmax":
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / torch.where(total > 0, total, 1.0)  # a token with every slot emptied gets 0, not NaN
        weights = self.hook_expert_weights(weights * cfg.route_scale)

        flat = (x.reshape(b * S, D), ids.reshape(b * S, -1), weights.reshape(b * S, -1))
        if cfg.use_expert_out != hasattr(self, "hook_expert_out"):  # cfg edited after the model was built
            raise RuntimeError(f"cfg.use_expert_out was set to {cfg.use_expert_out} after the model was built; "
                               f"switch it with model.set_use_expert_out({cfg.use_expert_out}), which adds or "
                               "removes the blocks.{l}.mlp.hook_expert_out hook points")  # fmt: skip
        if cfg.use_expert_out:  # per-slot outputs exist as a tensor (and can be edited) only when asked for
            slots = self.hook_expert_out(self.experts(*flat, per_slot=True).view(b, S, -1, D))
            routed = slots.float().sum(dim=2)
        else:
            routed = self.experts(*flat).view(b, S, D)
        shared = self.hook_shared_out(self.shared_experts(x))
        return (routed + shared.float()).to(x.dtype)


def _check_expert_ids(ids: torch.Tensor, n_experts: int, name: str | None) -> None:
    if ids.dtype != torch.long:
        raise TypeError(f"{name}: expert ids must be int64, got {ids.dtype}")
    if ids.numel() and (int(ids.max()) >= n_experts or int(ids.min()) < -1):
        raise ValueError(f"{name}: expert ids must lie in [-1, {n_experts}), got {int(ids.min())}..{int(ids.max())}")
