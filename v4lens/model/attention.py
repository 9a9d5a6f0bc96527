"""Shared-KV multi-query attention with a sliding window, compressed entries and a sink.

Each query attends over its candidate set only: the W most recent tokens (itself included),
then, on a CSA layer, the entries the Lightning Indexer picked, or, on an HCA layer, every
compressed entry visible so far. Candidates are gathered per query ([b, p, K, c]), never
materialised as an S×S mask, and long inputs are processed in query chunks, so memory and
time grow with S·K. One key vector serves as key and value for every head; its rotary part
is undone on the output (the "-i rotation") so values carry relative position. Heads are
projected out in groups (wo_a per group, then wo_b).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn
from transformer_lens.hook_points import HookPoint

from .compressor import Compressor
from .config import V4Config
from .guards import tag_candidates
from .indexer import Indexer, visible_entries
from .kv_cache import AttentionState, V4KVCache, append_entries
from .linear import einsum_in_model_dtype, grouped_linear, linear
from .norm import RMSNorm
from .params import fp32_param, is_hooked, param
from .rope import apply_rope, rope_frequencies


def window_index(positions: torch.Tensor, window: int) -> torch.Tensor:
    """Raw-token candidates of each query: t-W+1 .. t, oldest first, -1 before the sequence start. [S, W]."""
    idx = positions[:, None] + torch.arange(1 - window, 1, device=positions.device)
    return torch.where(idx >= 0, idx, -1)


def compressed_index(positions: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """HCA candidates: every entry w, -1 where not yet visible (w >= (t+1)//m). [S, T]."""
    w = torch.arange(n_entries, device=positions.device)
    return torch.where(w[None, :] < visible_entries(positions, ratio)[:, None], w[None, :], -1)


class Attention(nn.Module):
    """One attention sub-layer.

    Hooks (b batch, p query, h heads, c head_dim, K candidates per query):
    `hook_q_latent` [b,p,q_lora_rank], `hook_q` [b,p,h,c], `hook_kv` [b,p,c],
    `hook_key_index` [b,p,K] int64 (0..S-1 raw token, S+w compressed entry w, -1 empty),
    `hook_attn_scores` [b,h,p,K] fp32, `hook_sink_logit` [b,h,p] fp32, `hook_sink` [b,h,p]
    (observational), `hook_pattern` [b,h,p,K] fp32 (rows sum to 1 - sink), `hook_z` [b,p,h,c],
    `hook_result` [b,p,h,d] (only with cfg.use_attn_result).
    """

    def __init__(self, cfg: V4Config, layer: int, device=None):
        super().__init__()
        self.cfg = cfg
        self.layer, self.layer_type = layer, cfg.layer_type(layer)
        self.ratio = cfg.compress_ratio(layer)
        H, c, D, dtype = cfg.n_heads, cfg.head_dim, cfg.d_model, cfg.dtype
        G, R_o = cfg.o_groups, cfg.o_lora_rank
        self.wq_a = param((cfg.q_lora_rank, D), dtype, device)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, device=device)
        self.wq_b = param((H * c, cfg.q_lora_rank), dtype, device)
        self.wkv = param((c, D), dtype, device)
        self.kv_norm = RMSNorm(c, cfg.norm_eps, device=device)
        self.wo_a = param((G * R_o, H * c // G), dtype, device)
        self.wo_b = param((D, G * R_o), dtype, device)
        self.attn_sink = fp32_param(torch.empty(H, device=device))
        self.compressor = Compressor(cfg, self.ratio, c, device=device) if self.ratio else None
        self.indexer = Indexer(cfg, device=device) if self.layer_type == "csa" else None
        self._freqs: dict[torch.device, torch.Tensor] = {}  # per device, built on first use

        self.hook_q_latent = HookPoint()
        self.hook_q = HookPoint()
        self.hook_kv = HookPoint()
        self.hook_key_index = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_sink_logit = HookPoint()
        self.hook_sink = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        if cfg.use_attn_result:
            self.hook_result = HookPoint()

    def freqs(self, device: torch.device) -> torch.Tensor:
        """This layer's rotary frequencies (fp32 [rope_head_dim/2]), shared by q, kv, compressors and indexer."""
        if device not in self._freqs:
            self._freqs[device] = rope_frequencies(self.cfg, compressed=self.ratio != 0).to(device)
        return self._freqs[device]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V4KVCache | None = None) -> torch.Tensor:
        """x [b,S,D] (attn-normed), positions [S] absolute -> [b,S,D].

        With `cache` the chunk continues the sequence the cache holds (positions start at
        cache.length) and this layer's state in it is replaced by the state after the chunk.
        """
        cfg = self.cfg
        b, S, _ = x.shape
        H, c = cfg.n_heads, cfg.head_dim
        freqs = self.freqs(x.device)
        state = cache.layers.get(self.layer) if cache is not None else None
        commit = cache.commit if cache is not None else None

        q_latent = self.hook_q_latent(self.q_norm(linear(x, self.wq_a)))
        q = linear(q_latent, self.wq_b).view(b, S, H, c)
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + cfg.norm_eps)  # unweighted, model dtype
        q = self.hook_q(apply_rope(q, positions, freqs))
        kv = self.hook_kv(apply_rope(self.kv_norm(linear(x, self.wkv)), positions, freqs))

        # Index space seen by hooks: raw token p -> p, entry w -> N + w (N = tokens so far).
        # Locally the keys are [the cached window, this chunk's tokens, entries].
        past = state.window if state is not None else kv[:, :0]  # [b, ≤W-1, c]
        first = int(positions[0]) - past.shape[1]  # absolute position of the first raw key
        N = int(positions[-1]) + 1
        raw = torch.cat([past, kv], dim=1)
        entries, comp = None, None
        kept = raw[:, : past.shape[1] + (S if commit is None else commit)]  # the next chunk's past
        next_state = {"window": kept[:, max(0, kept.shape[1] - (cfg.window_size - 1)) :].clone()}
        if self.compressor is not None:
            new_entries, comp_next = self.compressor(x, freqs, state.compressor if state is not None else None, commit)
            old = state.entries if state is not None else new_entries[:, :0]
            entries = append_entries(old, new_entries)  # [b,T,c]
            n_kept = comp_next.n_entries - old.shape[1]
            next_state.update(compressor=comp_next, entries=append_entries(old, new_entries[:, :n_kept]))
            if self.indexer is not None:
                previous = (state.indexer, state.index_keys) if state is not None else None
                picks, (index_comp, index_keys) = self.indexer(x, q_latent, positions, freqs, previous, commit)
                next_state.update(indexer=index_comp, index_keys=index_keys)
                # edits may name any entry: keep only real, visible ones (causality)
                ok = (picks >= 0) & (picks < visible_entries(positions, 4)[:, None])
                comp = torch.where(ok, picks, -1)  # [b,S,k]
        n_entries = 0 if entries is None else entries.shape[1]

        def key_index_rows(s0: int, s1: int) -> torch.Tensor:
            """Rows s0..s1-1 of the key index [b, s, K] in hook numbering. On an HCA layer K grows
            with S (every visible entry), so the whole [b, S, K] is S²/m: build it a chunk at a time."""
            # repeat, not expand: a hook may edit key_index in place (TransformerLens patch setters do)
            rows = window_index(positions[s0:s1], cfg.window_size)[None].repeat(b, 1, 1)
            if entries is None:
                return rows
            if comp is not None:  # CSA: the indexer's picks
                picked = comp[:, s0:s1]
            else:  # HCA: every entry visible so far
                picked = compressed_index(positions[s0:s1], n_entries, self.ratio)[None].expand(b, -1, -1)
            return torch.cat([rows, torch.where(picked >= 0, picked + N, -1)], dim=-1)

        keys = raw if entries is None else torch.cat([raw, entries], dim=1)  # [b, R(+T), c]
        to_local = {"n_raw": raw.shape[1], "n_keys": keys.shape[1], "first": first, "N": N}
        if any(map(is_hooked, (self.hook_key_index, self.hook_attn_scores, self.hook_pattern, self.hook_sink))):
            # someone reads or edits the whole key index (or the scores / pattern built on it): build it whole
            key_index = self.hook_key_index(key_index_rows(0, S))
            local = self._local_index(key_index, check=True, **to_local)

            def index_rows(s0: int, s1: int) -> torch.Tensor:
                return local[:, s0:s1]

        else:  # nothing looks: a query chunk's rows at a time, so memory grows linearly with S
            key_index = None

            def index_rows(s0: int, s1: int) -> torch.Tensor:
                return self._local_index(key_index_rows(s0, s1), check=False, **to_local)

        if cache is not None:
            cache.layers[self.layer] = AttentionState(**next_state)

        # a fresh tensor (repeat, not expand): an in-place hook edit must not write into attn_sink
        sink_logit = self.hook_sink_logit(self.attn_sink[None, :, None].repeat(b, 1, S))
        z = self._attend(q, keys, index_rows, sink_logit, key_index)  # [b,S,H,c]
        z = self.hook_z(apply_rope(z, positions, freqs, inverse=True))
        return self._project_out(z)

    def _local_index(self, key_index, *, n_raw: int, n_keys: int, first: int, N: int, check: bool) -> torch.Tensor:
        """key_index rows [b,s,K] in hook numbering (token p -> p, entry w -> N + w, -1 empty) -> rows
        of the keys [the raw tokens first..N-1, then the entries]. `check`: refuse candidates that do
        not exist (a hook edited the index)."""
        if check and (used := key_index[key_index >= 0]).numel():
            lo, hi = int(used.min()), int(used.max())
            if hi >= N + n_keys - n_raw or lo < first:
                bad = hi if hi >= N + n_keys - n_raw else lo
                raise ValueError(
                    f"{self.hook_key_index.name}: candidate {bad} does not exist here (tokens {first}..{N - 1} "
                    f"are held, {N}..{N + n_keys - n_raw - 1} are compressed entries, -1 empty)"
                )
        local = torch.where(key_index >= N, key_index - N + n_raw, key_index - first)
        return torch.where(key_index >= 0, local, -1)

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        index_rows: Callable[[int, int], torch.Tensor],
        sink_logit: torch.Tensor,
        key_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Softmax over each query's gathered candidates plus the sink logit; the sink column is dropped.

        q [b,S,H,c], keys [b,N,c] (raw tokens then compressed entries), index_rows(s0, s1): the
        candidates' rows in keys for queries s0..s1-1 [b,s,K] (-1 empty), sink_logit [b,H,S] ->
        z [b,S,H,c]. Work is done a query chunk at a time; when a hook
        wants the scores, pattern or sink mass, those are assembled whole ([b,h,p,K], still
        linear in S) and the hooks see (and may replace) the whole tensor.
        """
        b, S, H, c = q.shape
        spans = [(s0, min(S, s0 + self.cfg.attn_chunk_size)) for s0 in range(0, S, self.cfg.attn_chunk_size)]
        batch = torch.arange(b, device=q.device)[:, None, None]
        keys32 = keys.float()  # [b,N,c]: gathering from fp32 keys makes the candidates fp32 in one copy
        q32 = q.float() * c**-0.5  # scaling q (not the K-times larger scores) is the same logits up to rounding
        sink = sink_logit.transpose(1, 2)[..., None].float()  # [b,S,h,1]

        def candidates(s0: int, s1: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = index_rows(s0, s1)
            return keys32[batch, index.clamp(min=0)], index < 0  # [b,s,K,c], [b,s,K]

        def scores_of(s0: int, s1: int, cand: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
            # [b,s,h,K]: a plain batched GEMM; the hooks see TransformerLens's [b,h,s,K]
            scores = torch.matmul(q32[:, s0:s1], cand.transpose(-1, -2))
            return scores.masked_fill(empty[:, :, None], float("-inf"))

        def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)
            return probs[..., :-1], probs[..., -1]  # pattern [b,s,h,K], sink mass [b,s,h]

        if not any(is_hooked(h) for h in (self.hook_attn_scores, self.hook_pattern, self.hook_sink)):
            out = []
            for s0, s1 in spans:
                cand, empty = candidates(s0, s1)
                pattern, _ = softmax_with_sink(scores_of(s0, s1, cand, empty), sink[:, s0:s1])
                out.append(torch.matmul(pattern, cand).to(q.dtype))
            return torch.cat(out, dim=1)

        scores = None  # [b,S,h,K], filled a chunk at a time
        for s0, s1 in spans:
            chunk = scores_of(s0, s1, *candidates(s0, s1))
            scores = chunk.new_empty(b, S, *chunk.shape[2:]) if scores is None else scores
            scores[:, s0:s1] = chunk
        # the scores' and pattern's storages carry the key index (what each column is): a cache of them keeps it
        scores = self.hook_attn_scores(tag_candidates(scores.transpose(1, 2), key_index)).transpose(1, 2)
        pattern, sink_mass = tag_candidates(torch.empty_like(scores), key_index), q32.new_empty(b, S, H)
        for s0, s1 in spans:
            pattern[:, s0:s1], sink_mass[:, s0:s1] = softmax_with_sink(scores[:, s0:s1], sink[:, s0:s1])
        self.hook_sink(sink_mass.transpose(1, 2))
        pattern = self.hook_pattern(pattern.transpose(1, 2)).transpose(1, 2)
        out = [torch.matmul(pattern[:, s0:s1], candidates(s0, s1)[0]).to(q.dtype) for s0, s1 in spans]
        return torch.cat(out, dim=1)

    def _project_out(self, z: torch.Tensor) -> torch.Tensor:
        """Grouped output projection: group g's heads -> wo_a[g] (R_o) -> concat -> wo_b. [b,S,H,c] -> [b,S,D]."""
        if self.cfg.use_attn_result != hasattr(self, "hook_result"):  # cfg edited after the model was built
            raise RuntimeError(f"cfg.use_attn_result was set to {self.cfg.use_attn_result} after the model was built; "
                               f"switch it with model.set_use_attn_result({self.cfg.use_attn_result}), which adds "
                               "or removes the blocks.{l}.attn.hook_result hook points")  # fmt: skip
        if self.cfg.use_attn_result:
            return self.hook_result(self.head_results(z)).sum(dim=2)
        # a head's channels are consecutive within its group: wo_a[g] is a plain [R_o, H·c/G] view
        # (viewing it per head instead would make einsum copy wo_a on every call)
        G = self.cfg.o_groups
        z_grouped = rearrange(z, "b s (g j) c -> b s g (j c)", g=G)
        u = grouped_linear(z_grouped, self.wo_a.view(G, self.cfg.o_lora_rank, -1))
        return linear(rearrange(u, "b s g r -> b s (g r)"), self.wo_b)

    def head_results(self, z: torch.Tensor) -> torch.Tensor:
        """Each head's write into d, [b,S,H,c] -> [b,S,H,D]: exact, both projections are linear,
        so the heads sum to the attention output (up to the order of the additions)."""
        z, wo_a = self._grouped(z)
        u = einsum_in_model_dtype("bsgjc,grjc->bsgjr", z, wo_a)
        wo_b = rearrange(self.wo_b, "d (g r) -> d g r", g=self.cfg.o_groups)
        return rearrange(einsum_in_model_dtype("bsgjr,dgr->bsgjd", u, wo_b), "b s g j d -> b s (g j) d")

    def _grouped(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # group g = heads g·H/G .. (g+1)·H/G - 1, consecutive; wo_a's rows are group-major
        G, c = self.cfg.o_groups, self.cfg.head_dim
        wo_a = rearrange(self.wo_a, "(g r) (j c) -> g r j c", g=G, c=c)
        return rearrange(z, "b s (g j) c -> b s g j c", g=G), wo_a
