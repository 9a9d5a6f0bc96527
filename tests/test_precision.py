"""bf16 with fp32 islands (SPEC decision 3): parameter dtypes, hook dtypes, fp32 math inside the
islands, closeness to the fp32 model, and `.to(torch.bfloat16)` == `load(dtype="bf16")`."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import v4lens

pytestmark = pytest.mark.usefixtures("single_thread")

ISLAND = re.compile(
    r"(\.w$|(attn_hc|mlp_hc|hc_head)\.(fn|base|scale)$|\.attn_sink$|compressor\.(wkv|wgate|ape)$|mlp\.gate\.bias$)"
)
EITHER = {"head.weight"}  # stored in the model dtype or fp32; the logits GEMM is fp32 either way (SPEC §C2)

FP32_HOOKS = re.compile(
    r"(_hc\.hook_(mixes|pre|post|comb)|hc_head\.hook_pre|attn\.compressor\.hook_weights|attn\.hook_attn_scores"
    r"|hook_sink_logit|hook_sink|hook_pattern|mlp\.hook_router_(logits|scores)|mlp\.hook_expert_weights|hook_logits)$"
)
INT_HOOKS = re.compile(r"(indexer\.hook_topk|attn\.hook_key_index|mlp\.hook_hash_ids|mlp\.hook_expert_ids)$")
BF16_HOOKS = re.compile(
    r"(^hook_embed|\.hook_embed|hook_streams_(pre|mid|post)|hook_hidden|_hc\.hook_out|hc_head\.hook_out"
    r"|ln1\.hook_normalized|ln2\.hook_normalized|ln_final\.hook_normalized|attn\.hook_q_latent|attn\.hook_q"
    r"|attn\.hook_kv|attn\.compressor\.hook_kv|attn\.hook_z|attn\.hook_result|hook_attn_out|hook_mlp_out"
    r"|mlp\.hook_shared_out|mlp\.hook_expert_out)$"
)


@pytest.fixture(scope="module")
def m16():
    return v4lens.load("tiny", dtype="bf16", d_vocab=256, seed=0, use_attn_result=True, use_expert_out=True)


@pytest.fixture(scope="module")
def m32():
    return v4lens.load("tiny", d_vocab=256, seed=0)


@pytest.fixture(scope="module")
def run16(m16, tokens_2x40):
    with torch.no_grad():
        (logits, mtp), cache = m16.run_with_cache(tokens_2x40, mtp=True)
    return logits, mtp[0], cache


def test_bf16_model_runs(m16, run16, tokens_2x40):
    logits, mtp, _ = run16
    assert m16.cfg.dtype == torch.bfloat16
    assert logits.dtype == mtp.dtype == torch.float32 and logits.shape == mtp.shape == (2, 40, 256)
    assert torch.isfinite(logits).all() and torch.isfinite(mtp).all()
    with torch.no_grad():
        loss = m16(tokens_2x40, return_type="loss")
    assert loss.dtype == torch.float32 and 0 < float(loss) < 20


def test_fp32_islands_and_bf16_matrices(m16):
    islands, matrices = [], []
    for name, p in m16.named_parameters():
        if name in EITHER:
            assert p.dtype in (torch.float32, torch.bfloat16)
        elif ISLAND.search(name):
            assert p.dtype == torch.float32, f"{name} should be an fp32 island, is {p.dtype}"
            islands.append(name)
        else:
            assert p.dtype == torch.bfloat16, f"{name} should be bf16, is {p.dtype}"
            matrices.append(name)
    # every kind of island and matrix is really present
    for pattern in (r"ln1\.w$", r"attn\.q_norm\.w$", r"compressor\.norm\.w$", r"blocks\.0\.attn_hc\.fn$",
                    r"mlp_hc\.scale$", r"^hc_head\.base$", r"mtp\.0\.hc_head\.fn$", r"attn_sink$",
                    r"indexer\.compressor\.wgate$", r"blocks\.2\.attn\.compressor\.ape$", r"blocks\.1\.mlp\.gate\.bias$"):  # fmt: skip
        assert any(re.search(pattern, n) for n in islands), pattern
    for pattern in (r"^embed\.weight$", r"attn\.wq_a$", r"attn\.wo_b$", r"attn\.wkv$", r"indexer\.wq_b$",
                    r"indexer\.weights_proj$", r"mlp\.gate\.weight$", r"experts\.w2$", r"shared_experts\.w1$",
                    r"mtp\.0\.e_proj$"):  # fmt: skip
        assert any(re.search(pattern, n) for n in matrices), pattern
    assert all(b.dtype == torch.long for n, b in m16.named_buffers() if n.endswith("tid2eid"))


def test_hook_dtypes_follow_decision_3(m16, run16):
    cache = run16[2]
    checked = {"fp32": 0, "int": 0, "bf16": 0}
    for name in cache.cache_dict:
        t = cache[name]
        if FP32_HOOKS.search(name):
            assert t.dtype == torch.float32, name
            checked["fp32"] += 1
        elif INT_HOOKS.search(name):
            assert t.dtype == torch.int64, name
            checked["int"] += 1
        elif BF16_HOOKS.search(name):
            assert t.dtype == torch.bfloat16, name
            checked["bf16"] += 1
    assert checked["fp32"] > 60 and checked["int"] > 10 and checked["bf16"] > 80, checked


def test_islands_compute_in_fp32(m16, run16):
    """The fp32 hooks hold fp32 math on the bf16 inputs, not bf16 math cast up afterwards."""
    cache, L = run16[2], 2
    p = f"blocks.{L}."
    blk = m16.blocks[L]
    # router: fp32 GEMM of the bf16 input with the upcast gate weight
    want = F.linear(cache[p + "ln2.hook_normalized"].float(), blk.mlp.gate.weight.float())
    torch.testing.assert_close(cache[p + "mlp.hook_router_logits"], want, atol=1e-6, rtol=1e-5)
    # mHC mixes: one RMS statistic over the flattened streams, fp32
    flat = cache[p + "hook_streams_pre"].float().flatten(-2)
    want = F.linear(flat, blk.attn_hc.fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + m16.cfg.norm_eps)
    torch.testing.assert_close(cache[p + "attn_hc.hook_mixes"], want, atol=1e-5, rtol=1e-5)
    # compressor pooling weights (HCA, m = 6): softmax over the window of fp32 gate logits + ape
    x = cache[p + "ln1.hook_normalized"].float()
    m, comp = 6, blk.attn.compressor
    logits = F.linear(x[:, : 40 // m * m], comp.wgate).view(2, 40 // m, m, -1) + comp.ape
    torch.testing.assert_close(cache[p + "attn.compressor.hook_weights"], logits.softmax(2), atol=1e-6, rtol=1e-5)
    # the logits head: fp32 GEMM
    head = m16.head.weight.float()
    torch.testing.assert_close(
        cache["hook_logits"], cache["ln_final.hook_normalized"].float() @ head.T, atol=1e-5, rtol=1e-5
    )


def test_stream_mixing_rounds_once(run16):
    """X' = post ⊗ f + combᵀ X in fp32 from bf16 inputs, one rounding to bf16 (SPEC §A2)."""
    cache = run16[2]
    for L in range(4):
        p = f"blocks.{L}."
        xin, f = cache[p + "hook_streams_pre"].float(), cache[p + "hook_attn_out"].float()
        post, comb = cache[p + "attn_hc.hook_post"], cache[p + "attn_hc.hook_comb"]
        want = (torch.einsum("bpjk,bpjd->bpkd", comb, xin) + post[..., None] * f[:, :, None]).bfloat16()
        got = cache[p + "hook_streams_mid"]
        assert got.dtype == torch.bfloat16
        # identical up to one bf16 ulp where fp32 summation order differs
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2**-7)
        assert (got == want).float().mean() > 0.97


