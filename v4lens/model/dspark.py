"""DSpark, the block drafter of V4-Flash-0731 and V4-Pro-0813 (it replaces the April MTP block).

After the main model has run positions 0..p, DSpark drafts `dspark_block_size` (K) tokens at once:
- taps: the mean over the n streams of the output streams of each target layer, concatenated and
  projected to the context vector main_x = main_norm(main_proj · taps) [b, S, D];
- the draft block: the anchor token a (the token at p+1: the main head's argmax at p unless given)
  then K-1 noise tokens, embedded with the main embedding, copied into the n streams, at positions
  p+1 .. p+K;
- stages: ordinary V4 blocks (layer n_layers + s, score-routed MoE) whose attention lets every
  block query see the context keys of the last W main positions (from main_x, with the stage's
  own wkv and kv_norm) and all K block keys (not causal inside the block); stage s+1 takes stage
  s's output streams;
- heads: the last stage's hc_head and norm, the shared head (U, fp32), a Markov head that walks
  y_0 = a, y_{k+1} = argmax(U_k + markov_w2 · markov_w1[y_k]) and a confidence head
  c_k = w_c · [h_k ; markov_w1[y_k]] (raw logit, h before the norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from .attention import Attention
from .block import Block
from .config import V4Config
from .head import fp32_logits
from .hyper_connections import HyperHead
from .kv_cache import push_context
from .linear import linear
from .norm import RMSNorm
from .params import is_hooked, param
from .rope import apply_rope


@dataclass
class Draft:
    """What `model(tokens, draft=True)` returns beside the result (K = dspark_block_size).

    tokens [b,K] int64: draft k is the guess for position p+2+k (p the last input position);
    logits [b,K,V] fp32: the Markov-corrected logits ℓ_k = base_logits + markov_bias;
    confidences [b,K] fp32: raw logits c_k (σ(c_k): the predicted probability that draft k survives
    given the earlier ones did); base_logits [b,K,V] fp32: U, the stages' logits through the shared
    head; markov_bias [b,K,V] fp32: markov_w2 · markov_w1[y_k], the Markov head's share;
    probs [b,K,V] fp32 or None: for sampled drafts (speculative sampling), the distribution each
    draft token was drawn from (a point mass where a hook chose the token).
    The walk picks the tokens before `dspark.hook_markov_bias` / `hook_draft_logits` fire, so an edit
    there changes `logits` / `markov_bias` but not `tokens` (then the tokens need not be the argmax of
    the logits returned with them); to change the drafts, edit `hook_base_logits` or `hook_drafts`.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    confidences: torch.Tensor
    base_logits: torch.Tensor | None = None
    markov_bias: torch.Tensor | None = None
    probs: torch.Tensor | None = None


