"""Parity with transformers 5.23 `DeepseekV4ForCausalLM` on identical, fully randomised weights (fp32).

HF initialises sinks, position biases, router biases and tid2eid to zero; here every tensor
is random so each one is exercised. Components are compared through forward hooks on HF's
modules against v4lens's hook points; discrete decisions (expert ids, indexer picks) must be
identical.
"""

from __future__ import annotations

import math

import pytest
import torch

import v4lens
from v4lens.weights.hf import hf_model_like

CONFIGS = {
    # tiny preset: sliding, CSA, HCA(6), CSA; hc 4, window 8, top-k 3, o_groups 2, rope 8
    "tiny": dict(),
    # fewer streams, another HCA ratio, small window, top-k 2, 4 groups, rope 16, no YaRN
    "hc2-hca8": dict(
        hc_mult=2, compress_ratios=(4, 8, 0, 4), window_size=5, index_topk=2, o_groups=4, rope_head_dim=16,
        original_seq_len=0, n_hash_layers=2, swiglu_limit=0.5,
    ),
    # 3 streams, HCA ratio 12 and 4-token windows, wide window, top-k 5, one group, rope 4
    "hc3-hca12": dict(
        hc_mult=3, compress_ratios=(12, 4, 12, 0), window_size=16, index_topk=5, o_groups=1, rope_head_dim=4,
        n_heads=2, index_n_heads=3, n_routed_experts=6, n_activated_experts=3, hc_sinkhorn_iters=7,
    ),
}  # fmt: skip
LENGTH = 61  # 15 CSA entries > top-k, several closed HCA windows, a partial trailing window


def randomise(model: v4lens.HookedV4, seed: int = 0) -> None:
    """Every parameter random at a scale that keeps activations O(1); tid2eid random distinct experts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".w"):
                value = 1 + 0.2 * noise
            elif name.endswith(("hc.base", "hc_head.base", "attn_sink", ".ape")):
                value = noise
            elif name.endswith(".scale"):
                value = 0.5 + 0.3 * noise
            elif name.endswith(("hc.fn", "hc_head.fn")):
                value = noise * 4 / math.sqrt(p.shape[-1])
            elif name.endswith("gate.bias"):
                value = 0.3 * noise
            else:
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                rows = torch.rand(b.shape[0], model.cfg.n_routed_experts, generator=gen).argsort(-1)
                b.copy_(rows[:, : b.shape[1]])


def build_pair(name: str):
    model = v4lens.load("tiny", d_vocab=512, **CONFIGS[name])
    randomise(model)
    return model, hf_model_like(model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def capture_hf(hf, tokens):
    """Run HF with forward hooks on every component; returns {(layer, what): output}."""
    got, handles = {}, []

    def keep(key):
        return lambda module, args, out: got.__setitem__(key, out)

    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.attn_hc.register_forward_hook(keep((i, "attn_hc"))))
        handles.append(layer.ffn_hc.register_forward_hook(keep((i, "ffn_hc"))))
        handles.append(layer.self_attn.register_forward_hook(keep((i, "attn"))))
        handles.append(layer.mlp.register_forward_hook(keep((i, "mlp"))))
        handles.append(layer.mlp.gate.register_forward_hook(keep((i, "gate"))))
        comp = layer.self_attn.compressor
        if comp is not None:
            handles.append(comp.register_forward_hook(keep((i, "compressor"))))
            if hasattr(comp, "indexer"):
                handles.append(comp.indexer.register_forward_hook(keep((i, "indexer"))))
                handles.append(comp.indexer.scorer.register_forward_hook(keep((i, "scorer"))))
    handles.append(hf.model.hc_head.register_forward_hook(keep((None, "hc_head"))))
    try:
        with torch.no_grad():
            logits = hf(tokens, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair_run(request):
    torch.manual_seed(0)
    model, hf = build_pair(request.param)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, LENGTH))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    hf_logits, got = capture_hf(hf, tokens)
    return model, tokens, logits, cache, hf_logits, got


def test_logits_match_end_to_end(pair_run):
    model, tokens, logits, cache, hf_logits, got = pair_run
    assert logits.dtype == torch.float32 and logits.shape == hf_logits.shape
    assert rel(logits, hf_logits) <= 1e-5
    assert torch.equal(logits.argmax(-1), hf_logits.argmax(-1))


def test_mhc_matches(pair_run):
    model, tokens, logits, cache, hf_logits, got = pair_run
    for layer in range(model.cfg.n_layers):
        for ours, theirs in (("attn_hc", "attn_hc"), ("mlp_hc", "ffn_hc")):
            post, comb, collapsed = got[(layer, theirs)]
            assert rel(cache[f"blocks.{layer}.{ours}.hook_post"], post) <= 1e-5
            assert rel(cache[f"blocks.{layer}.{ours}.hook_comb"], comb) <= 1e-5
            assert rel(cache[f"blocks.{layer}.{ours}.hook_out"], collapsed) <= 1e-5
    assert rel(cache["hc_head.hook_out"], got[(None, "hc_head")]) <= 1e-5


def test_attention_compressor_and_indexer_match(pair_run):
    model, tokens, logits, cache, hf_logits, got = pair_run
    saw_selective = False
    for layer in range(model.cfg.n_layers):
        kind = model.cfg.layer_type(layer)
        assert rel(cache[f"blocks.{layer}.hook_attn_out"], got[(layer, "attn")][0]) <= 1e-5
        if kind == "sliding":
            continue
        entries = got[(layer, "compressor")][0][:, 0]  # [b,T,c]
        assert entries.shape[1] == LENGTH // model.cfg.compress_ratio(layer)
        assert rel(cache[f"blocks.{layer}.attn.compressor.hook_kv"], entries) <= 1e-5
        if kind != "csa":
            continue
        scores = cache[f"blocks.{layer}.attn.indexer.hook_scores"]
        hf_scores = got[(layer, "scorer")]
        visible = torch.isfinite(scores)
        assert rel(scores[visible], hf_scores[visible]) <= 1e-5
        ours = cache[f"blocks.{layer}.attn.indexer.hook_topk"].sort(-1).values
        theirs = got[(layer, "indexer")].sort(-1).values
        assert torch.equal(ours, theirs), f"layer {layer}: indexer picks differ"
        saw_selective |= bool((visible.sum(-1) > model.cfg.index_topk).any())
    assert saw_selective, "the test length must make the indexer choose among more entries than top-k"


def test_router_and_moe_match(pair_run):
    model, tokens, logits, cache, hf_logits, got = pair_run
    b, S = tokens.shape
    for layer in range(model.cfg.n_layers):
        hf_logits_r, hf_weights, hf_ids = got[(layer, "gate")]
        ours_logits = cache[f"blocks.{layer}.mlp.hook_router_logits"].reshape(b * S, -1)
        assert rel(ours_logits, hf_logits_r) <= 1e-5
        ids = cache[f"blocks.{layer}.mlp.hook_expert_ids"].reshape(b * S, -1)
        weights = cache[f"blocks.{layer}.mlp.hook_expert_weights"].reshape(b * S, -1)
        ours_sorted, order = ids.sort(-1)
        theirs_sorted, their_order = hf_ids.sort(-1)
        assert torch.equal(ours_sorted, theirs_sorted), f"layer {layer}: expert choices differ"
        assert rel(weights.gather(-1, order), hf_weights.gather(-1, their_order)) <= 1e-5
        assert rel(cache[f"blocks.{layer}.hook_mlp_out"], got[(layer, "mlp")]) <= 1e-5


def test_hash_layers_route_by_table(pair_run):
    model, tokens, logits, cache, hf_logits, got = pair_run
    for layer in range(model.cfg.n_hash_layers):
        table = model.blocks[layer].mlp.gate.tid2eid
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_expert_ids"], table[tokens])


def test_hf_cache_path_matches_too():
    """HF's default call builds a DynamicCache and takes its incremental-compressor path."""
    model, hf = build_pair("tiny")
    tokens = torch.randint(0, model.cfg.d_vocab, (1, LENGTH))
    with torch.no_grad():
        assert rel(model(tokens), hf(tokens).logits) <= 1e-5


