"""The hook catalogue (docs/hooks.md): names, shapes, dtypes, invariants, and edits.

Every editable hook gets an edit whose downstream effect is checked against the math
(SPEC §A2 mHC, §A4 attention, §A5 compressor, §A6 indexer, §A8 MoE), not merely "it changed".
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import v4lens
from v4lens import HookedV4
from v4lens.model.rope import apply_rope

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------- the catalogue
TOP = ["hook_embed", "hc_head.hook_pre", "hc_head.hook_out", "ln_final.hook_normalized", "hook_logits"]
BLOCK = [
    "hook_streams_pre", "ln1.hook_normalized", "hook_attn_out", "hook_streams_mid",
    "ln2.hook_normalized", "hook_mlp_out", "hook_streams_post",
] + [f"{hc}.hook_{x}" for hc in ("attn_hc", "mlp_hc") for x in ("mixes", "pre", "post", "comb", "out")]  # fmt: skip
ATTN = [f"attn.hook_{x}" for x in ("q_latent", "q", "kv", "key_index", "attn_scores", "sink_logit", "sink",
                                    "pattern", "z")]  # fmt: skip
COMPRESSOR = ["attn.compressor.hook_weights", "attn.compressor.hook_kv"]
INDEXER = [f"attn.indexer.hook_{x}" for x in ("q", "kv", "head_weights", "scores", "topk")]
MLP = [f"mlp.hook_{x}" for x in ("router_logits", "router_scores", "expert_ids", "expert_weights", "shared_out")]
MTP_EXTRA = ["hook_embed", "hook_hidden", "hc_head.hook_pre", "hc_head.hook_out", "ln_final.hook_normalized",
             "hook_logits"]  # fmt: skip

FP32 = re.compile(
    r"(_hc\.hook_(mixes|pre|post|comb)|hc_head\.hook_pre|attn\.compressor\.hook_weights|attn\.hook_attn_scores"
    r"|hook_sink_logit|hook_sink|hook_pattern|mlp\.hook_router_(logits|scores)|mlp\.hook_expert_weights"
    r"|hook_logits)$"
)
INT64 = re.compile(r"(indexer\.hook_topk|attn\.hook_key_index|mlp\.hook_hash_ids|mlp\.hook_expert_ids)$")


def block_names(cfg, layer: int, prefix: str) -> tuple[list[str], list[str]]:
    """(names that must exist, name prefixes that must not) for block `layer` under `prefix`."""
    kind = cfg.layer_type(layer)
    names = BLOCK + ATTN + MLP
    absent = []
    if kind == "sliding":
        absent += ["attn.compressor.", "attn.indexer."]
    else:
        names = names + COMPRESSOR
    if kind == "csa":
        names = names + INDEXER
    elif kind == "hca":
        absent.append("attn.indexer.")
    if layer < cfg.n_layers and cfg.is_hash_layer(layer):
        names = names + ["mlp.hook_hash_ids"]
    else:
        absent.append("mlp.hook_hash_ids")
    if cfg.use_attn_result:
        names = names + ["attn.hook_result"]
    else:
        absent.append("attn.hook_result")
    if cfg.use_expert_out:
        names = names + ["mlp.hook_expert_out"]
    else:
        absent.append("mlp.hook_expert_out")
    return [f"{prefix}.{n}" for n in names], [f"{prefix}.{a}" for a in absent]


def catalogue(cfg) -> tuple[list[str], list[str]]:
    """Every catalogue name a model with `cfg` must expose, and prefixes it must not expose."""
    present, absent = list(TOP), []
    for layer in range(cfg.n_layers):
        p, a = block_names(cfg, layer, f"blocks.{layer}")
        present += p
        absent += a
    for i in range(cfg.n_mtp_layers):
        p, a = block_names(cfg, cfg.n_layers + i, f"mtp.{i}")
        present += p + [f"mtp.{i}.{n}" for n in MTP_EXTRA]
        absent += a
    absent += [f"blocks.{cfg.n_layers}.", f"mtp.{cfg.n_mtp_layers}."]
    return present, absent


def expected_shape(name: str, cfg, b: int, S: int) -> tuple[int, ...]:
    """The catalogue shape of hook `name` for a batch [b, S]."""
    D, n, H, c, E, k = cfg.d_model, cfg.hc_mult, cfg.n_heads, cfg.head_dim, cfg.n_routed_experts, cfg.n_activated_experts
    m = re.match(r"(blocks|mtp)\.(\d+)\.(.*)$", name)
    if m is None:  # top level
        return {"hook_embed": (b, S, D), "hc_head.hook_pre": (b, S, n), "hc_head.hook_out": (b, S, D),
                "ln_final.hook_normalized": (b, S, D), "hook_logits": (b, S, cfg.d_vocab)}[name]  # fmt: skip
    layer = int(m.group(2)) + (cfg.n_layers if m.group(1) == "mtp" else 0)
    suffix = m.group(3)
    kind, ratio = cfg.layer_type(layer), cfg.compress_ratio(layer)
    T = S // ratio if ratio else 0
    T_I = S // 4
    K = cfg.window_size + (min(cfg.index_topk, T_I) if kind == "csa" else T)
    slots = 2 * ratio if ratio == 4 else ratio
    table = {
        "hook_embed": (b, S, D), "hook_hidden": (b, S, n, D), "hook_logits": (b, S, cfg.d_vocab),
        "hc_head.hook_pre": (b, S, n), "hc_head.hook_out": (b, S, D), "ln_final.hook_normalized": (b, S, D),
        "hook_streams_pre": (b, S, n, D), "hook_streams_mid": (b, S, n, D), "hook_streams_post": (b, S, n, D),
        "ln1.hook_normalized": (b, S, D), "ln2.hook_normalized": (b, S, D),
        "hook_attn_out": (b, S, D), "hook_mlp_out": (b, S, D),
        "attn.hook_q_latent": (b, S, cfg.q_lora_rank), "attn.hook_q": (b, S, H, c), "attn.hook_kv": (b, S, c),
        "attn.compressor.hook_weights": (b, T, slots, c), "attn.compressor.hook_kv": (b, T, c),
        "attn.indexer.hook_q": (b, S, cfg.index_n_heads, cfg.index_head_dim),
        "attn.indexer.hook_kv": (b, T_I, cfg.index_head_dim),
        "attn.indexer.hook_head_weights": (b, S, cfg.index_n_heads), "attn.indexer.hook_scores": (b, S, T_I),
        "attn.indexer.hook_topk": (b, S, min(cfg.index_topk, T_I)),
        "attn.hook_key_index": (b, S, K), "attn.hook_attn_scores": (b, H, S, K), "attn.hook_sink_logit": (b, H, S),
        "attn.hook_sink": (b, H, S), "attn.hook_pattern": (b, H, S, K), "attn.hook_z": (b, S, H, c),
        "attn.hook_result": (b, S, H, D),
        "mlp.hook_router_logits": (b, S, E), "mlp.hook_router_scores": (b, S, E), "mlp.hook_hash_ids": (b, S, k),
        "mlp.hook_expert_ids": (b, S, k), "mlp.hook_expert_weights": (b, S, k), "mlp.hook_expert_out": (b, S, k, D),
        "mlp.hook_shared_out": (b, S, D),
    }  # fmt: skip
    for hc in ("attn_hc", "mlp_hc"):
        table.update({f"{hc}.hook_mixes": (b, S, (2 + n) * n), f"{hc}.hook_pre": (b, S, n),
                      f"{hc}.hook_post": (b, S, n), f"{hc}.hook_comb": (b, S, n, n), f"{hc}.hook_out": (b, S, D)})  # fmt: skip
    return table[suffix]


# ---------------------------------------------------------------------- helpers
def assert_no_hooks(model) -> None:
    left = [n for n, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
    assert not left, f"hooks left attached: {left[:5]}"


@pytest.fixture(autouse=True)
def _no_hooks_leak(tiny256):
    yield
    assert_no_hooks(tiny256)


def capture(model, tokens, names, fwd_hooks=(), **kwargs):
    """Run with the edit hooks `fwd_hooks`; return (output, {name: value after the edits}) for `names`."""
    store = {}

    def save(x, hook):
        store[hook.name] = x.detach().clone()

    with torch.no_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks) + [(n, save) for n in names], **kwargs)
    return out, store


def const(value):
    """A hook that replaces the activation by `value`."""
    return lambda x, hook: value.to(x.device)


@pytest.fixture(scope="module")
def clean(tiny256, tokens_2x40):
    with torch.no_grad():
        (logits, mtp_logits), cache = tiny256.run_with_cache(tokens_2x40, mtp=True)
    return logits, mtp_logits[0], cache


@pytest.fixture(scope="module")
def private():
    """A model of this module's own, for tests that could damage weights if the code regressed."""
    return v4lens.load("tiny", d_vocab=256, seed=0)