def test_bf16_edits_flow_downstream(m16, tokens_2x40):
    p = "blocks.3."
    out = {}

    def save(x, hook):
        out[hook.name] = x

    with torch.no_grad():
        m16.run_with_hooks(tokens_2x40, fwd_hooks=[(p + "mlp.hook_expert_weights", lambda x, hook: torch.zeros_like(x)),
                                                   (p + "hook_mlp_out", save), (p + "mlp.hook_shared_out", save)])  # fmt: skip
    torch.testing.assert_close(out[p + "hook_mlp_out"], out[p + "mlp.hook_shared_out"], atol=0, rtol=0)


def test_bf16_logits_close_to_fp32(m16, m32, run16, tokens_2x40):
    l16, _, _ = run16
    with torch.no_grad():
        l32, c32 = m32.run_with_cache(tokens_2x40)
    err = (l16 - l32).norm() / l32.norm()
    assert err < 8e-2, float(err)
    top1 = (l16.argmax(-1) == l32.argmax(-1)).float().mean()
    assert top1 >= 0.9, float(top1)
    # with the fp32 run's discrete decisions (indexer picks, experts) pinned, only rounding is left
    pins = [n for n in c32.cache_dict if n.endswith(("indexer.hook_topk", "mlp.hook_expert_ids"))]
    assert len(pins) == 6
    hooks = [(n, lambda x, hook, v=c32[n]: v) for n in pins]
    with torch.no_grad():
        pinned = m16.run_with_hooks(tokens_2x40, fwd_hooks=hooks)
    rel_max = (pinned - l32).abs().max() / l32.abs().max()
    assert rel_max < 3e-2, float(rel_max)
    assert (pinned.argmax(-1) == l32.argmax(-1)).float().mean() >= 0.95
    assert not torch.equal(pinned, l32)  # it really ran in bf16