class DSparkAttention(Attention):
    """A stage's attention: K block queries over [context keys of main positions p-L+1..p, K block keys].

    Same hooks as `Attention` (positions p of a hook = the K block positions; `hook_kv` [b,K,c] the
    block keys; `hook_key_index` [b,K,L+K] in absolute positions: main position j -> j, block
    position i -> p+1+i), plus `hook_context_kv` [b,L,c] (the context keys, L = min(W, p+1)).
    """

    def __init__(self, cfg: V4Config, layer: int, device=None):
        super().__init__(cfg, layer, device=device)
        self.hook_context_kv = HookPoint()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
        """x [b,K,D] (attn-normed block), positions [K] = p+1..p+K, context = (main_x [b,L,D], their positions [L])."""
        cfg = self.cfg
        b, K, _ = x.shape
        H, c = cfg.n_heads, cfg.head_dim
        main_x, ctx_positions = context
        freqs = self.freqs(x.device)

        q_latent = self.hook_q_latent(self.q_norm(linear(x, self.wq_a)))
        q = linear(q_latent, self.wq_b).view(b, K, H, c)
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + cfg.norm_eps)  # unweighted, model dtype
        q = self.hook_q(apply_rope(q, positions, freqs))
        # context and block keys in one pass, so kv_norm's hook fires once ([b, L+K, c])
        all_keys = torch.cat([ctx_positions, positions])  # absolute positions first..p+K, contiguous
        both = apply_rope(self.kv_norm(linear(torch.cat([main_x.to(x.dtype), x], dim=1), self.wkv)), all_keys, freqs)
        L = ctx_positions.shape[0]
        keys = torch.cat([self.hook_context_kv(both[:, :L]), self.hook_kv(both[:, L:])], dim=1)  # [b, L+K, c]

        first, last = int(ctx_positions[0]), int(positions[-1])
        # every query sees every key (not causal in the block); repeat, not expand: hooks may edit in place
        index = self.hook_key_index(all_keys[None, None].repeat(b, K, 1))
        if is_hooked(self.hook_key_index) and (used := index[index >= 0]).numel():
            lo, hi = int(used.min()), int(used.max())
            if lo < first or hi > last:
                raise ValueError(f"{self.hook_key_index.name}: candidate {hi if hi > last else lo} does not exist "
                                 f"here (positions {first}..{last} are held, -1 empty)")  # fmt: skip
        local = torch.where(index >= 0, index - first, -1)
        sink_logit = self.hook_sink_logit(self.attn_sink[None, :, None].repeat(b, 1, K))
        z = self._attend(q, keys, lambda s0, s1: local[:, s0:s1], sink_logit)  # [b,K,H,c]
        z = self.hook_z(apply_rope(z, positions, freqs, inverse=True))
        return self._project_out(z)


class DSparkStage(Block):
    """One stage: an ordinary block (layer n_layers + index) with `DSparkAttention`; the block's hooks."""

    def __init__(self, cfg: V4Config, index: int, device=None):
        super().__init__(cfg, cfg.n_layers + index, device=device)
        self.attn = DSparkAttention(cfg, cfg.n_layers + index, device=device)

    def forward(self, streams: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
        """streams [b,K,n,d], positions [K], context (main_x [b,L,D], positions [L]) -> streams [b,K,n,d]."""
        # Block.forward hands its last argument to the attention: here the context, not a decoding cache
        return super().forward(streams, positions, None, context)


class DSpark(nn.Module):
    """The drafter (`model.dspark`). Hooks (T target layers, K = block size): `hook_taps` [b,p,T,d],
    `hook_main_x` [b,p,d], `stages.{s}.*` (block hooks), `hc_head.*`, `ln_final.hook_normalized`,
    `hook_base_logits` [b,K,V] (U), `hook_drafts` [b,K] int64, `hook_markov_bias` [b,K,V],
    `hook_draft_logits` [b,K,V], `hook_confidence` [b,K] (fp32 raw logits), in this order."""

    def __init__(self, cfg: V4Config, device=None):
        super().__init__()
        D, V, r, T = cfg.d_model, cfg.d_vocab, cfg.dspark_markov_rank, len(cfg.dspark_target_layer_ids)
        self.hook_taps = HookPoint()
        self.main_proj = param((D, T * D), cfg.dtype, device)
        self.main_norm = RMSNorm(D, cfg.norm_eps, device=device)
        self.hook_main_x = HookPoint()
        self.stages = nn.ModuleList(DSparkStage(cfg, s, device=device) for s in range(cfg.n_mtp_layers))
        self.hc_head = HyperHead(cfg, device=device)
        self.ln_final = RMSNorm(D, cfg.norm_eps, device=device)
        self.markov_w1 = param((V, r), cfg.dtype, device)
        self.markov_w2 = param((V, r), cfg.dtype, device)
        self.confidence_proj = param((1, D + r), cfg.dtype, device)
        self.hook_base_logits = HookPoint()
        self.hook_drafts = HookPoint()
        self.hook_markov_bias = HookPoint()
        self.hook_draft_logits = HookPoint()
        self.hook_confidence = HookPoint()

    def markov_walk(self, base: torch.Tensor, anchor: torch.Tensor, forced=None, pick=None):
        """y_0 = anchor, y_{k+1} = argmax (or `pick`) of ℓ_k = U_k + markov_w2 · markov_w1[y_k]: base U [b,K,V],
        anchor [b] -> (drafts [b,K], probs [b,K,V] or None). pick(ℓ [b,V]) -> (tokens [b], probs [b,V]) draws
        a token (sampling); forced = (mask [b,K], tokens [b,K]): where mask, y_{k+1} is that token instead."""
        y, drafts, probs = anchor, [], []
        for k in range(base.shape[1]):
            # fp32 like the head (and by the same routine: no fp32 copy of the whole [V, r] table)
            logits = base[:, k] + fp32_logits(self.markov_w1[y], self.markov_w2)
            if pick is None:
                y = logits.argmax(-1)
            else:
                y, p = pick(logits)
                probs.append(p)
            if forced is not None:
                y = torch.where(forced[0][:, k], forced[1][:, k], y)
            drafts.append(y)
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs else None)


