"""TransformerLens's HookedTransformer methods on HookedV4 (v4lens/model/tl_compat.py), the optional hooks
switched after load, and run_with_cache's names_filter warnings and per-row pos_slice.

Each V4 answer is checked against the forward's own tensors (hooks), not against the formula that made it;
each name V4 lacks must fail with a pointer to what to use (issue: no silent traps from inherited methods).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

import v4lens
from v4lens import HookedV4
from v4lens.analysis.caching import run_with_cache

pytestmark = pytest.mark.usefixtures("single_thread")


def fresh(**overrides) -> HookedV4:
    """A tiny model of our own (tiny256 is shared and read-only; these tests change modules or weights)."""
    return v4lens.load("tiny", d_vocab=256, seed=0, **overrides)


# ---------------------------------------------------------------------- weights with a V4 meaning
def test_W_O_maps_each_heads_z_into_the_attention_output(tiny256, tokens_2x40):
    cfg = tiny256.cfg
    names = [f"blocks.{l}.{h}" for l in range(cfg.n_layers) for h in ("attn.hook_z", "hook_attn_out")]
    _, cache = tiny256.run_with_cache(tokens_2x40, names_filter=names, return_type=None)
    W_O = tiny256.W_O
    assert W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model)
    for l in range(cfg.n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"]  # [b, p, h, c]
        summed = torch.einsum("bphc,hcd->bpd", z, W_O[l])
        torch.testing.assert_close(summed, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=1e-4)


def test_tokens_to_residual_directions_reproduce_the_logits(tiny256, tokens_2x40):
    """logit[t] = (x / rms(x)) · direction(t) for x = hc_head.hook_out, the pre-norm vector the head reads."""
    logits, cache = tiny256.run_with_cache(tokens_2x40, names_filter=["hc_head.hook_out"])
    x = cache["hc_head.hook_out"].float()  # [b, p, d]
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + tiny256.cfg.norm_eps)
    targets = tokens_2x40.roll(-1, dims=1)  # any ids [b, p]: directions come back [b, p, d]
    directions = tiny256.tokens_to_residual_directions(targets)
    assert directions.shape == (*targets.shape, tiny256.cfg.d_model) and directions.dtype == torch.float32
    torch.testing.assert_close((x * directions).sum(-1), logits.gather(-1, targets[..., None])[..., 0])
    # one token as an int or as its string: a single direction [d]
    one = tiny256.tokens_to_residual_directions(5)
    assert one.shape == (tiny256.cfg.d_model,)
    torch.testing.assert_close(tiny256.tokens_to_residual_directions(tiny256.to_string([5])), one)
    torch.testing.assert_close((x[0, 3] * one).sum(), logits[0, 3, 5])
    with pytest.raises(ValueError, match="d_vocab|0, 256"):
        tiny256.tokens_to_residual_directions(torch.tensor([300]))


def test_absent_biases_are_zero_and_head_labels_cover_every_head(tiny256):
    cfg = tiny256.cfg
    assert tiny256.b_O.shape == (cfg.n_layers, cfg.d_model) and not tiny256.b_O.any()
    assert tiny256.b_U.shape == (cfg.d_vocab,) and not tiny256.b_U.any()
    assert tiny256.accumulated_bias(2).shape == (cfg.d_model,) and not tiny256.accumulated_bias(2).any()
    with pytest.raises(ValueError, match="layer"):
        tiny256.accumulated_bias(cfg.n_layers + 1)
    labels = tiny256.all_head_labels()
    assert len(labels) == cfg.n_layers * cfg.n_heads and labels[:2] == ["L0H0", "L0H1"]
    assert labels[-1] == f"L{cfg.n_layers - 1}H{cfg.n_heads - 1}"


# ---------------------------------------------------------------------- what V4 lacks: a pointer, not a crash
@pytest.mark.parametrize(
    "name, pointer",
    [
        ("W_Q", "hook_q"), ("W_K", "hook_kv"), ("W_V", "shared by every head"), ("b_Q", "no biases"),
        ("b_V", "no biases"), ("QK", "hook_attn_scores"), ("OV", "model.W_O"), ("W_in", "w3 \\(up\\)"),
        ("W_gate", "w1 \\(gate\\)"), ("W_out", "w2 \\(down\\)"), ("b_out", "mixture of experts"),
        ("W_pos", "RoPE"), ("pos_embed", "RoPE"), ("fold_layer_norm", "RMSNorm"),
        ("center_writing_weights", "nothing to centre"), ("refactor_factored_attn_matrices", "re-normalised"),
        ("all_composition_scores", "OV"), ("input_to_embed", "hook_embed"), ("unembed", "W_U"),
    ],
)  # fmt: skip
def test_transformer_lens_names_v4_lacks_say_what_to_use(tiny256, name, pointer):
    with pytest.raises(AttributeError, match=pointer):
        getattr(tiny256, name)
    assert not hasattr(tiny256, name)  # feature detection still works
    with pytest.raises(AttributeError, match="has no attribute 'not_a_thing'"):
        tiny256.not_a_thing  # noqa: B018  (other names: nn.Module's own message)


def test_weight_processing_is_refused_and_loading_is_plain():
    model, other = fresh(), v4lens.load("tiny", d_vocab=256, seed=1)
    tokens = torch.arange(12)[None]
    with pytest.raises(ValueError, match="fold_ln, center_writing_weights, center_unembed"):
        model.process_weights_()  # TransformerLens's defaults
    with pytest.raises(ValueError, match="fold_ln"):
        model.load_and_process_state_dict(other.state_dict(), fold_ln=True)
    model.process_weights_(False, False, False, False)  # nothing asked: nothing done
    model.load_and_process_state_dict(other.state_dict())
    torch.testing.assert_close(model(tokens), other(tokens), rtol=0, atol=0)
    sd = {"x": torch.zeros(1)}
    assert model.fold_value_biases(sd) is sd
    with pytest.raises(ValueError, match="hook_q"):
        model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match="mlp_hc.hook_out"):
        model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(False)  # off is what V4 is: no-ops
    model.set_use_hook_mlp_in(False)
    with pytest.raises(NotImplementedError, match="v4lens.load"):
        HookedV4.from_pretrained("gpt2")


def test_loss_fn_and_token_helpers(tiny256, tokens_2x40):
    logits, loss = tiny256(tokens_2x40, return_type="both")
    torch.testing.assert_close(tiny256.loss_fn(logits, tokens_2x40), loss)
    assert tiny256.loss_fn(logits, tokens_2x40, per_token=True).shape == (2, 39)
    mask = torch.ones_like(tokens_2x40)
    mask[1, 30:] = 0
    torch.testing.assert_close(tiny256.loss_fn(logits, tokens_2x40, attention_mask=mask),
                               lm_cross_entropy_loss(logits, tokens_2x40, attention_mask=mask))  # fmt: skip
    row = torch.tensor([7, 9, 7, 3])
    assert tiny256.get_token_position(7, row) == 0 and tiny256.get_token_position(7, row[None], mode="last") == 2
    with pytest.raises(ValueError, match="does not occur"):
        tiny256.get_token_position(8, row)
    assert tiny256.to_single_str_token(5) == tiny256.to_string([5])


# ---------------------------------------------------------------------- optional hooks switched after load
def test_set_use_attn_result_after_load_adds_fires_and_removes_the_hooks(tokens_2x40):
    model = fresh()
    before = model(tokens_2x40)
    model.cfg.use_attn_result = True  # what TransformerLens users write: a clear error, not an AttributeError
    with pytest.raises(RuntimeError, match=r"set_use_attn_result\(True\)"):
        model(tokens_2x40)
    model.cfg.use_attn_result = False

    model.set_use_attn_result(True)
    assert list(model.hook_dict) == list(fresh(use_attn_result=True).hook_dict)  # same names, same order
    assert "mtp.0.attn.hook_result" in model.hook_dict
    logits, cache = model.run_with_cache(tokens_2x40)
    torch.testing.assert_close(logits, before)
    W_O = model.W_O
    for l in range(model.cfg.n_layers):
        result = cache[f"blocks.{l}.attn.hook_result"]  # [b, p, h, d]
        torch.testing.assert_close(result.sum(2), cache[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=1e-4)
        each = torch.einsum("bphc,hcd->bphd", cache[f"blocks.{l}.attn.hook_z"], W_O[l])
        torch.testing.assert_close(each, result, atol=1e-5, rtol=1e-4)

    def drop_head_0(result, hook):  # the edit flows on: the attention output is the sum of what is returned
        result[:, :, 0] = 0

    edited = model.run_with_hooks(tokens_2x40, fwd_hooks=[("blocks.0.attn.hook_result", drop_head_0)])
    assert not torch.allclose(edited, before)

    model.set_use_attn_result(False)
    assert list(model.hook_dict) == list(fresh().hook_dict) and not model.cfg.use_attn_result
    torch.testing.assert_close(model(tokens_2x40), before)


def test_set_use_expert_out_after_load_adds_fires_and_removes_the_hooks(tokens_2x40):
    model = fresh()
    model.cfg.use_expert_out = True
    with pytest.raises(RuntimeError, match=r"set_use_expert_out\(True\)"):
        model(tokens_2x40)
    model.cfg.use_expert_out = False

    model.set_use_expert_out(True)
    assert list(model.hook_dict) == list(fresh(use_expert_out=True).hook_dict)
    _, cache = model.run_with_cache(tokens_2x40, return_type=None)
    for l in range(model.cfg.n_layers):
        slots = cache[f"blocks.{l}.mlp.hook_expert_out"]  # [b, p, k, d]
        assert slots.shape == (2, 40, model.cfg.n_activated_experts, model.cfg.d_model)
        total = slots.sum(2) + cache[f"blocks.{l}.mlp.hook_shared_out"]
        torch.testing.assert_close(total, cache[f"blocks.{l}.hook_mlp_out"], atol=1e-5, rtol=1e-4)

    model.set_use_expert_out(False)
    assert list(model.hook_dict) == list(fresh().hook_dict) and not model.cfg.use_expert_out
    model(tokens_2x40)


def test_hook_points_switched_on_take_the_model_s_mode_so_patching_accepts_them(tokens_2x40):
    model = fresh()  # v4lens.load gives an eval-mode model; a new module would start in training mode
    model.set_use_attn_result(True)
    model.set_use_expert_out(True)
    assert not any(m.training for m in model.modules())
    clean, corrupted = tokens_2x40[:1], tokens_2x40[1:]
    _, clean_cache = model.run_with_cache(clean)
    result = v4lens.patching.get_act_patch_attn_out(model, corrupted, clean_cache, lambda logits: logits[:, -1, 3].sum())
    assert result.shape == (model.cfg.n_layers, 40)
    model.set_use_attn_result(False)
    model.train()
    model.set_use_attn_result(True)  # and in training mode, training mode
    assert model.blocks[0].attn.hook_result.training


# ---------------------------------------------------------------------- run_with_cache: names_filter, pos_slice
def test_names_filter_warns_about_hooks_that_did_not_fire(tiny256, tokens_2x40):
    wanted = ["blocks.0.hook_streams_post", "hook_logits", "ln_final.hook_normalized"]
    with pytest.warns(UserWarning, match="return_type=None") as caught:
        _, cache = run_with_cache(tiny256, tokens_2x40, names_filter=wanted, return_type=None)
    message = str(caught[0].message)
    assert "'hook_logits'" in message and "'ln_final.hook_normalized'" in message
    assert "blocks.0.hook_streams_post" not in message and "blocks.0.hook_streams_post" in cache.cache_dict
    with pytest.warns(UserWarning, match=r"\['blocks.2.hook_mlp_out'\].*stop_at_layer=1"):
        tiny256.run_with_cache(tokens_2x40, names_filter=["blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"],
                               stop_at_layer=1)  # fmt: skip
    with pytest.warns(UserWarning, match="mtp=True"):
        tiny256.run_with_cache(tokens_2x40, names_filter="mtp.0.hook_logits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fired: no warning
        tiny256.run_with_cache(tokens_2x40, names_filter=["hook_logits"])
        tiny256.run_with_cache(tokens_2x40, names_filter=lambda n: n.startswith("mtp."))  # a function names nothing
    with pytest.raises(KeyError, match="hook_resid_post"):  # not a hook point at all: refused before the forward
        tiny256.run_with_cache(tokens_2x40, names_filter=["blocks.0.hook_resid_post"])


def test_per_row_pos_slice_caches_each_rows_positions(tiny256, tokens_2x40):
    names = ["blocks.1.hook_streams_post", "blocks.1.attn.hook_pattern", "blocks.1.attn.compressor.hook_kv",
             "blocks.3.attn.indexer.hook_topk", "hook_logits"]  # fmt: skip
    _, full = tiny256.run_with_cache(tokens_2x40, names_filter=names)
    for rows in (torch.tensor([[39], [7]]), torch.tensor([[-1], [7]]), torch.tensor([[0, 5], [39, -2]])):
        _, cache = tiny256.run_with_cache(tokens_2x40, names_filter=names, pos_slice=rows)
        for name in names:
            if "compressor" in name:  # compressed entries have no position axis: kept whole
                torch.testing.assert_close(cache[name], full[name], rtol=0, atol=0)
                continue
            axis = 2 if name.endswith("hook_pattern") else 1
            want = torch.stack([full[name][i].index_select(axis - 1, rows[i] % 40) for i in range(2)])
            assert cache[name].shape[axis] == rows.shape[1]
            torch.testing.assert_close(cache[name], want, rtol=0, atol=0)
    # batch 1 with remove_batch_dim: [1, k] rows, cached without the batch axis
    _, one = tiny256.run_with_cache(tokens_2x40[1:], names_filter=names[:1], pos_slice=torch.tensor([[7]]),
                                    remove_batch_dim=True)  # fmt: skip
    torch.testing.assert_close(one[names[0]], full[names[0]][1, 7:8], rtol=0, atol=0)
    # a 1-D tensor keeps TransformerLens's meaning: the same positions in every row
    _, shared = tiny256.run_with_cache(tokens_2x40, names_filter=names[:1], pos_slice=torch.tensor([3, 9]))
    torch.testing.assert_close(shared[names[0]], full[names[0]][:, [3, 9]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 rows, the input has 2"):
        tiny256.run_with_cache(tokens_2x40, names_filter=names[:1], pos_slice=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        tiny256.run_with_cache(tokens_2x40, names_filter=names[:1], pos_slice=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(IndexError, match="outside"):
        tiny256.run_with_cache(tokens_2x40, names_filter=names[:1], pos_slice=torch.tensor([[40], [0]]))
    with pytest.raises(ValueError, match="chunk_len"):
        tiny256.run_with_cache(tokens_2x40, names_filter=names[:1], pos_slice=torch.tensor([[1], [2]]), chunk_len=8)