@pytest.mark.parametrize("how", ["to", "bfloat16"])
def test_to_bfloat16_keeps_islands_and_matches_load(m16, tokens_2x40, how):
    model = v4lens.load("tiny", d_vocab=256, seed=0, use_attn_result=True, use_expert_out=True)
    with torch.no_grad():
        l32 = model(tokens_2x40)
    model = model.to(torch.bfloat16) if how == "to" else model.bfloat16()
    assert model.cfg.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if ISLAND.search(name):
            assert p.dtype == torch.float32, name
    a, b = model.state_dict(), m16.state_dict()
    assert a.keys() == b.keys()
    mismatched = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]
    with torch.no_grad():
        assert torch.equal(model(tokens_2x40), m16(tokens_2x40))
    # and back: islands untouched, matrices fp32 again but holding the rounded values
    model = model.float()
    assert model.cfg.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.blocks[1].attn.wq_a, m16.blocks[1].attn.wq_a.float())
    with torch.no_grad():
        assert not torch.equal(model(tokens_2x40), l32)


def test_other_dtypes_are_refused(m32):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m32.half()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m32.to(torch.float16)
    assert m32.cfg.dtype == torch.float32 and m32.embed.weight.dtype == torch.float32
    with pytest.raises(ValueError):
        v4lens.load("tiny", d_vocab=256, dtype="fp16")


def test_bf16_head_gives_fp32_logits_of_the_bf16_values():
    """The bf16 model's head multiplies bf16-valued operands: its logits must be the fp32 GEMM's
    (to summation order), not a bf16-rounded product, and the oneDNN precision flag is restored."""
    from v4lens.model.head import fp32_logits

    before = torch.backends.mkldnn.matmul.fp32_precision
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, 256, generator=gen).bfloat16()
    weight = torch.randn(5000, 256, generator=gen).bfloat16()
    exact = torch.nn.functional.linear(h.double(), weight.double())
    # many positions, and one position (a decoding step), [d] and [1, 1, d]
    for rows, shape in ((slice(None), (64, 5000)), (slice(3, 4), (1, 5000)), (3, (5000,))):
        got = fp32_logits(h[rows], weight, chunk=1024)
        assert got.dtype == torch.float32 and got.shape == shape
        assert float((got.double() - exact[rows]).abs().max() / exact.abs().max()) < 1e-6  # bf16 output: ~4e-3
    one = fp32_logits(h[3].view(1, 1, -1), weight, chunk=1024)
    assert (
        one.shape == (1, 1, 5000) and float((one.double().view(-1) - exact[3]).abs().max() / exact.abs().max()) < 1e-6
    )
    # with autograd (attribution patching at one position): the gradient reaches h
    h1 = h[3].view(1, 1, -1).float().requires_grad_()
    fp32_logits(h1, weight, chunk=1024)[..., 7].sum().backward()
    torch.testing.assert_close(h1.grad.view(-1), weight[7].float())
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bf16_head_multiplies_in_bf16_only_for_several_positions(monkeypatch):
    """Several positions let oneDNN multiply the bf16-valued operands in bf16 (a GEMM twice as fast);
    one position (a decoding step) keeps the fp32 GEMV, which oneDNN's conversion would slow down."""
    from v4lens.model import head

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this build")
    seen = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        head.F, "linear", lambda x, w: seen.append(torch.backends.mkldnn.matmul.fp32_precision) or real_linear(x, w)
    )
    before = torch.backends.mkldnn.matmul.fp32_precision
    weight = torch.randn(300, 64).bfloat16()
    head.fp32_logits(torch.randn(1, 1, 64).bfloat16(), weight, chunk=128)
    assert seen == [before] * 3
    seen.clear()
    head.fp32_logits(torch.randn(1, 2, 64).bfloat16(), weight, chunk=128)
    assert seen == ["bf16"] * 3 and torch.backends.mkldnn.matmul.fp32_precision == before