def dspark_args(cfg: V4Config, draft: bool, mtp: bool, draft_anchor, batch: int, device):
    """Check `forward`'s draft options -> draft_anchor as int64 [b] or None."""
    if mtp and cfg.draft == "dspark":
        raise ValueError(f"{cfg.name} drafts with DSpark, not MTP blocks: use draft=True instead of mtp=True")
    if draft_anchor is not None and not draft:
        raise ValueError("draft_anchor is only used with draft=True")
    if not draft:
        return None
    if cfg.draft != "dspark":
        raise ValueError(f"draft=True needs a DSpark model (cfg.dspark_block_size > 0); {cfg.name} has "
                         f"{'MTP blocks: use mtp=True' if cfg.draft == 'mtp' else 'no draft module'}")  # fmt: skip
    return None if draft_anchor is None else anchor_tensor(cfg, draft_anchor, batch, device)


def anchor_tensor(cfg: V4Config, anchor, batch: int, device) -> torch.Tensor:
    """An anchor token (int, or int64 [b] / [] tensor) -> int64 [b] on `device`, range-checked."""
    from .inputs import check_token_range, token_tensor

    if isinstance(anchor, int) and not isinstance(anchor, bool):
        anchor = torch.tensor(anchor)
    anchor = token_tensor(anchor, "draft_anchor").to(device)
    anchor = anchor.expand(batch) if anchor.ndim == 0 else anchor
    if anchor.shape != (batch,):
        raise ValueError(f"draft_anchor must be an int or int64 [batch={batch}], got shape {tuple(anchor.shape)}")
    check_token_range(anchor, cfg.d_vocab, "draft_anchor")
    return anchor.long()


def context_vectors(model, taps: dict, cache=None) -> torch.Tensor:
    """main_x [b,S,D] from the output streams [b,S,n,d] of the target layers (`taps`: layer -> streams);
    with a decoding cache, also appended to its context ring (the last W positions)."""
    cfg, ds = model.cfg, model.dspark
    # plain mean over the streams (no hc_pre, no norm), as the reference's taps
    tapped = ds.hook_taps(torch.stack([taps[layer].mean(dim=2) for layer in cfg.dspark_target_layer_ids], dim=2))
    main_x = ds.hook_main_x(ds.main_norm(linear(tapped.flatten(2), ds.main_proj)))  # [b,S,T·D] -> [b,S,D]
    if cache is not None:
        cache.dspark_context = push_context(cache.dspark_context, main_x, cfg.window_size)
    return main_x


def run_dspark(model, main_x, logits: torch.Tensor, positions: torch.Tensor, anchor=None, cache=None) -> Draft:
    """DSpark after the main model's chunk: main_x [b,S,D] its context vectors, logits the main head's [b,≥1,V],
    positions [S]; anchor [b] or None (the main head's argmax at the last position). With a decoding cache
    (already advanced past the chunk) the context is its ring, which covers earlier chunks too."""
    if anchor is None:
        anchor = logits[:, -1].argmax(-1)
    if cache is not None:
        return draft_block(model, ring_context(cache), anchor)
    L = min(model.cfg.window_size, main_x.shape[1])  # the context ring: main positions max(0, p-W+1) .. p
    return draft_block(model, (main_x[:, -L:], positions[-L:]), anchor)