@pytest.fixture(scope="module")
def optin():
    """tiny256's weights with both opt-in hooks on (init is per parameter name, so weights agree)."""
    return v4lens.load("tiny", d_vocab=256, seed=0, use_attn_result=True, use_expert_out=True)


def swiglu_by_hand(x, w1, w2, w3, limit, weight=1.0):
    g = (w1 @ x).clamp(max=limit)
    u = (w3 @ x).clamp(min=-limit, max=limit)
    return w2 @ (F.silu(g) * u * weight)


def moe_by_hand(moe, x, ids, weights):
    """SPEC §A8 for one token x [D]: Σ_j w_j · expert_{ids_j}(x) + shared(x)."""
    L = moe.cfg.swiglu_limit
    ex, sh = moe.experts, moe.shared_experts
    out = swiglu_by_hand(x, sh.w1, sh.w2, sh.w3, L)
    for e, w in zip(ids.tolist(), weights):
        if e >= 0:
            out = out + swiglu_by_hand(x, ex.w1[e], ex.w2[e], ex.w3[e], L, w)
    return out


# ---------------------------------------------------------------------- names
def test_tiny_preset_layer_types_cover_every_kind(tiny256):
    cfg = tiny256.cfg
    assert cfg.layer_types() == ["sliding", "csa", "hca", "csa"]
    assert cfg.is_hash_layer(0) and not cfg.is_hash_layer(1) and cfg.n_mtp_layers == 1


@pytest.mark.parametrize("preset", ["tiny", "mini-3b", "flash"])
@pytest.mark.parametrize("optin_flags", [False, True])
def test_every_catalogue_name_exists_for_its_layer_type(preset, optin_flags):
    cfg = v4lens.preset(preset, use_attn_result=optin_flags, use_expert_out=optin_flags)
    with torch.device("meta"):  # names only: no weights are materialised
        model = HookedV4(cfg)
    present, absent = catalogue(cfg)
    missing = [n for n in present if n not in model.hook_dict]
    assert not missing, f"{preset}: catalogue names missing: {missing[:10]}"
    extra = [n for n in model.hook_dict for a in absent if n.startswith(a)]
    assert not extra, f"{preset}: hooks that must not exist: {extra[:10]}"
    # the residual streams are 4-D and must not pose as TransformerLens's [b, p, d] residual
    assert not [n for n in model.hook_dict if "resid" in n]
    # the loaded scaffold has the same names as the meta-built model
    if preset == "tiny":
        built = v4lens.load("tiny", d_vocab=256, use_attn_result=optin_flags, use_expert_out=optin_flags)
        assert set(built.hook_dict) == set(model.hook_dict)


def test_mini_3b_layer_kinds_get_the_right_hooks():
    """Spot checks against the mini-3b layout (SPEC decision 7) independent of the catalogue helper."""
    with torch.device("meta"):
        model = HookedV4(v4lens.preset("mini-3b"))
    d = model.hook_dict
    assert "blocks.0.attn.compressor.hook_kv" not in d and "blocks.1.mlp.hook_hash_ids" in d  # sliding, hash
    assert "blocks.2.mlp.hook_hash_ids" not in d
    assert "blocks.2.attn.indexer.hook_topk" in d and "blocks.2.attn.compressor.hook_weights" in d  # CSA
    assert "blocks.3.attn.compressor.hook_kv" in d and "blocks.3.attn.indexer.hook_topk" not in d  # HCA m=112
    assert "blocks.27.attn.compressor.hook_kv" not in d and "blocks.28.hook_attn_out" not in d
    assert "mtp.0.hook_logits" in d and "mtp.0.attn.compressor.hook_kv" not in d  # MTP block: sliding
    assert "mtp.0.mlp.hook_hash_ids" not in d and "mtp.1.hook_logits" not in d


# ---------------------------------------------------------------------- shapes and dtypes
def test_cached_shapes_and_dtypes_follow_the_catalogue(tiny256, tokens_2x40, clean, optin):
    b, S = tokens_2x40.shape
    for model, cache in [(tiny256, clean[2]), (optin, optin.run_with_cache(tokens_2x40, mtp=True)[1])]:
        present, _ = catalogue(model.cfg)
        not_cached = [n for n in present if n not in cache.cache_dict]
        assert not not_cached, f"catalogue hooks that did not fire: {not_cached[:10]}"
        for name in present:
            t = cache[name]
            assert tuple(t.shape) == expected_shape(name, model.cfg, b, S), name
            want = torch.float32 if FP32.search(name) else torch.int64 if INT64.search(name) else model.cfg.dtype
            assert t.dtype == want, f"{name}: {t.dtype} != {want}"


def test_short_input_has_empty_compressed_axes(tiny256):
    """S=3 < every compress ratio: T=0 entries, yet every hook fires with the documented shape."""
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        _, cache = tiny256.run_with_cache(tokens, mtp=True)
    for name in catalogue(tiny256.cfg)[0]:
        assert tuple(cache[name].shape) == expected_shape(name, tiny256.cfg, 1, 3), name
    assert cache["blocks.1.attn.compressor.hook_kv"].shape[1] == 0
    assert cache["blocks.1.attn.indexer.hook_topk"].shape[-1] == 0


