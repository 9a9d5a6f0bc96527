"""Incremental decoding state: what a V4 layer must remember between chunks.

A forward over tokens t0..t1-1 with `past_kv_cache=cache` continues the sequence the cache has
seen (tokens 0..t0-1) and gives the same logits and hooked values as one forward over 0..t1-1
would at those positions. Per attention layer that needs:

* the shared key=value vectors of the last W-1 tokens (the sliding window of the next query);
* for a compressed layer, its compressor's state (`CompressorState`): the projections of the
  tokens of the unfinished window, and for CSA the previous window's a-halves (the overlap
  carry), plus every compressed entry emitted so far;
* for a CSA layer, the same for the Lightning Indexer's own compressor and its keys.

Nothing else in V4 looks back (mHC and the MoE are per token; hash routing reads the token).
The MTP block additionally needs the main model's final streams at the last position, because
its input at t is the token at t+1, which the next chunk brings. A DSpark model keeps its context
ring: the context vectors `main_x` of the last W main positions, from which every stage computes
its context keys when it drafts (holding main_x rather than each stage's keys: one ring for all
stages, and a drafting call fires the same hooks with or without a cache).

Every state object is immutable: a forward builds new ones and never writes into old tensors, so
`cache.snapshot()` is a cheap shallow copy and `cache.restore(snapshot)` undoes whole chunks
(speculative decoding uses this to drop a rejected draft). Unlike the reference's ring buffer
(fixed `max_seq_len`), nothing is preallocated: entries are appended per chunk.

A cache is bound to the model that filled it (`model_identity`: config + weights fingerprint,
recorded on the first chunk): a later chunk run by another model, or by the same model after an
in-place weight edit, would mix keys of two different networks and is refused.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from .fingerprint import identity_mismatch, model_identity


@dataclass(frozen=True)
class CompressorState:
    """One compressor between chunks. width = 2·dim for CSA (a- and b-halves), dim for HCA.

    pending_values / pending_logits [b, r, width] fp32: projections of the r < m tokens of the
    unfinished window (logits without the position bias `ape`, added when the window completes).
    carry_values / carry_logits [b, m, dim] fp32 (CSA only, None before the first complete window):
    the last complete window's a-halves, logits with `ape`, which the next entry pools.
    n_entries: entries emitted so far.
    """

    pending_values: torch.Tensor
    pending_logits: torch.Tensor
    carry_values: torch.Tensor | None = None
    carry_logits: torch.Tensor | None = None
    n_entries: int = 0


@dataclass(frozen=True)
class AttentionState:
    """One attention layer between chunks.

    window [b, ≤W-1, c]: key=value vectors of the most recent tokens (post-norm, post-RoPE).
    compressor / entries [b, T, c]: the KV compressor and the entries it emitted (compressed layers).
    indexer / index_keys [b, T, c_I]: the Lightning Indexer's compressor and keys (CSA layers).
    """

    window: torch.Tensor
    compressor: CompressorState | None = None
    entries: torch.Tensor | None = None
    indexer: CompressorState | None = None
    index_keys: torch.Tensor | None = None


class V4KVCache:
    """Decoding state of a whole model: pass it as `model(tokens, past_kv_cache=cache)` chunk after
    chunk (prefill, then one token at a time, or any split) and the logits and hooked values equal
    those of one forward over the concatenation.

    length: tokens seen so far (the next chunk starts at this position); batch: its batch size.
    layers: `AttentionState` per layer index (MTP blocks use n_layers + i).
    mtp_pending [b, 1, n, d]: the main model's final streams at the last position, which the MTP
    block processes once the next token is known.
    dspark_context [b, ≤W, D] (DSpark models): the context vectors main_x of the last W positions
    (positions length-L .. length-1), every chunk appends its own; a DSpark draft reads them.

    Hooks in a cached forward see the chunk's positions; compressor and indexer-key hooks
    ([b, T, ...]) see only the entries emitted in this chunk; `hook_key_index` numbers raw tokens
    by absolute position and entry w as N + w, N = tokens seen including this chunk (the sequence
    length, as in a full forward); scores/patterns have W + (entries visible so far) columns.

    >>> cache = V4KVCache()
    >>> logits = model(prompt_tokens, past_kv_cache=cache)           # prefill
    >>> logits = model(next_token[:, None], past_kv_cache=cache)     # one decoding step
    """

    def __init__(self):
        self.length = 0
        self.batch: int | None = None
        self.layers: dict[int, AttentionState] = {}
        self.mtp_pending: torch.Tensor | None = None
        self.dspark_context: torch.Tensor | None = None
        self.mtp_length = 0  # `length` when the MTP block last ran (it must run on every chunk)
        # how many of the current chunk's positions a layer may add to its state (None = all);
        # the MTP pass sets it to leave its draft position out
        self.commit: int | None = None
        # model_identity of the model that filled the cache (None while empty), and who this cache
        # is: snapshots share it (a shallow copy), another cache or a deepcopy has its own
        self.model_identity: dict | None = None
        self._owner = object()

    def snapshot(self) -> V4KVCache:
        """A copy sharing the (immutable) tensors: O(layers), no tensor is copied."""
        snap = copy.copy(self)
        snap.layers = dict(self.layers)
        return snap

    def restore(self, snapshot: V4KVCache) -> None:
        """Return to the state of `snapshot` (taken from this cache earlier by `snapshot()`)."""
        if not isinstance(snapshot, V4KVCache):
            raise TypeError(f"restore() takes what cache.snapshot() returned, got {type(snapshot).__name__}")
        if snapshot._owner is not self._owner:
            raise ValueError("restore(): this is a snapshot of another V4KVCache; restore only snapshots of this cache")
        self.model_identity = snapshot.model_identity
        self.length, self.batch, self.mtp_length = snapshot.length, snapshot.batch, snapshot.mtp_length
        self.mtp_pending, self.dspark_context = snapshot.mtp_pending, snapshot.dspark_context
        self.layers = dict(snapshot.layers)

    @contextlib.contextmanager
    def transaction(self):
        """All or nothing: a forward that raises (a hook's error, say) leaves the cache as it was."""
        before = self.snapshot()
        try:
            yield self
        except BaseException:
            self.restore(before)
            raise

    def start(self, tokens: torch.Tensor, model=None) -> torch.Tensor:
        """Check a chunk [b, S] and the `model` running it against the cache; return its absolute
        positions [S]. The first chunk binds the cache to `model`; a later chunk run by a model with
        another config or other weights is refused."""
        if model is not None:
            self._check_model(model)
        b, S = tokens.shape
        if self.batch is not None and b != self.batch:
            raise ValueError(f"past_kv_cache holds a batch of {self.batch} sequences; this chunk has {b}")
        self.batch = b
        return torch.arange(self.length, self.length + S, device=tokens.device)

    def _check_model(self, model) -> None:
        # model_identity is memoised per model on its weights' (data_ptr, _version): on the usual
        # path (the same model, weights untouched) this is one walk over the model's tensors, and the
        # sampled-content fingerprint is recomputed only when a weight was replaced or edited in place
        # (which makes the cached keys stale unless the values came back). A different model object
        # with identical config and weights (the same checkpoint loaded twice) is accepted.
        identity = model_identity(model)
        if self.length == 0 or self.model_identity is None:  # an empty cache: any model may start it
            self.model_identity = identity
            return
        if identity is self.model_identity:  # the usual step: the memoised identity of the model that filled it
            return
        problem = identity_mismatch(self.model_identity, model, identity)
        if problem is not None:
            raise ValueError(
                f"past_kv_cache was filled by another model ({problem}); its keys and compressor states "
                "belong to that model. Continue with the model that filled it, or start a new V4KVCache()"
            )

    def nbytes(self) -> int:
        """Memory the cached tensors take."""
        total = sum(t.nbytes for t in (self.mtp_pending, self.dspark_context) if t is not None)
        for state in self.layers.values():
            for t in _tensors(state):
                total += t.nbytes
        return total

    def __repr__(self) -> str:
        return f"V4KVCache(length={self.length}, batch={self.batch}, layers={len(self.layers)}, {self.nbytes() / 2**20:.1f} MiB)"


def push_context(ring: torch.Tensor | None, new: torch.Tensor, width: int) -> torch.Tensor:
    """The DSpark context ring after a chunk: the last `width` rows of ring [b,L,D] followed by new [b,S,D]
    (a new tensor: snapshots keep the old one)."""
    both = new if ring is None else torch.cat([ring, new], dim=1)
    return both if both.shape[1] <= width else both[:, -width:].clone()  # a copy: a view would keep all S rows


def append_entries(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """old [b,T,d] followed by new [b,T',d]; `old` itself when nothing is new (most decoding
    steps complete no window: no O(T) copy then)."""
    return old if new.shape[1] == 0 else torch.cat([old, new], dim=1)


def _tensors(obj):
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, CompressorState):
            yield from _tensors(value)
