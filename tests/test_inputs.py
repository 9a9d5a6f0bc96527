"""Bad input gets a clear error; text input, padding, short inputs, config validation, seeded init."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.model.config import V4Config, preset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_text():
    """tiny with the real vocabulary, so the V4 tokenizer's ids are valid."""
    return v4lens.load("tiny", seed=0)


# ---------------------------------------------------------------------- tokens
@pytest.mark.parametrize("bad", [-1, 256, 10_000])
def test_token_out_of_range_names_the_range(tiny256, bad):
    tokens = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=r"\[0, 256\)") as err:
        tiny256(tokens)
    assert str(bad) in str(err.value)


def test_mtp_next_tokens_are_range_checked(tiny256):
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tiny256(torch.tensor([[1, 2, 3]]), mtp=True, mtp_next_tokens=torch.tensor([[300]]))


@pytest.mark.parametrize("empty", [torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.long), []])  # fmt: skip
def test_empty_input_is_refused(tiny256, empty):
    with pytest.raises(ValueError, match="empty"):
        tiny256(empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64])
def test_non_integer_tokens_are_a_type_error(tiny256, dtype):
    with pytest.raises(TypeError, match="integer"):
        tiny256(torch.ones(1, 4, dtype=dtype))


def test_three_d_tokens_name_the_shape(tiny256):
    with pytest.raises(ValueError, match=r"\(1, 2, 4\)"):
        tiny256(torch.zeros(1, 2, 4, dtype=torch.long))


def test_tokens_on_another_device_are_refused(tiny256):
    with pytest.raises(ValueError, match="meta") as err:
        tiny256(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert "cpu" in str(err.value) and "model.device" in str(err.value)


def test_non_tensor_input_is_a_type_error(tiny256):
    with pytest.raises(TypeError):
        tiny256(3.5)
    with pytest.raises(TypeError):
        tiny256({"input_ids": [1, 2]})


def test_equivalent_token_forms_agree(tiny256):
    ref = tiny256(torch.tensor([[5, 6, 7, 8]]))
    assert ref.shape == (1, 4, 256) and ref.dtype == torch.float32
    torch.testing.assert_close(tiny256(torch.tensor([5, 6, 7, 8])), ref, atol=0, rtol=0)  # [p] -> [1, p]
    torch.testing.assert_close(tiny256([5, 6, 7, 8]), ref, atol=0, rtol=0)
    torch.testing.assert_close(tiny256(torch.tensor([[5, 6, 7, 8]], dtype=torch.int32)), ref, atol=0, rtol=0)


@pytest.mark.parametrize("bad", ["logit", "probs", "", 1])
def test_invalid_return_type_lists_the_options(tiny256, bad):
    with pytest.raises(ValueError, match="'logits', 'loss', 'both' or None"):
        tiny256(torch.tensor([[1, 2]]), return_type=bad)


def test_return_types(tiny256, tokens_2x40):
    with torch.no_grad():
        logits = tiny256(tokens_2x40)
        loss = tiny256(tokens_2x40, return_type="loss")
        both = tiny256(tokens_2x40, return_type="both")
        assert tiny256(tokens_2x40, return_type=None) is None
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens_2x40[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(both[0], logits, atol=0, rtol=0)
    torch.testing.assert_close(both[1], want)
    with pytest.raises(ValueError, match="two tokens"):
        tiny256(torch.tensor([[4]]), return_type="loss")


@pytest.mark.parametrize("S", [1, 2, 3, 5, 7, 13])
def test_short_inputs_run_and_are_prefixes_of_longer_ones(tiny256, tokens_2x40, S):
    """Shorter than a compression window (T = 0 entries) must work; outputs are causal."""
    with torch.no_grad():
        full = tiny256(tokens_2x40[:, :16])
        short, mtp = tiny256(tokens_2x40[:, :S], mtp=True)
    assert short.shape == (2, S, 256) and mtp[0].shape == (2, S, 256)
    assert torch.isfinite(short).all() and torch.isfinite(mtp[0]).all()
    torch.testing.assert_close(short, full[:, :S], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- text
def test_text_input(tiny_text):
    tokens = tiny_text.to_tokens("Hello")
    assert tokens.dtype == torch.long and tokens[0, 0] == tiny_text.cfg.bos_token_id and tokens.shape[0] == 1
    with torch.no_grad():
        logits = tiny_text("Hello")
        torch.testing.assert_close(logits, tiny_text(tokens), atol=0, rtol=0)
    assert logits.shape == (1, tokens.shape[1], 129_280)
    assert tiny_text.to_string(tokens[0, 1:]) == "Hello"


def test_list_of_texts_is_right_padded(tiny_text):
    texts = ["Hello", "Hello world, how are you today?"]
    tokens = tiny_text.to_tokens(texts)
    short = tiny_text.to_tokens(texts[0])[0]
    n = short.shape[0]
    assert tokens.shape[0] == 2 and tokens.shape[1] > n
    assert torch.equal(tokens[0, :n], short)
    assert (tokens[0, n:] == tiny_text.cfg.pad_token_id).all()
    assert torch.equal(tokens[1], tiny_text.to_tokens(texts[1])[0])
    with torch.no_grad():
        batch = tiny_text(texts)
        alone = tiny_text(texts[0])
    assert batch.shape == (2, tokens.shape[1], 129_280)
    torch.testing.assert_close(batch[0, :n], alone[0], atol=1e-5, rtol=1e-5)  # pads come after: no effect


def test_empty_text_list_is_refused(tiny_text):
    with pytest.raises(ValueError, match="empty"):
        tiny_text.to_tokens([])


# ---------------------------------------------------------------------- presets and config
def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as err:
        v4lens.load("nope")
    for name in ("tiny", "mini-3b", "flash"):
        assert name in str(err.value)
    with pytest.raises(KeyError, match="tiny"):
        preset("nope")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_heads=5), r"n_heads \(5\) must be divisible by o_groups \(2\)"),
        (dict(rope_head_dim=7), r"rope_head_dim \(7\) must be even"),
        (dict(rope_head_dim=64), r"rope_head_dim \(64\).*head_dim=32"),
        (dict(n_activated_experts=9), r"top-k \(9\) > n_routed_experts \(8\)"),
        (dict(n_hash_layers=5), r"n_hash_layers \(5\).*n_layers=4"),
        (dict(compress_ratios=(0, 4, 6)), r"compress_ratios has 3 entries"),
        (dict(compress_ratios=(0, 4, 1, 4, 0)), r"ratio of 1"),
        (dict(compress_ratios=(0, 4, -6, 4, 0)), r">= 0"),
        (dict(d_model=0), r"d_model must be positive"),
        (dict(score_func="relu"), r"score_func"),
        (dict(dtype="float16"), r"unknown dtype"),
        (dict(dtype=torch.float16), r"float32 or bfloat16"),
        (dict(qat=True), r"not implemented"),
    ],
)
def test_config_validation_says_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **overrides)
    with pytest.raises(ValueError, match=message):  # load validates before building anything
        v4lens.load("tiny", d_vocab=256, **overrides)


