"""Hardware limits and the work a v4lens forward / decoding step must do, to put measured speeds in context.

Three measurements of this machine:

* `matmul_ceiling(dtype, device)`: FLOP/s of one large square GEMM (4096³) in that dtype, the
  best a dense matmul gets here (bf16 on a CPU without native bf16 products: the route v4lens
  takes there, bf16 operands upcast and multiplied in fp32; `bf16_route()` says which);
* `read_bandwidth(device)`: bytes/s of streaming through a ~1 GiB bf16 tensor (a `.sum()`,
  which reads every byte once and writes nothing of note);
* `gemv_rate(device)`: bytes/s of weight that a one-row bf16 product reads (the kernel a decoding
  step's projections run on, `v4lens.model.linear.linear`). Where that kernel is compute-bound (a
  CPU without native bf16 products widens every weight to fp32 first) it is below the bandwidth,
  and it is what a step can reach without a kernel of its own.

Two counts from a `V4Config` (no model is built):

* `forward_flops_per_token(cfg, seq_len)`: matmul FLOPs (2·m·n·k per GEMM) per token of a
  plain forward over `seq_len` tokens, averaged over the positions;
* `decode_bytes_per_step(cfg, context_len)`: the bytes one decoding step must read at least
  (the weights one token uses and the decoding cache it reads).

tokens/s ÷ (ceiling ÷ FLOPs per token) is then the fraction of the matmul ceiling a forward
reaches, and (bytes per step ÷ bandwidth) ÷ (seconds per step) the fraction of the memory
bound a decoding step reaches. Both counts are lower bounds of the work: elementwise work
(norms, rotary, SwiGLU, sigmoid, Sinkhorn), softmaxes, top-k, gathers and casts are left out,
as is work v4lens does on masked or padded candidates (it only counts what a query can see).
"""

from __future__ import annotations

import time

import torch

GEMM_SIZE = 4096  # m = n = k of the ceiling's GEMM: 137 GFLOP, big enough to reach the peak
READ_BYTES = 2**30  # the bandwidth probe's tensor (bf16)
GEMV_BYTES = 2**29  # the one-row product probe's bf16 weight: 512 MiB, far beyond any cache
GEMV_COLS = 4096


# ============================================================================ measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, device: torch.device, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls of fn(), after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _timed_alone(time_fn, device: torch.device, threads: int | None, *args) -> float:
    """Seconds of `time_fn(*args, device)` with torch's intra-op threads set to `threads` (restored
    afterwards); its tensors are freed when it returns, and on CUDA handed back to the driver."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return time_fn(*args, device)
    finally:
        torch.set_num_threads(before)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def matmul_ceiling(dtype, device="cpu", threads: int | None = None, size: int = GEMM_SIZE) -> float:
    """FLOP/s of a [size, size] x [size, size] GEMM in `dtype` (2·size³ FLOPs), best of 3 after a
    warm-up. `threads`: torch's intra-op threads for the measurement (restored afterwards)."""
    from v4lens.model.config import resolve_dtype

    dtype = resolve_dtype(dtype)
    return 2 * size**3 / _timed_alone(_time_gemm, torch.device(device), threads, size, dtype)


def bf16_route(device="cpu") -> str:
    """How bf16 products run on `device`: "bf16" (native kernels) or "fp32" (v4lens upcasts them:
    PyTorch's fallback on a CPU without native bf16 products is 6-270x slower; v4lens/model/linear.py)."""
    from v4lens.model.linear import native_bf16_products

    return "fp32" if torch.device(device).type == "cpu" and not native_bf16_products() else "bf16"