def test_concurrent_bf16_heads_restore_the_precision_flag():
    """Two threads in the bf16 head at once: the second must not save the first's "bf16" as the value
    to restore (it would restore it after the first left, and every later fp32 product in the process
    would multiply in bf16). The spy forces that interleaving wherever the second can enter."""
    import threading
    import unittest.mock

    from v4lens.model.head import fp32_logits

    before = torch.backends.mkldnn.matmul.fp32_precision
    h = torch.randn(2, 64).bfloat16()  # two positions (one position skips the flag)
    weight = torch.randn(100, 64).bfloat16()  # one vocabulary slice
    first_inside, first_may_go, first_done = threading.Event(), threading.Event(), threading.Event()
    real_linear = torch.nn.functional.linear

    def spy_linear(x, w, *rest):
        if threading.current_thread().name == "first":
            first_inside.set()
            first_may_go.wait(timeout=0.5)  # until the second is inside too (or 0.5 s: it cannot enter)
        else:
            first_may_go.set()
            first_done.wait(timeout=5)  # the second leaves only after the first has restored the flag
        return real_linear(x, w, *rest)

    def first():
        fp32_logits(h, weight, chunk=128)
        first_done.set()

    def second():
        first_inside.wait(timeout=5)
        fp32_logits(h, weight, chunk=128)

    with unittest.mock.patch("v4lens.model.head.F.linear", spy_linear):
        threads = [threading.Thread(target=first, name="first"), threading.Thread(target=second, name="second")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_large_logits_first_release_the_heap(monkeypatch):
    """The head hands the heap's freed temporaries back before allocating logits that reach the mmap
    threshold in force (bf16 and fp32 tables, a CPU model's forward and the MTP head), and not for
    smaller ones (a decoding step); the logits are the same either way."""
    from types import SimpleNamespace

    from v4lens.model import allocator

    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: SimpleNamespace(malloc_trim=lambda pad: calls.append(pad) or 1))
    ten_positions = 10 * 256 * 4  # fp32 logits of ten positions of a 256-token vocabulary
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: (ten_positions, allocator.TRIM_THRESHOLD))
    for dtype in (torch.float32, torch.bfloat16):
        model = v4lens.load("tiny", d_vocab=256, seed=0, dtype=dtype)
        tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
        calls.clear()
        with torch.inference_mode():
            logits = model(tokens)
            assert calls == [0]
            model(tokens[:, :9])  # 9 positions: below the threshold
            assert len(calls) == 1
            model(tokens, mtp=True)
            assert len(calls) == 3  # the main head and the MTP head
        monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: (1 << 40, allocator.TRIM_THRESHOLD))
        with torch.inference_mode():
            assert torch.equal(model(tokens), logits)  # values unchanged, nothing released
        monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: (ten_positions, allocator.TRIM_THRESHOLD))
        assert len(calls) == 3