def test_loads_what_transformers_saves(tmp_path):
    """`load(dir)` reads the layout `DeepseekV4ForCausalLM.save_pretrained` writes, sharded or not."""
    model, hf = build_pair("hc2-hca8")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 40))
    for shard in ("50KB", "10GB"):
        out = tmp_path / shard
        hf.save_pretrained(out, max_shard_size=shard)
        with pytest.warns(UserWarning, match="no mtp"):
            loaded = v4lens.load(out)
        assert loaded.cfg.n_mtp_layers == 0 and loaded.cfg.compress_ratios == model.cfg.compress_ratios[:4]
        with torch.no_grad():
            assert torch.equal(loaded(tokens), model(tokens))
    assert (tmp_path / "50KB" / "model.safetensors.index.json").exists()


@torch.no_grad()
def test_query_chunking_matches_transformers_and_the_unchunked_run():
    """Long inputs are processed in query chunks (attention and indexer): chunk boundaries must not matter."""
    model, hf = build_pair("tiny")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, LENGTH))
    with torch.no_grad():
        whole = model(tokens)
        model.cfg.attn_chunk_size = 7  # every attention and indexer reads it per call: 9 query chunks
        try:
            chunked = model(tokens)
            # hooked: scores/pattern/sink are assembled whole from chunks
            hooked, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_pattern" in n or "sink" in n)
        finally:
            model.cfg.attn_chunk_size = 256
        _, whole_cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_pattern" in n)
    assert rel(chunked, whole) <= 1e-6 and rel(hooked, whole) <= 1e-6
    assert rel(chunked, hf(tokens, use_cache=False).logits) <= 1e-5
    for name, pattern in whole_cache.cache_dict.items():
        assert rel(cache[name], pattern) <= 1e-6
        sink = cache[name.replace("hook_pattern", "hook_sink")]
        assert torch.allclose(cache[name].sum(-1) + sink, torch.ones_like(sink), atol=1e-6)