def _time_gemm(size: int, dtype: torch.dtype, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    if dtype == torch.bfloat16 and bf16_route(device) == "fp32":  # as v4lens multiplies them: in fp32, rounded once
        with torch.inference_mode():
            return _best_of(lambda: out.copy_(torch.mm(a.float(), b.float())), device)
    with torch.inference_mode():
        return _best_of(lambda: torch.mm(a, b, out=out), device)


def _time_sum(nbytes: int, device: torch.device) -> float:
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    with torch.inference_mode():
        return _best_of(lambda: x.sum(), device)


def read_bandwidth(device="cpu", threads: int | None = None, nbytes: int = READ_BYTES) -> float:
    """Bytes/s of reading memory: `.sum()` of a filled bf16 tensor of `nbytes` (each byte read once),
    best of 3 after a warm-up; the tensor is freed afterwards. (Filled, not `torch.empty`: untouched
    pages all map to the kernel's one zero page, which reads from cache.)"""
    nbytes -= nbytes % 2  # whole bf16 elements
    return nbytes / _timed_alone(_time_sum, torch.device(device), threads, nbytes)


def _time_gemv(rows: int, device: torch.device) -> float:
    from v4lens.model.linear import linear

    weight = torch.empty(rows, GEMV_COLS, dtype=torch.bfloat16, device=device).fill_(1.0)
    x = torch.ones(1, GEMV_COLS, dtype=torch.bfloat16, device=device)
    with torch.inference_mode():
        return _best_of(lambda: linear(x, weight), device)


def gemv_rate(device="cpu", threads: int | None = None, nbytes: int = GEMV_BYTES) -> float:
    """Bytes/s of weight read by one-row bf16 products: `v4lens.model.linear.linear` of x [1, 4096]
    with a filled bf16 weight of about `nbytes` ([nbytes / 8192, 4096]), best of 3 after a warm-up;
    the weight is freed afterwards."""
    rows = max(1, nbytes // (2 * GEMV_COLS))
    return 2 * rows * GEMV_COLS / _timed_alone(_time_gemv, torch.device(device), threads, rows)


# ============================================================================ counts
def _sum_visible(seq_len: int, ratio: int, cap: int | None = None) -> int:
    """Σ over positions t = 0..seq_len-1 of min(cap, ⌊(t+1)/ratio⌋): the compressed entries each
    query sees (an entry is visible from its window's last token on)."""
    if cap is None:
        q, r = divmod(seq_len, ratio)  # Σ_{j=1..S} ⌊j/m⌋ = m·q(q-1)/2 + q·(r+1)
        return ratio * q * (q - 1) // 2 + q * (r + 1)
    return sum(min(cap, j // ratio) for j in range(1, seq_len + 1))


def _compressor_flops(cfg, ratio: int, dim: int) -> int:
    """Per token: the compressor's two projections (values and gate logits), D -> width each
    (width = 2·dim on CSA, whose windows overlap, dim otherwise). The pooling is elementwise."""
    width = (2 if ratio == 4 else 1) * dim
    return 2 * 2 * width * cfg.d_model


def layer_flops(cfg, layer: int, seq_len: int) -> float:
    """Matmul FLOPs of one layer summed over a forward of `seq_len` tokens (one sequence).

    Counted per token: attention projections (wq_a, wq_b, wkv, grouped wo_a, wo_b); scores and
    P·V (2·H·c each) over the query's candidates: the window (min(W, t+1) tokens, itself
    included) and, on a CSA layer, the indexer's picks (min(index_topk, visible entries)), on an
    HCA layer every visible entry; the compressor's two projections; on CSA the Lightning
    Indexer (wq_b, weights_proj, its compressor, and the scoring of each visible entry: q·K per
    head, then the head-weighted sum); the two mHC (fn: (2+n)n x n·d, plus collapse and mix:
    (1+n) x n matrices times the n streams); the MoE router (d -> E) and k routed + 1 shared
    SwiGLU experts (3 GEMMs d x moe_inter_dim each).
    """
    D, H, c, S = cfg.d_model, cfg.n_heads, cfg.head_dim, seq_len
    R_q, R_o, G, W = cfg.q_lora_rank, cfg.o_lora_rank, cfg.o_groups, cfg.window_size
    n, E, k, I = cfg.hc_mult, cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    per_token = 2 * (D * R_q + R_q * H * c + D * c + R_o * H * c + G * R_o * D)  # attention projections
    window = W * (W - 1) // 2 + W * (S - W + 1) if S >= W else S * (S + 1) // 2  # Σ_t min(W, t+1)
    candidates = window
    ratio = cfg.compress_ratio(layer)
    if ratio:
        per_token += _compressor_flops(cfg, ratio, c)
    if cfg.layer_type(layer) == "csa":
        H_I, c_I = cfg.index_n_heads, cfg.index_head_dim
        candidates += _sum_visible(S, 4, cap=cfg.index_topk)
        per_token += 2 * (R_q * H_I * c_I + D * H_I) + _compressor_flops(cfg, 4, c_I)
        scoring = _sum_visible(S, 4) * 2 * (H_I * c_I + H_I)  # q·K per head, then Σ_h α_h·ReLU(.)
    elif ratio:
        candidates += _sum_visible(S, ratio)
    per_token += 2 * (2 * ((2 + n) * n * n * D + (1 + n) * n * D))  # attn_hc and mlp_hc
    per_token += 2 * D * E + (k + 1) * 3 * 2 * D * I  # router, routed + shared experts
    total = per_token * S + candidates * 2 * (2 * H * c)  # scores and P·V
    if cfg.layer_type(layer) == "csa":
        total += scoring
    return float(total)


def forward_flops_per_token(cfg, seq_len: int, logit_positions: int | None = None) -> float:
    """Matmul FLOPs per token of a plain forward over `seq_len` tokens, averaged over positions.

    Every layer as `layer_flops` counts it, then once per token hc_head (n x n·d, plus its
    collapse) and, for each of `logit_positions` positions (default: all, as `model(tokens)`
    returns), the head d_model x d_vocab. Not counted: the embedding (a lookup), the MTP or DSpark
    draft module (a plain forward does not run it), elementwise work and softmaxes, and work on
    masked candidates (v4lens scores every query against a full window and all entries of the
    chunk, masking the ones it cannot see: tests/test_roofline.py measures that part separately).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    D, n = cfg.d_model, cfg.hc_mult
    total = sum(layer_flops(cfg, layer, seq_len) for layer in range(cfg.n_layers))
    total += seq_len * 2 * (n * n * D + n * D)  # hc_head: fn, then the collapse
    total += (seq_len if logit_positions is None else logit_positions) * 2 * D * cfg.d_vocab
    return total / seq_len


def _compressor_weights(cfg, ratio: int, dim: int) -> int:
    """fp32 elements of one compressor: wkv and wgate [width, D], ape [ratio, width], norm [dim]."""
    width = (2 if ratio == 4 else 1) * dim
    return 2 * width * cfg.d_model + ratio * width + dim


def decode_weight_bytes(cfg, dtype_bytes: int = 2) -> int:
    """Bytes of the weights one decoded token reads: per layer the attention (with its compressor
    and, on CSA, the indexer), both mHC, both norms, the router (and on a hash layer the token's
    row of tid2eid, int64), the k activated + 1 shared experts (not the other routed ones); then
    hc_head, the final norm, the head and one embedding row. fp32 islands (mHC, norms, sinks,
    compressors, router bias) count 4 bytes, the rest `dtype_bytes`. The draft module is left out."""
    D, H, c, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_vocab
    R_q, R_o, G = cfg.q_lora_rank, cfg.o_lora_rank, cfg.o_groups
    n, E, k, I = cfg.hc_mult, cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    model = fp32 = other = 0
    for layer in range(cfg.n_layers):
        model += D * R_q + R_q * H * c + D * c + R_o * H * c + D * G * R_o  # wq_a, wq_b, wkv, wo_a, wo_b
        fp32 += R_q + c + H  # q_norm, kv_norm, attn_sink
        if ratio := cfg.compress_ratio(layer):
            fp32 += _compressor_weights(cfg, ratio, c)
        if cfg.layer_type(layer) == "csa":
            model += R_q * cfg.index_n_heads * cfg.index_head_dim + cfg.index_n_heads * D  # wq_b, weights_proj
            fp32 += _compressor_weights(cfg, 4, cfg.index_head_dim)
        fp32 += 2 * ((2 + n) * n * n * D + (2 + n) * n + 3) + 2 * D  # attn_hc, mlp_hc (fn, base, scale); ln1, ln2
        model += E * D + (k + 1) * 3 * D * I  # router, activated + shared experts
        if cfg.is_hash_layer(layer):
            other += k * 8  # the token's tid2eid row (int64)
        else:
            fp32 += E  # router bias
    fp32 += n * n * D + n + 1 + D  # hc_head (fn, base, scale), ln_final
    model += V * D + D  # head, the token's embedding row
    return model * dtype_bytes + fp32 * 4 + other


def decode_cache_bytes(cfg, context_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of the decoding cache (v4lens.model.kv_cache) a step at position `context_len` reads,
    one sequence: per layer the window's last min(W-1, context_len) key=value vectors; on an HCA
    layer every compressed entry so far, on a CSA layer only the min(index_topk, entries) picked
    ones plus every index key (all are scored); and each compressor's state: the fp32 projections
    (values and gate logits) of the unfinished window's tokens and, on CSA, the previous
    window's fp32 a-halves (values and logits)."""
    L, c, c_I = context_len, cfg.head_dim, cfg.index_head_dim

    def compressor_state(ratio: int, dim: int) -> int:
        width = (2 if ratio == 4 else 1) * dim
        pending = 2 * (L % ratio) * width * 4
        carry = 2 * ratio * dim * 4 if ratio == 4 and L >= ratio else 0
        return pending + carry

    total = 0
    for layer in range(cfg.n_layers):
        total += min(cfg.window_size - 1, L) * c * dtype_bytes
        ratio = cfg.compress_ratio(layer)
        if not ratio:
            continue
        T = L // ratio
        total += compressor_state(ratio, c)
        if cfg.layer_type(layer) == "csa":
            total += (min(cfg.index_topk, T) * c + T * c_I) * dtype_bytes + compressor_state(4, c_I)
        else:
            total += T * c * dtype_bytes
    return total


def decode_bytes_per_step(cfg, context_len: int, dtype_bytes: int = 2, batch: int = 1) -> float:
    """The bytes one decoding step (one new token per sequence, `context_len` tokens already in the
    cache) must read at least: `decode_weight_bytes` once plus `decode_cache_bytes` per sequence.
    The lower bound of a memory-bound step is this ÷ the read bandwidth. Not counted: activations
    (they stay in cache), the logits written, and any routed expert beyond the k a token uses
    (with batch > 1 the sequences may use more)."""
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    return float(decode_weight_bytes(cfg, dtype_bytes) + batch * decode_cache_bytes(cfg, context_len, dtype_bytes))