# ---------------------------------------------------------------------- invariants
def test_mhc_invariants(tiny256, clean):
    cache = clean[2]
    cfg = tiny256.cfg
    n_blocks = [f"blocks.{i}" for i in range(cfg.n_layers)] + ["mtp.0"]
    for blk in n_blocks:
        for hc in ("attn_hc", "mlp_hc"):
            comb = cache[f"{blk}.{hc}.hook_comb"]
            assert (comb >= 0).all()
            torch.testing.assert_close(comb.sum(-2), torch.ones_like(comb.sum(-2)), atol=1e-5, rtol=0)  # columns
            torch.testing.assert_close(comb.sum(-1), torch.ones_like(comb.sum(-1)), atol=1e-3, rtol=0)  # rows
            pre, post = cache[f"{blk}.{hc}.hook_pre"], cache[f"{blk}.{hc}.hook_post"]
            assert (pre > 0).all() and (pre <= 1 + cfg.hc_eps).all()
            assert (post > 0).all() and (post < 2).all()
        # y = Σ_j pre_j X_j; X' = post ⊗ f + combᵀ X (contract comb's first index)
        x_pre, x_mid, x_post = (cache[f"{blk}.hook_streams_{w}"] for w in ("pre", "mid", "post"))
        for hc, xin, f, xout in (("attn_hc", x_pre, "hook_attn_out", x_mid), ("mlp_hc", x_mid, "hook_mlp_out", x_post)):
            pre, post, comb = (cache[f"{blk}.{hc}.hook_{w}"] for w in ("pre", "post", "comb"))
            torch.testing.assert_close(cache[f"{blk}.{hc}.hook_out"], torch.einsum("bpn,bpnd->bpd", pre, xin))
            want = torch.einsum("bpjk,bpjd->bpkd", comb, xin) + post[..., None] * cache[f"{blk}.{f}"][:, :, None]
            torch.testing.assert_close(xout, want, atol=1e-5, rtol=1e-5)
    # embedding copied into every stream; blocks chained
    assert torch.equal(cache["blocks.0.hook_streams_pre"], cache["hook_embed"][:, :, None].expand_as(cache["blocks.0.hook_streams_pre"]))
    for i in range(cfg.n_layers - 1):
        assert torch.equal(cache[f"blocks.{i}.hook_streams_post"], cache[f"blocks.{i + 1}.hook_streams_pre"])
    hc_pre = cache["hc_head.hook_pre"]
    assert (hc_pre > 0).all() and (hc_pre <= 1 + cfg.hc_eps).all()
    torch.testing.assert_close(
        cache["hc_head.hook_out"], torch.einsum("bpn,bpnd->bpd", hc_pre, cache[f"blocks.{cfg.n_layers - 1}.hook_streams_post"])
    )
    torch.testing.assert_close(cache["hook_logits"], cache["ln_final.hook_normalized"] @ tiny256.W_U)


def test_attention_invariants(tiny256, tokens_2x40, clean):
    cache, cfg = clean[2], tiny256.cfg
    b, S = tokens_2x40.shape
    W, t = cfg.window_size, torch.arange(S)
    window = t[:, None] - W + 1 + torch.arange(W)
    window = torch.where(window >= 0, window, -1)
    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn."
        ki, scores, pattern, sink = (cache[a + n] for n in ("hook_key_index", "hook_attn_scores", "hook_pattern", "hook_sink"))
        assert torch.equal(ki[..., :W], window.expand(b, S, W)), i
        empty = (ki < 0)[:, None].expand_as(scores)
        assert torch.isneginf(scores[empty]).all() and torch.isfinite(scores[~empty]).all()
        assert (pattern[empty] == 0).all() and (pattern >= 0).all()
        torch.testing.assert_close(pattern.sum(-1) + sink, torch.ones_like(sink), atol=1e-5, rtol=0)
        sink_logit = cache[a + "hook_sink_logit"]
        assert torch.equal(sink_logit, tiny256.blocks[i].attn.attn_sink.detach()[None, :, None].expand(b, -1, S))
        comp = ki[..., W:]
        kind, ratio = cfg.layer_type(i), cfg.compress_ratio(i)
        if kind == "sliding":
            assert comp.shape[-1] == 0
            continue
        visible = (t + 1) // ratio  # entries query t may see
        w = comp - S
        assert ((comp == -1) | ((comp >= S) & (w < visible[:, None]))).all(), i
        if kind == "hca":  # every visible entry, in order
            T = comp.shape[-1]
            want = torch.where(torch.arange(T) < visible[:, None], S + torch.arange(T), -1)
            assert torch.equal(comp, want.expand(b, S, T))
        else:  # CSA: exactly the indexer's picks
            topk = cache[a + "indexer.hook_topk"]
            assert torch.equal(comp, torch.where(topk >= 0, topk + S, -1))


def test_indexer_invariants(tiny256, clean):
    cache, cfg = clean[2], tiny256.cfg
    for i in (1, 3):
        a = f"blocks.{i}.attn.indexer."
        scores, topk = cache[a + "hook_scores"], cache[a + "hook_topk"]
        b, S, T = scores.shape
        k = topk.shape[-1]
        assert k == min(cfg.index_topk, T) == 3
        visible = (torch.arange(S) + 1) // 4
        invisible = torch.arange(T) >= visible[:, None]
        assert torch.equal(torch.isneginf(scores), invisible.expand(b, S, T))
        selective = False
        for bi in range(b):
            for ti in range(S):
                picks = topk[bi, ti]
                valid = picks[picks >= 0]
                v = int(visible[ti])
                assert len(valid) == min(k, v) and len(set(valid.tolist())) == len(valid)
                assert (valid < v).all()
                assert (picks[len(valid):] == -1).all()
                others = [w for w in range(v) if w not in valid.tolist()]
                if others:
                    selective = True
                    assert scores[bi, ti, valid].min() >= scores[bi, ti, others].max()
        assert selective  # with 40 tokens the top-3 really drops entries


def test_compressor_weights_are_a_softmax_over_slots(tiny256, clean):
    cache, cfg = clean[2], tiny256.cfg
    for i in (1, 2, 3):
        w = cache[f"blocks.{i}.attn.compressor.hook_weights"]
        torch.testing.assert_close(w.sum(2), torch.ones_like(w.sum(2)))
        if cfg.compress_ratio(i) == 4:  # CSA: entry 0 has no previous window
            assert (w[:, 0, :4] == 0).all() and (w[:, 1:, :4] > 0).all()