def ring_context(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's context ring and its positions: (main_x [b,L,D], [L] = length-L .. length-1)."""
    ring = cache.dspark_context
    return ring, torch.arange(cache.length - ring.shape[1], cache.length, device=ring.device)


def draft_from_cache(model, cache, anchor, pick=None) -> Draft:
    """Draft the block after the last position `cache` holds, from its context ring (no main-model
    forward): anchor int or int64 [b], the token at that next position; pick(ℓ [b,V]) -> (tokens [b],
    probs [b,V]) samples each draft (default: argmax). What speculative decoding calls every round."""
    if model.cfg.draft != "dspark":
        raise ValueError(f"{model.cfg.name} has no DSpark drafter (cfg.dspark_block_size = 0)")
    if cache.dspark_context is None or cache.length == 0:
        raise ValueError("the decoding cache holds no DSpark context yet: run the prompt through the model with "
                         "past_kv_cache=cache first")  # fmt: skip
    cache._check_model(model)
    return draft_block(model, ring_context(cache), anchor_tensor(model.cfg, anchor, cache.batch, cache.dspark_context.device), pick)


def draft_block(model, context, anchor: torch.Tensor, pick=None) -> Draft:
    """The stages and heads: context = (main_x [b,L,D], positions [L], the last being p), anchor [b]
    (the token at p+1) -> the Draft of positions p+2 .. p+K+1."""
    cfg, ds = model.cfg, model.dspark
    K, V = cfg.dspark_block_size, cfg.d_vocab
    main_x, ctx_positions = context
    b = main_x.shape[0]
    noise = torch.full((b, K - 1), cfg.dspark_noise_token_id, dtype=torch.long, device=anchor.device)
    block_tokens = torch.cat([anchor[:, None], noise], dim=1)  # [b,K]
    embed = F.embedding(block_tokens, model.embed.weight)
    streams = embed[:, :, None, :].repeat(1, 1, cfg.hc_mult, 1)  # a real copy: hooks may edit in place
    block_positions = ctx_positions[-1] + 1 + torch.arange(K, device=ctx_positions.device)
    for stage in ds.stages:  # the official code chains the stages: stage s+1 reads stage s's output streams
        streams = stage(streams, block_positions, context)

    h = ds.hc_head(streams)  # [b,K,D], before the norm (the confidence head reads it)
    base = ds.hook_base_logits(fp32_logits(ds.ln_final(h), model.head.weight))  # U [b,K,V]
    walked, probs = ds.markov_walk(base, anchor, pick=pick)
    drafts = ds.hook_drafts(walked.clone())
    if not torch.equal(drafts, walked):  # a hook forced some drafts: the later Markov steps follow them
        from .inputs import check_token_range

        check_token_range(drafts, cfg.d_vocab, ds.hook_drafts.name or "dspark.hook_drafts")
        changed = drafts != walked
        keep = changed | (changed.long().cumsum(1) == 0)  # the hook's tokens and the walk's before them
        drafts, probs = ds.markov_walk(base, anchor, forced=(keep, drafts), pick=pick)
        if probs is not None:  # a token the hook chose was drawn from nothing but itself: a point mass
            probs = torch.where(changed[..., None], F.one_hot(drafts, V).float(), probs)
    previous = torch.cat([anchor[:, None], drafts[:, :-1]], dim=1)  # y_0 .. y_{K-1}
    e = ds.markov_w1[previous].float()  # [b,K,r]
    bias = ds.hook_markov_bias(fp32_logits(ds.markov_w1[previous], ds.markov_w2))  # [b,K,V], as in the walk
    draft_logits = ds.hook_draft_logits(base + bias)
    conf = F.linear(torch.cat([h.float(), e], dim=-1), ds.confidence_proj.float())[..., 0]
    return Draft(tokens=drafts, logits=draft_logits, confidences=ds.hook_confidence(conf), base_logits=base,
                 markov_bias=bias, probs=probs)  # fmt: skip