def test_valid_edge_configs_are_accepted():
    assert preset("tiny", n_hash_layers=0).n_hash_layers == 0
    assert preset("tiny", n_hash_layers=4).is_hash_layer(3)
    assert preset("tiny", compress_ratios=(0, 4, 6, 4)).layer_type(4) == "sliding"  # MTP entry defaults to 0
    assert preset("tiny", rope_head_dim=32, index_head_dim=32).nope_head_dim == 0
    assert V4Config(**{**preset("tiny").to_dict(), "dtype": "bf16"}).dtype == torch.bfloat16


# ---------------------------------------------------------------------- seeded init
def test_same_seed_same_weights_other_seed_different():
    a, b, c = (v4lens.load("tiny", d_vocab=256, seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    random = [k for k in sa if k.endswith(("wq_a", "embed.weight", "experts.w1", "tid2eid", "hc_head.fn"))]
    assert len(random) >= 5
    assert all(not torch.equal(sa[k], sc[k]) for k in random), "seed 1 must draw different weights"
    assert all(torch.equal(sa[k], sc[k]) for k in sa if k.endswith((".w", "attn_sink", ".ape")))  # constants
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens)) and not torch.allclose(a(tokens), c(tokens))


def test_weights_do_not_depend_on_opt_in_hooks():
    plain = v4lens.load("tiny", d_vocab=256, seed=3).state_dict()
    optin = v4lens.load("tiny", d_vocab=256, seed=3, use_attn_result=True, use_expert_out=True).state_dict()
    assert plain.keys() == optin.keys() and all(torch.equal(plain[k], optin[k]) for k in plain)


def test_tid2eid_rows_hold_distinct_experts(tiny256):
    cfg = tiny256.cfg
    tables = [blk.mlp.gate.tid2eid for blk in tiny256.blocks if blk.mlp.hashed]
    assert len(tables) == cfg.n_hash_layers == 1
    for t in tables:
        assert t.shape == (cfg.d_vocab, cfg.n_activated_experts) and t.dtype == torch.long
        assert ((t >= 0) & (t < cfg.n_routed_experts)).all()
        assert (t.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within each row
        assert len({tuple(r) for r in t.tolist()}) > 20  # rows really are random (56 ordered pairs exist)
        used = torch.bincount(t.flatten(), minlength=cfg.n_routed_experts)
        assert (used > 0).all()  # every expert is reachable


def test_to_string_accepts_a_single_token(tiny256):
    tokens = tiny256.to_tokens("Hello world")
    assert tiny256.to_string(tokens[0, 1]) == tiny256.to_string([int(tokens[0, 1])])
    assert tiny256.to_string(int(tokens[0, 1])) == tiny256.to_string(tokens[0, 1:2])