def test_moe_invariants(tiny256, tokens_2x40, clean):
    cache, cfg = clean[2], tiny256.cfg
    for i in range(cfg.n_layers):
        p = f"blocks.{i}.mlp."
        logits, scores, ids, weights = (cache[p + n] for n in ("hook_router_logits", "hook_router_scores",
                                                                 "hook_expert_ids", "hook_expert_weights"))  # fmt: skip
        torch.testing.assert_close(scores, F.softplus(logits).sqrt())
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.full(weights.shape[:-1], cfg.route_scale))
        chosen = scores.gather(-1, ids)
        torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale)
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
        if cfg.is_hash_layer(i):
            tid2eid = tiny256.blocks[i].mlp.gate.tid2eid
            assert torch.equal(ids, tid2eid[tokens_2x40]) and torch.equal(cache[p + "hook_hash_ids"], ids)
        else:  # top-k of score + bias (bias steers selection only)
            biased = scores + tiny256.blocks[i].mlp.gate.bias.detach()
            unchosen = biased.scatter(-1, ids, float("-inf"))
            assert (biased.gather(-1, ids).min(-1).values >= unchosen.max(-1).values).all()
        moe, x = tiny256.blocks[i].mlp, cache[f"blocks.{i}.ln2.hook_normalized"]
        for bi, ti in ((0, 0), (1, 33)):
            with torch.no_grad():
                want = moe_by_hand(moe, x[bi, ti], ids[bi, ti], weights[bi, ti])
            torch.testing.assert_close(cache[f"blocks.{i}.hook_mlp_out"][bi, ti], want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- every edit flows downstream
def _perturbation(name: str, cfg):
    suffix = name.split(".", 2)[-1] if name.startswith(("blocks.", "mtp.")) else name
    if suffix.endswith("hook_key_index"):
        W = cfg.window_size
        return lambda x, hook: torch.where(torch.arange(x.shape[-1]) == W - 1, x, -1)  # only the query itself
    if suffix.endswith("indexer.hook_topk"):
        return lambda x, hook: torch.full_like(x, -1)
    if suffix.endswith(("hook_hash_ids", "hook_expert_ids")):
        return lambda x, hook: (x + 1) % cfg.n_routed_experts
    if suffix.endswith(("indexer.hook_scores", "indexer.hook_head_weights")):  # only the ranking matters
        return lambda x, hook: torch.where(torch.isfinite(x), -x, x)
    return lambda x, hook: x * 1.5 + 0.25


def test_every_editable_hook_changes_the_output_and_hook_sink_does_not(tiny256, tokens_2x40, clean, optin):
    unchanged = []
    for model, (logits, mtp_logits) in [
        (tiny256, clean[:2]),
        (optin, (lambda r: (r[0], r[1][0]))(optin(tokens_2x40, mtp=True))),
    ]:
        names = catalogue(model.cfg)[0]
        if model is optin:
            names = [n for n in names if n.endswith(("hook_result", "hook_expert_out"))]
        for name in names:
            with torch.no_grad():
                out, mtp_out = model.run_with_hooks(tokens_2x40, fwd_hooks=[(name, _perturbation(name, model.cfg))], mtp=True)
            same = torch.equal(out, logits) and torch.equal(mtp_out[0], mtp_logits)
            if name.endswith("hook_sink"):
                assert same, f"{name} is observational, but editing it changed the output"
            elif same:
                unchanged.append(name)
    assert not unchanged, f"edits that did not change the output: {unchanged}"


def test_no_hooked_tensor_is_modified_in_place_afterwards(tiny256, tokens_2x40, optin):
    for model in (tiny256, optin):
        seen = {}

        def keep(x, hook):
            seen[hook.name] = (x, x.detach().clone())

        with torch.no_grad():
            model.run_with_hooks(tokens_2x40, fwd_hooks=[(lambda n: True, keep)], mtp=True)
        assert len(seen) == len(model.hook_dict)
        changed = [n for n, (x, copy) in seen.items() if not torch.equal(x, copy)]
        assert not changed, f"modified in place after their hook: {changed}"


def test_hooked_tensors_can_be_edited_in_place(tiny256, tokens_2x40, optin):
    """TransformerLens patch setters write into the activation in place (under no_grad they do not
    clone first), so no hooked tensor may be a broadcast view (stride 0) or share memory with a
    parameter or buffer (an in-place edit would then rewrite the weights)."""
    for model in (tiny256, optin):
        weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        overlapping, aliasing = [], []

        def check(x, hook):
            if any(st == 0 and sz > 1 for st, sz in zip(x.stride(), x.shape)):
                overlapping.append(hook.name)
            if x.numel() and x.untyped_storage().data_ptr() in weights:
                aliasing.append(hook.name)

        for tokens in (tokens_2x40, tokens_2x40[:1, :1]):
            with torch.no_grad():
                model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, check)], mtp=True)
        assert not overlapping, f"broadcast views at {sorted(set(overlapping))}"
        assert not aliasing, f"hooked tensors sharing memory with weights: {sorted(set(aliasing))}"


@pytest.mark.parametrize(
    "name", ["blocks.0.hook_streams_pre", "blocks.0.attn.hook_key_index", "blocks.2.attn.hook_sink_logit"]
)
@pytest.mark.parametrize("shape", [(2, 40), (1, 1)])
def test_in_place_edit_works_and_leaves_weights_alone(private, tokens_2x40, name, shape):
    """(1, 1): hook_sink_logit used to be attn_sink broadcast, so this edit rewrote attn_sink."""
    state = {k: v.clone() for k, v in private.state_dict().items()}

    def edit(x, hook):
        x[:, 0] = x[:, 0] * 0.5 + 1.0 if x.is_floating_point() else x[:, 0].clone()
        return x

    with torch.no_grad():
        private.run_with_hooks(tokens_2x40[: shape[0], : shape[1]], fwd_hooks=[(name, edit)])
    changed = [k for k, v in private.state_dict().items() if not torch.equal(v, state[k])]
    assert not changed, f"an in-place edit at {name} rewrote {changed}"


# ---------------------------------------------------------------------- edits, with the math
def test_edit_expert_ids_reroutes_as_computed_by_hand(tiny256, tokens_2x40, clean):
    cfg, cache, L = tiny256.cfg, clean[2], 2
    p = f"blocks.{L}."
    names = [p + "ln2.hook_normalized", p + "mlp.hook_router_scores", p + "mlp.hook_expert_ids",
             p + "mlp.hook_expert_weights", p + "hook_mlp_out"]  # fmt: skip
    new_ids = (cache[p + "mlp.hook_expert_ids"] + 3) % cfg.n_routed_experts
    _, ed = capture(tiny256, tokens_2x40, names, [(p + "mlp.hook_expert_ids", const(new_ids))])
    assert torch.equal(ed[p + "mlp.hook_expert_ids"], new_ids)
    assert torch.equal(ed[p + "ln2.hook_normalized"], cache[p + "ln2.hook_normalized"])  # upstream untouched
    s = ed[p + "mlp.hook_router_scores"].gather(-1, new_ids)  # weights follow the new experts' scores
    torch.testing.assert_close(ed[p + "mlp.hook_expert_weights"], s / s.sum(-1, keepdim=True) * cfg.route_scale)
    moe = tiny256.blocks[L].mlp
    for bi, ti in ((0, 5), (1, 39)):
        with torch.no_grad():
            want = moe_by_hand(moe, ed[p + "ln2.hook_normalized"][bi, ti], new_ids[bi, ti],
                               ed[p + "mlp.hook_expert_weights"][bi, ti])  # fmt: skip
        torch.testing.assert_close(ed[p + "hook_mlp_out"][bi, ti], want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(ed[p + "hook_mlp_out"][bi, ti], cache[p + "hook_mlp_out"][bi, ti], atol=1e-4)


def test_edit_expert_ids_to_empty_slot_drops_the_expert(tiny256, tokens_2x40, clean):
    cache, p = clean[2], "blocks.1."
    ids = cache[p + "mlp.hook_expert_ids"].clone()
    ids[..., 1] = -1
    _, ed = capture(tiny256, tokens_2x40, [p + "mlp.hook_expert_weights", p + "hook_mlp_out", p + "mlp.hook_shared_out"],
                    [(p + "mlp.hook_expert_ids", const(ids))])  # fmt: skip
    w = ed[p + "mlp.hook_expert_weights"]
    assert (w[..., 1] == 0).all()
    torch.testing.assert_close(w[..., 0], torch.full_like(w[..., 0], tiny256.cfg.route_scale))
    moe = tiny256.blocks[1].mlp
    x = cache[p + "ln2.hook_normalized"][1, 7]
    with torch.no_grad():
        want = moe_by_hand(moe, x, ids[1, 7], w[1, 7])
    torch.testing.assert_close(ed[p + "hook_mlp_out"][1, 7], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad, error", [(8, ValueError), (-2, ValueError), ("float", TypeError)])
def test_invalid_expert_id_edit_is_refused_with_the_hook_name(tiny256, tokens_2x40, bad, error):
    def edit(x, hook):
        return x.float() if bad == "float" else torch.full_like(x, bad)

    with pytest.raises(error, match=r"blocks\.2\.mlp\.hook_expert_ids"):
        tiny256.run_with_hooks(tokens_2x40, fwd_hooks=[("blocks.2.mlp.hook_expert_ids", edit)])


def test_edit_expert_weights_reweights_linearly(tiny256, tokens_2x40, clean):
    cache, p = clean[2], "blocks.3."
    names = [p + "hook_mlp_out", p + "mlp.hook_shared_out"]
    _, zero = capture(tiny256, tokens_2x40, names, [(p + "mlp.hook_expert_weights", lambda x, hook: torch.zeros_like(x))])
    torch.testing.assert_close(zero[p + "hook_mlp_out"], zero[p + "mlp.hook_shared_out"], atol=1e-7, rtol=0)
    _, double = capture(tiny256, tokens_2x40, names, [(p + "mlp.hook_expert_weights", lambda x, hook: 2 * x)])
    routed = cache[p + "hook_mlp_out"] - cache[p + "mlp.hook_shared_out"]
    assert routed.abs().max() > 1e-3
    torch.testing.assert_close(double[p + "hook_mlp_out"] - double[p + "mlp.hook_shared_out"], 2 * routed,
                               atol=1e-6, rtol=1e-4)  # fmt: skip


def test_edit_hash_ids_reroutes_the_hash_layer(tiny256, tokens_2x40, clean):
    cfg, cache, p = tiny256.cfg, clean[2], "blocks.0."
    new = (cache[p + "mlp.hook_hash_ids"] + 1) % cfg.n_routed_experts
    _, ed = capture(tiny256, tokens_2x40, [p + "mlp.hook_expert_ids", p + "mlp.hook_expert_weights", p + "hook_mlp_out"],
                    [(p + "mlp.hook_hash_ids", const(new))])  # fmt: skip
    assert torch.equal(ed[p + "mlp.hook_expert_ids"], new)
    s = cache[p + "mlp.hook_router_scores"].gather(-1, new)
    torch.testing.assert_close(ed[p + "mlp.hook_expert_weights"], s / s.sum(-1, keepdim=True) * cfg.route_scale)
    with torch.no_grad():
        want = moe_by_hand(tiny256.blocks[0].mlp, cache[p + "ln2.hook_normalized"][0, 11], new[0, 11],
                           ed[p + "mlp.hook_expert_weights"][0, 11])  # fmt: skip
    torch.testing.assert_close(ed[p + "hook_mlp_out"][0, 11], want, atol=1e-5, rtol=1e-4)


def test_edit_router_logits_and_scores_reselect(tiny256, tokens_2x40, clean):
    cfg, cache = tiny256.cfg, clean[2]
    logits = torch.full((2, 40, cfg.n_routed_experts), -5.0)
    logits[..., [5, 6]] = 5.0
    p = "blocks.2.mlp."
    _, ed = capture(tiny256, tokens_2x40, [p + "hook_router_scores", p + "hook_expert_ids", p + "hook_expert_weights"],
                    [(p + "hook_router_logits", const(logits))])  # fmt: skip
    torch.testing.assert_close(ed[p + "hook_router_scores"], F.softplus(logits).sqrt())
    assert torch.equal(ed[p + "hook_expert_ids"].sort(-1).values, torch.tensor([5, 6]).expand(2, 40, 2))
    torch.testing.assert_close(ed[p + "hook_expert_weights"], torch.full((2, 40, 2), cfg.route_scale / 2))
    # scores edit: selection and weights both read the edited scores
    scores = torch.ones(2, 40, cfg.n_routed_experts)
    scores[..., [1, 4]] = 3.0
    scores[..., 0] = 2.0  # third best: not selected with top-2
    _, ed = capture(tiny256, tokens_2x40, [p + "hook_expert_ids", p + "hook_expert_weights"],
                    [(p + "hook_router_scores", const(scores))])  # fmt: skip
    assert torch.equal(ed[p + "hook_expert_ids"].sort(-1).values, torch.tensor([1, 4]).expand(2, 40, 2))
    torch.testing.assert_close(ed[p + "hook_expert_weights"], torch.full((2, 40, 2), cfg.route_scale / 2))
    # on a hash layer the router only weights: ids stay tid2eid[token]
    q = "blocks.0.mlp."
    _, ed = capture(tiny256, tokens_2x40, [q + "hook_expert_ids", q + "hook_expert_weights"],
                    [(q + "hook_router_scores", const(scores))])  # fmt: skip
    ids = cache[q + "hook_expert_ids"]
    assert torch.equal(ed[q + "hook_expert_ids"], ids)
    s = scores.gather(-1, ids)
    torch.testing.assert_close(ed[q + "hook_expert_weights"], s / s.sum(-1, keepdim=True) * cfg.route_scale)


def test_edit_shared_out_is_added_to_the_routed_sum(tiny256, tokens_2x40, clean):
    cache, p = clean[2], "blocks.1."
    _, ed = capture(tiny256, tokens_2x40, [p + "hook_mlp_out"], [(p + "mlp.hook_shared_out", lambda x, hook: torch.zeros_like(x))])
    torch.testing.assert_close(ed[p + "hook_mlp_out"], cache[p + "hook_mlp_out"] - cache[p + "mlp.hook_shared_out"],
                               atol=1e-6, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("half", ["attn", "mlp"])
def test_edit_comb_and_post_rebuild_the_streams(tiny256, tokens_2x40, clean, half):
    """X'_k = post_k · f + Σ_j comb[j,k] X_j with the EDITED post and comb (comb's first index = input stream)."""
    n, L = tiny256.cfg.hc_mult, 1
    hc, f, xin, xout = {
        "attn": ("attn_hc", "hook_attn_out", "hook_streams_pre", "hook_streams_mid"),
        "mlp": ("mlp_hc", "hook_mlp_out", "hook_streams_mid", "hook_streams_post"),
    }[half]
    p = f"blocks.{L}."
    perm = torch.zeros(n, n)
    perm[torch.arange(n), (torch.arange(n) + 1) % n] = 1.0  # input j feeds output j+1
    post = torch.tensor([0.5, 1.0, 1.5, 2.0])
    edits = [(p + f"{hc}.hook_comb", const(perm.expand(2, 40, n, n))), (p + f"{hc}.hook_post", const(post.expand(2, 40, n)))]
    _, ed = capture(tiny256, tokens_2x40, [p + f, p + xin, p + xout], edits)
    assert torch.equal(ed[p + xin], clean[2][p + xin])
    assert torch.equal(ed[p + f], clean[2][p + f])  # this sub-layer's output does not depend on post/comb
    for k in range(n):
        want = post[k] * ed[p + f] + ed[p + xin][:, :, (k - 1) % n]
        torch.testing.assert_close(ed[p + xout][:, :, k], want, atol=1e-6, rtol=1e-6)
    # identity comb: the streams pass through, plus post ⊗ f
    _, ed = capture(tiny256, tokens_2x40, [p + f, p + xin, p + xout],
                    [(p + f"{hc}.hook_comb", const(torch.eye(n).expand(2, 40, n, n)))])  # fmt: skip
    post_clean = clean[2][p + f"{hc}.hook_post"]
    torch.testing.assert_close(ed[p + xout], ed[p + xin] + post_clean[..., None] * ed[p + f][:, :, None], atol=1e-6, rtol=1e-6)


def test_edit_pre_selects_the_collapsed_input(tiny256, tokens_2x40, clean):
    n = tiny256.cfg.hc_mult
    onehot = torch.zeros(2, 40, n)
    onehot[..., 2] = 1.0
    p = "blocks.2."
    _, ed = capture(tiny256, tokens_2x40, [p + "attn_hc.hook_out", p + "mlp_hc.hook_out", p + "hook_streams_pre", p + "hook_streams_mid"],
                    [(p + "attn_hc.hook_pre", const(onehot)), (p + "mlp_hc.hook_pre", const(onehot))])  # fmt: skip
    torch.testing.assert_close(ed[p + "attn_hc.hook_out"], ed[p + "hook_streams_pre"][:, :, 2], atol=0, rtol=0)
    torch.testing.assert_close(ed[p + "mlp_hc.hook_out"], ed[p + "hook_streams_mid"][:, :, 2], atol=0, rtol=0)
    # the final collapse too
    last = f"blocks.{tiny256.cfg.n_layers - 1}.hook_streams_post"
    _, ed = capture(tiny256, tokens_2x40, ["hc_head.hook_out", last], [("hc_head.hook_pre", const(onehot))])
    torch.testing.assert_close(ed["hc_head.hook_out"], ed[last][:, :, 2], atol=0, rtol=0)


def test_edit_mixes_feeds_pre_post_and_comb(tiny256, tokens_2x40):
    n, eps, p = tiny256.cfg.hc_mult, tiny256.cfg.hc_eps, "blocks.1.attn_hc."
    base = tiny256.blocks[1].attn_hc.base.detach()
    _, ed = capture(tiny256, tokens_2x40, [p + "hook_pre", p + "hook_post", p + "hook_comb"],
                    [(p + "hook_mixes", lambda x, hook: torch.zeros_like(x))])  # fmt: skip
    # with μ = 0 only the biases remain (SPEC §A2 step 5)
    torch.testing.assert_close(ed[p + "hook_pre"], (torch.sigmoid(base[:n]) + eps).expand(2, 40, n))
    torch.testing.assert_close(ed[p + "hook_post"], (2 * torch.sigmoid(base[n : 2 * n])).expand(2, 40, n))
    assert torch.allclose(base[2 * n :], torch.zeros(n * n))  # the seed's base is zero: comb is uniform
    torch.testing.assert_close(ed[p + "hook_comb"], torch.full((2, 40, n, n), 1.0 / n), atol=1e-5, rtol=0)


def test_edit_topk_reselects_compressed_candidates_causally(tiny256, tokens_2x40, clean):
    cfg, cache = tiny256.cfg, clean[2]
    W, S, L = cfg.window_size, 40, 1
    a = f"blocks.{L}.attn."
    names = [a + "hook_key_index", a + "hook_pattern", f"blocks.{L}.hook_attn_out"]
    # all -1: no compressed candidate is left
    _, ed = capture(tiny256, tokens_2x40, names, [(a + "indexer.hook_topk", lambda x, hook: torch.full_like(x, -1))])
    assert (ed[a + "hook_key_index"][..., W:] == -1).all()
    assert torch.equal(ed[a + "hook_key_index"][..., :W], cache[a + "hook_key_index"][..., :W])
    assert (ed[a + "hook_pattern"][..., W:] == 0).all()
    diff = (ed[f"blocks.{L}.hook_attn_out"] - cache[f"blocks.{L}.hook_attn_out"]).abs().amax(-1)
    assert (diff[:, :3] < 1e-6).all()  # nothing was visible before t=3 anyway
    assert (diff[:, 3:] > 1e-6).all()
    # pick entry 0 then entry T-1 (visible only from t = 4T-1 = 39 on): an edit cannot break causality
    T = S // 4
    pick = torch.tensor([0, T - 1, -1]).expand(2, S, 3)
    _, ed = capture(tiny256, tokens_2x40, names, [(a + "indexer.hook_topk", const(pick))])
    comp = ed[a + "hook_key_index"][..., W:]
    t = torch.arange(S)
    assert torch.equal(comp[..., 0], torch.where(t >= 3, S, -1).expand(2, S))
    assert torch.equal(comp[..., 1], torch.where(t >= 4 * T - 1, S + T - 1, -1).expand(2, S))
    assert (comp[..., 2] == -1).all()


def test_edit_indexer_scores_and_q_latent(tiny256, tokens_2x40):
    a = "blocks.3.attn."
    S, T = 40, 10
    rank = -torch.arange(T, dtype=torch.float32)  # prefer entry 0, then 1, ...

    def edit(x, hook):
        return torch.where(torch.isinf(x), x, rank.expand_as(x))

    _, ed = capture(tiny256, tokens_2x40, [a + "indexer.hook_topk"], [(a + "indexer.hook_scores", edit)])
    visible = (torch.arange(S) + 1) // 4
    want = torch.arange(3)[None, :].expand(S, 3)
    want = torch.where(want < visible[:, None], want, -1)
    assert torch.equal(ed[a + "indexer.hook_topk"], want.expand(2, S, 3))
    # q_latent feeds both the query (-> 0 after the per-head norm) and the indexer (-> scores 0)
    _, ed = capture(tiny256, tokens_2x40, [a + "hook_q", a + "indexer.hook_scores"],
                    [(a + "hook_q_latent", lambda x, hook: torch.zeros_like(x))])  # fmt: skip
    assert (ed[a + "hook_q"] == 0).all()
    sc = ed[a + "indexer.hook_scores"]
    assert (sc[torch.isfinite(sc)] == 0).all() and torch.isfinite(sc).any()


def test_edit_sink_logit_controls_the_sink(tiny256, tokens_2x40, clean):
    cache, L = clean[2], 2
    a = f"blocks.{L}.attn."
    names = [a + "hook_sink", a + "hook_pattern", f"blocks.{L}.hook_attn_out"]
    _, off = capture(tiny256, tokens_2x40, names, [(a + "hook_sink_logit", lambda x, hook: torch.full_like(x, float("-inf")))])
    assert (off[a + "hook_sink"] == 0).all()
    torch.testing.assert_close(off[a + "hook_pattern"].sum(-1), torch.ones(2, 4, 40), atol=1e-6, rtol=0)
    assert not torch.allclose(off[f"blocks.{L}.hook_attn_out"], cache[f"blocks.{L}.hook_attn_out"], atol=1e-5)
    _, full = capture(tiny256, tokens_2x40, names, [(a + "hook_sink_logit", lambda x, hook: torch.full_like(x, 1e4))])
    assert full[f"blocks.{L}.hook_attn_out"].abs().max() < 1e-6
    torch.testing.assert_close(full[a + "hook_sink"], torch.ones(2, 4, 40))
    # a finite shift rescales each row by one factor: p' (1 - sink) == p (1 - sink')
    _, shift = capture(tiny256, tokens_2x40, names, [(a + "hook_sink_logit", lambda x, hook: x + 1.0)])
    assert (shift[a + "hook_sink"] > cache[a + "hook_sink"]).all()
    torch.testing.assert_close(shift[a + "hook_pattern"] * (1 - cache[a + "hook_sink"])[..., None],
                               cache[a + "hook_pattern"] * (1 - shift[a + "hook_sink"])[..., None], atol=1e-7, rtol=1e-5)  # fmt: skip


def test_edit_pattern_and_key_index_select_values(tiny256, tokens_2x40):
    """All mass on the query's own token: z_h = inverse-RoPE(RoPE(kv_t)) = the pre-RoPE key (SPEC §A4)."""
    cfg, L = tiny256.cfg, 1
    W = cfg.window_size
    a = f"blocks.{L}.attn."

    def self_only(x, hook):
        out = torch.zeros_like(x)
        out[..., W - 1] = 1.0
        return out

    kvn = a + "kv_norm.hook_normalized"
    _, ed = capture(tiny256, tokens_2x40, [a + "hook_z", kvn], [(a + "hook_pattern", self_only)])
    torch.testing.assert_close(ed[a + "hook_z"], ed[kvn][:, :, None].expand_as(ed[a + "hook_z"]), atol=1e-5, rtol=1e-5)
    # key_index edit: only the query's own column survives; its weight is 1 - sink
    _, ed = capture(tiny256, tokens_2x40, [a + "hook_z", a + "hook_pattern", a + "hook_sink", kvn],
                    [(a + "hook_key_index", lambda x, hook: torch.where(torch.arange(x.shape[-1]) == W - 1, x, -1))])  # fmt: skip
    pat, sink = ed[a + "hook_pattern"], ed[a + "hook_sink"]
    assert (pat[..., : W - 1] == 0).all() and (pat[..., W:] == 0).all()
    torch.testing.assert_close(pat[..., W - 1], 1 - sink)
    want = (1 - sink).permute(0, 2, 1)[..., None] * ed[kvn][:, :, None]
    torch.testing.assert_close(ed[a + "hook_z"], want, atol=1e-5, rtol=1e-5)


def test_edit_attn_scores_renormalises_with_the_sink(tiny256, tokens_2x40, clean):
    cache, W, a = clean[2], tiny256.cfg.window_size, "blocks.3.attn."

    def self_only(x, hook):
        return torch.where(torch.arange(x.shape[-1]) == W - 1, x, float("-inf"))

    _, ed = capture(tiny256, tokens_2x40, [a + "hook_attn_scores", a + "hook_pattern", a + "hook_sink"],
                    [(a + "hook_attn_scores", self_only)])  # fmt: skip
    pat = ed[a + "hook_pattern"]
    assert (pat[..., : W - 1] == 0).all() and (pat[..., W:] == 0).all()
    want = torch.sigmoid(ed[a + "hook_attn_scores"][..., W - 1] - cache[a + "hook_sink_logit"])
    torch.testing.assert_close(pat[..., W - 1], want)
    torch.testing.assert_close(ed[a + "hook_sink"], 1 - want)


def test_edit_q_and_kv_give_uniform_attention(tiny256, tokens_2x40, clean):
    cache = clean[2]
    # q = 0 on the HCA layer: every valid candidate (window + visible entries) scores 0
    a = "blocks.2.attn."
    _, ed = capture(tiny256, tokens_2x40, [a + "hook_attn_scores", a + "hook_pattern"],
                    [(a + "hook_q", lambda x, hook: torch.zeros_like(x))])  # fmt: skip
    valid = (cache[a + "hook_key_index"] >= 0)[:, None].expand_as(ed[a + "hook_pattern"])
    assert (ed[a + "hook_attn_scores"][valid] == 0).all()
    n_valid = valid.sum(-1, keepdim=True).float()
    sink = cache[a + "hook_sink_logit"][..., None].exp()
    torch.testing.assert_close(ed[a + "hook_pattern"], torch.where(valid, 1 / (n_valid + sink), 0.0))
    # kv = 0 on the sliding layer: scores 0, uniform pattern, and zero values -> zero output
    a = "blocks.0.attn."
    _, ed = capture(tiny256, tokens_2x40, [a + "hook_pattern", "blocks.0.hook_attn_out"],
                    [(a + "hook_kv", lambda x, hook: torch.zeros_like(x))])  # fmt: skip
    valid = (cache[a + "hook_key_index"] >= 0)[:, None].expand_as(ed[a + "hook_pattern"])
    n_valid = valid.sum(-1, keepdim=True).float()
    sink = cache[a + "hook_sink_logit"][..., None].exp()
    torch.testing.assert_close(ed[a + "hook_pattern"], torch.where(valid, 1 / (n_valid + sink), 0.0))
    assert (ed["blocks.0.hook_attn_out"] == 0).all()


def test_edit_z_is_linear_into_attn_out(tiny256, tokens_2x40, clean):
    cache, L = clean[2], 3
    out = f"blocks.{L}.hook_attn_out"
    _, zero = capture(tiny256, tokens_2x40, [out], [(f"blocks.{L}.attn.hook_z", lambda x, hook: torch.zeros_like(x))])
    assert (zero[out] == 0).all()
    _, double = capture(tiny256, tokens_2x40, [out], [(f"blocks.{L}.attn.hook_z", lambda x, hook: 2 * x)])
    torch.testing.assert_close(double[out], 2 * cache[out], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("L, slot", [(2, 0), (1, 4), (1, 0)])
def test_edit_compressor_weights_pool_the_chosen_slot(tiny256, tokens_2x40, L, slot):
    """One-hot pooling weights: entry w = RoPE(norm(wkv · x[token of that slot]), position w·m) (SPEC §A5)."""
    cfg = tiny256.cfg
    attn = tiny256.blocks[L].attn
    comp = attn.compressor
    m, c = cfg.compress_ratio(L), cfg.head_dim
    a = f"blocks.{L}.attn."

    def onehot(x, hook):
        out = torch.zeros_like(x)
        out[:, :, slot] = 1.0
        return out

    _, ed = capture(tiny256, tokens_2x40, [a + "compressor.hook_kv", f"blocks.{L}.ln1.hook_normalized"],
                    [(a + "compressor.hook_weights", onehot)])  # fmt: skip
    x = ed[f"blocks.{L}.ln1.hook_normalized"]
    T = 40 // m
    w = torch.arange(T)
    with torch.no_grad():
        if m != 4:  # HCA: slot i = token w·m + i
            pooled = x[:, w * m + slot] @ comp.wkv[:c].T
        elif slot >= m:  # CSA b-half of this window's token
            pooled = x[:, w * m + slot - m] @ comp.wkv[c:].T
        else:  # CSA a-half of the previous window's token; entry 0 has none
            pooled = x[:, (w - 1).clamp(min=0) * m + slot] @ comp.wkv[:c].T
            pooled[:, 0] = 0
        normed = comp.norm.w * pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + cfg.norm_eps)
        want = apply_rope(normed, w * m, attn.freqs(x.device))
    torch.testing.assert_close(ed[a + "compressor.hook_kv"], want, atol=1e-5, rtol=1e-5)


def test_edit_embed_and_streams(tiny256, tokens_2x40, clean):
    cache = clean[2]
    _, ed = capture(tiny256, tokens_2x40, ["blocks.0.hook_streams_pre"], [("hook_embed", lambda x, hook: 2 * x)])
    torch.testing.assert_close(ed["blocks.0.hook_streams_pre"], 2 * cache["blocks.0.hook_streams_pre"])
    # streams_post of one block is exactly what the next block receives
    _, ed = capture(tiny256, tokens_2x40, ["blocks.2.hook_streams_pre"], [("blocks.1.hook_streams_post", lambda x, hook: -x)])
    assert torch.equal(ed["blocks.2.hook_streams_pre"], -cache["blocks.1.hook_streams_post"])


def test_attn_result_decomposes_attn_out_per_head(tiny256, tokens_2x40, clean, optin):
    logits, cache = clean[0], clean[2]
    with torch.no_grad():
        out, oc = optin.run_with_cache(tokens_2x40)
    torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)  # same weights, same math
    for L in range(optin.cfg.n_layers):
        torch.testing.assert_close(oc[f"blocks.{L}.attn.hook_result"].sum(2), oc[f"blocks.{L}.hook_attn_out"], atol=1e-5, rtol=1e-5)
    # zeroing head 1's result == zeroing head 1's z
    L, h = 1, 1

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, h] = 0
        return x

    _, by_result = capture(optin, tokens_2x40, [f"blocks.{L}.hook_attn_out"], [(f"blocks.{L}.attn.hook_result", zero_head)])
    _, by_z = capture(tiny256, tokens_2x40, [f"blocks.{L}.hook_attn_out"], [(f"blocks.{L}.attn.hook_z", zero_head)])
    torch.testing.assert_close(by_result[f"blocks.{L}.hook_attn_out"], by_z[f"blocks.{L}.hook_attn_out"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(by_result[f"blocks.{L}.hook_attn_out"],
                               cache[f"blocks.{L}.hook_attn_out"] - oc[f"blocks.{L}.attn.hook_result"][:, :, h],
                               atol=1e-6, rtol=1e-5)  # fmt: skip


def test_expert_out_holds_the_weighted_slots(tiny256, tokens_2x40, optin):
    with torch.no_grad():
        _, oc = optin.run_with_cache(tokens_2x40)
    L = 2
    p = f"blocks.{L}."
    slots = oc[p + "mlp.hook_expert_out"]
    torch.testing.assert_close(slots.sum(2) + oc[p + "mlp.hook_shared_out"], oc[p + "hook_mlp_out"], atol=1e-6, rtol=1e-5)
    moe = optin.blocks[L].mlp
    x, ids, w = oc[p + "ln2.hook_normalized"][0, 9], oc[p + "mlp.hook_expert_ids"][0, 9], oc[p + "mlp.hook_expert_weights"][0, 9]
    with torch.no_grad():
        for j in range(ids.shape[0]):
            e = int(ids[j])
            want = swiglu_by_hand(x, moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e], moe.cfg.swiglu_limit, w[j])
            torch.testing.assert_close(slots[0, 9, j], want, atol=1e-6, rtol=1e-4)
    _, ed = capture(optin, tokens_2x40, [p + "hook_mlp_out", p + "mlp.hook_shared_out"],
                    [(p + "mlp.hook_expert_out", lambda x, hook: torch.zeros_like(x))])  # fmt: skip
    torch.testing.assert_close(ed[p + "hook_mlp_out"], ed[p + "mlp.hook_shared_out"], atol=0, rtol=0)


def test_mtp_hooks_and_edits(tiny256, tokens_2x40, clean):
    cache = clean[2]
    n = tiny256.cfg.hc_mult
    # the MTP block sees the main model's final streams
    assert tuple(cache["mtp.0.hook_hidden"].shape) == tuple(cache["blocks.3.hook_streams_post"].shape)
    assert cache["mtp.0.hook_streams_pre"].shape[2] == n
    torch.testing.assert_close(cache["mtp.0.hook_logits"], clean[1])
    # editing an MTP hook changes the MTP logits only
    with torch.no_grad():
        logits, mtp = tiny256.run_with_hooks(tokens_2x40, mtp=True, fwd_hooks=[("mtp.0.hook_embed", lambda x, hook: 0 * x)])
    assert torch.equal(logits, clean[0]) and not torch.allclose(mtp[0], clean[1])


# ---------------------------------------------------------------------- hook machinery
def test_raising_hook_propagates_and_leaves_no_hook(tiny256, tokens_2x40, clean):
    calls = []

    def fine(x, hook):
        calls.append(hook.name)

    def boom(x, hook):
        raise RuntimeError("boom from a hook")

    with pytest.raises(RuntimeError, match="boom from a hook"):
        tiny256.run_with_hooks(tokens_2x40, fwd_hooks=[("hook_embed", fine), ("blocks.2.attn.hook_pattern", boom)])
    assert calls == ["hook_embed"]
    assert_no_hooks(tiny256)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny256.hooks(fwd_hooks=[("blocks.1.mlp.hook_expert_ids", boom)]):
            tiny256(tokens_2x40)
    assert_no_hooks(tiny256)
    with torch.no_grad():
        assert torch.equal(tiny256(tokens_2x40), clean[0])


@pytest.mark.parametrize(
    "bad",
    [
        "blocks.0.attn.hook_nope",
        "blocks.4.hook_attn_out",  # past the last layer
        "blocks.0.hook_resid_pre",  # the 4-D residual is not called resid
        "blocks.0.attn.compressor.hook_kv",  # sliding layer: no compressor
        "blocks.2.attn.indexer.hook_topk",  # HCA layer: no indexer
        "blocks.1.mlp.hook_hash_ids",  # not a hash layer
        "blocks.1.attn.hook_result",  # opt-in, off
        "mtp.0.mlp.hook_hash_ids",
    ],
)
def test_unknown_hook_name_raises_before_anything_is_attached(tiny256, tokens_2x40, bad):
    calls = []

    def fine(x, hook):
        calls.append(hook.name)

    with pytest.raises(KeyError, match=re.escape(bad)):
        tiny256.run_with_hooks(tokens_2x40, fwd_hooks=[("hook_embed", fine), (bad, fine)])
    assert not calls
    assert_no_hooks(tiny256)
    with pytest.raises(KeyError, match=re.escape(bad)):
        tiny256.run_with_hooks(tokens_2x40, fwd_hooks=[("hook_embed", fine)], bwd_hooks=[(bad, fine)])
    assert_no_hooks(tiny256)
    with pytest.raises(KeyError, match=re.escape(bad)):
        tiny256.add_hook(bad, fine)
    assert_no_hooks(tiny256)
    assert not calls


def test_add_hook_with_a_name_filter_and_reset(tiny256, tokens_2x40):
    seen = []
    tiny256.add_hook(lambda name: name.endswith("hook_attn_out"), lambda x, hook: seen.append(hook.name))
    try:
        with torch.no_grad():
            tiny256(tokens_2x40, mtp=True)
    finally:
        tiny256.reset_hooks()
    assert seen == [f"blocks.{i}.hook_attn_out" for i in range(4)] + ["mtp.0.hook_attn_out"]


BWD_NAMES = ["hook_embed", "blocks.1.hook_attn_out", "blocks.2.hook_streams_mid", "blocks.1.attn_hc.hook_comb",
             "blocks.3.mlp.hook_expert_weights", "blocks.2.attn.hook_pattern", "blocks.1.attn.compressor.hook_kv"]  # fmt: skip


def test_backward_hooks_see_the_gradient(tiny256, tokens_2x40):
    tokens = tokens_2x40[:, :24]
    grads = {}

    def save_grad(g, hook):
        grads[hook.name] = g.detach().clone()

    try:
        loss = tiny256.run_with_hooks(tokens, return_type="loss", bwd_hooks=[(n, save_grad) for n in BWD_NAMES],
                                      reset_hooks_end=False)  # fmt: skip
        loss.backward()
    finally:
        tiny256.reset_hooks()
        tiny256.zero_grad(set_to_none=True)
    # the same gradients, by autograd on the activations captured in a second forward
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x

    loss2 = tiny256.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(n, keep) for n in BWD_NAMES])
    wants = torch.autograd.grad(loss2, [acts[n] for n in BWD_NAMES])
    assert sorted(grads) == sorted(BWD_NAMES)
    for name, want in zip(BWD_NAMES, wants):
        assert grads[name].shape == acts[name].shape, name
        assert want.abs().max() > 0, name
        torch.testing.assert_close(grads[name], want, atol=1e-8, rtol=1e-5, msg=name)
