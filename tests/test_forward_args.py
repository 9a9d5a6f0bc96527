"""forward's arguments: the loss of a right-padded batch, and bad arguments as errors naming them.

A padded batch's loss counts real targets only (pads after a row's last token are left out; the
per-token loss is NaN there). Token lists hold ints only; float64 / float16 are refused on every
path; mtp_next_tokens is [b, n]; stop_at_layer and logits_to_keep are checked ints.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import v4lens

pytestmark = pytest.mark.usefixtures("single_thread")

PAD = 2  # the V4 pad token (a special token, never produced by the tokenizer for text)


def unpadded_nll(model, rows: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over the real targets of each row (run alone, unpadded) and their count."""
    total, count = torch.zeros(()), 0
    for r in rows:
        t = torch.tensor([r])
        logits = model(t)
        total = total + F.cross_entropy(logits[0, :-1], t[0, 1:], reduction="sum")
        count += len(r) - 1
    return total, count


# ---------------------------------------------------------------------- loss on a right-padded batch
def test_padded_loss_counts_real_targets_only(tiny256):
    rows = [[0, 17, 40, 9, 33, 71, 5, 8], [0, 99, 12]]
    tokens = torch.full((2, 8), PAD)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        loss = tiny256(tokens, return_type="loss")
        per_token = tiny256(tokens, return_type="loss", loss_per_token=True)
        total, count = unpadded_nll(tiny256, rows)
    torch.testing.assert_close(loss, total / count)
    # per token: NaN exactly where the target is padding, the unpadded rows' values elsewhere
    assert per_token.shape == (2, 7)
    assert torch.isnan(per_token[1, 2:]).all() and not torch.isnan(per_token[0]).any()
    assert not torch.isnan(per_token[1, :2]).any()
    torch.testing.assert_close(per_token.nansum(), total)


def test_pad_inside_a_row_is_a_real_target(tiny256):
    """Only right padding is padding: a pad id followed by real tokens counts."""
    tokens = torch.tensor([[0, 5, PAD, 7, 9], [0, 5, PAD, 7, 9]])
    with torch.no_grad():
        logits, loss = tiny256(tokens, return_type="both")
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)


def test_all_padding_targets_is_an_error(tiny256):
    with torch.no_grad(), pytest.raises(ValueError, match="padding"):
        tiny256(torch.tensor([[0, PAD, PAD]]), return_type="loss")


def test_to_tokens_batch_loss_ignores_pads():
    model = v4lens.load("tiny", seed=0)
    texts = ["The capital of France is Paris, of course", "Hi"]
    tokens = model.to_tokens(texts)
    assert (tokens[1] == model.cfg.pad_token_id).sum() > 0  # really padded
    rows = [[int(t) for t in row if t != model.cfg.pad_token_id] for row in tokens]
    with torch.no_grad():
        loss = model(texts, return_type="loss")
        total, count = unpadded_nll(model, rows)
    torch.testing.assert_close(loss, total / count)


# ---------------------------------------------------------------------- token lists
@pytest.mark.parametrize("bad", [[0.5, 1.9], [[1, 2], [3, 4.0]], [True, False], [1, True], (3, 2.0)])
def test_lists_of_floats_or_bools_are_not_token_ids(tiny256, bad):
    with pytest.raises(TypeError, match="input"):
        tiny256(bad)


def test_lists_of_ints_still_work(tiny256):
    with torch.no_grad():
        ref = tiny256(torch.tensor([[5, 6, 7]]))
        torch.testing.assert_close(tiny256([[5, 6, 7]]), ref, atol=0, rtol=0)
        torch.testing.assert_close(tiny256((5, 6, 7)), ref, atol=0, rtol=0)


def test_ragged_token_lists_name_the_input(tiny256):
    with pytest.raises(ValueError, match="input"):
        tiny256([[1, 2, 3], [4]])


# ---------------------------------------------------------------------- dtype: every path is guarded
@pytest.fixture(scope="module")
def own_model():
    """A model of this module's own (these tests try to change its dtype)."""
    return v4lens.load("tiny", d_vocab=256, seed=0)


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.to(dtype=torch.float16),
        lambda m: m.to("cpu", torch.float64), lambda m: m.to(torch.zeros(1, dtype=torch.float64)),
        lambda m: m.type(torch.float64), lambda m: m.type("torch.DoubleTensor"),
    ],
    ids=["double", "half", "to-f64", "to-f16", "to-cpu-f64", "to-tensor", "type-f64", "type-str"],
)  # fmt: skip
def test_other_float_dtypes_are_refused_on_every_path(own_model, convert):
    before = {n: p.dtype for n, p in own_model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match="float32 or bfloat16"):
        convert(own_model)
    assert {n: p.dtype for n, p in own_model.named_parameters()} == before
    assert own_model.cfg.dtype == torch.float32


def test_supported_dtype_conversions_still_work(own_model):
    own_model.bfloat16()
    assert own_model.embed.weight.dtype == torch.bfloat16 and own_model.cfg.dtype == torch.bfloat16
    own_model.type(torch.float32)
    assert own_model.embed.weight.dtype == torch.float32 and own_model.cfg.dtype == torch.float32


# ---------------------------------------------------------------------- mtp_next_tokens
@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (1,), (1, 1, 1), (1, 0)])
def test_mtp_next_tokens_must_be_batch_by_n(tiny256, shape):
    """tiny has one MTP block: [1, 1] is the only valid shape for one prompt."""
    with pytest.raises(ValueError, match=r"mtp_next_tokens") as err:
        tiny256(torch.tensor([[1, 2, 3]]), mtp=True, mtp_next_tokens=torch.ones(shape, dtype=torch.long))
    assert str(tuple(shape)) in str(err.value) and "[batch=1, n]" in str(err.value)


def test_mtp_next_tokens_must_be_token_ids(tiny256):
    with pytest.raises(TypeError, match="mtp_next_tokens"):
        tiny256(torch.tensor([[1, 2, 3]]), mtp=True, mtp_next_tokens=torch.tensor([[1.5]]))
    with pytest.raises(TypeError, match="mtp_next_tokens"):
        tiny256(torch.tensor([[1, 2, 3]]), mtp=True, mtp_next_tokens=[[1.5]])


def test_mtp_next_tokens_need_mtp(tiny256):
    with pytest.raises(ValueError, match="mtp=True"):
        tiny256(torch.tensor([[1, 2, 3]]), mtp_next_tokens=torch.tensor([[4]]))


def test_valid_mtp_next_tokens_work(tiny256):
    with torch.no_grad():
        _, (a,) = tiny256(torch.tensor([[1, 2, 3]]), mtp=True, mtp_next_tokens=torch.tensor([[4]]))
        _, (b,) = tiny256(torch.tensor([[1, 2, 3]]), mtp=True, mtp_next_tokens=[[4]])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------- stop_at_layer, logits_to_keep
@pytest.mark.parametrize("bad", [5, 100, -5, -100])
def test_stop_at_layer_out_of_range_is_an_error(tiny256, bad):
    with pytest.raises(ValueError, match=r"stop_at_layer must lie in \[-4, 4\]") as err:
        tiny256(torch.tensor([[1, 2, 3]]), stop_at_layer=bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("bad", [1.5, True, "2"])
def test_stop_at_layer_must_be_an_int(tiny256, bad):
    with pytest.raises(TypeError, match="stop_at_layer"):
        tiny256(torch.tensor([[1, 2, 3]]), stop_at_layer=bad)


def test_negative_stop_at_layer_counts_from_the_end(tiny256):
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(tiny256(tokens, stop_at_layer=-1), tiny256(tokens, stop_at_layer=3), atol=0, rtol=0)
        torch.testing.assert_close(tiny256(tokens, stop_at_layer=-4), tiny256(tokens, stop_at_layer=0), atol=0, rtol=0)
        assert tiny256(tokens, stop_at_layer=4).shape == (1, 4, tiny256.cfg.hc_mult, tiny256.cfg.d_model)


@pytest.mark.parametrize("bad", [-1, -3])
def test_negative_logits_to_keep_is_an_error(tiny256, bad):
    with pytest.raises(ValueError, match="logits_to_keep") as err:
        tiny256(torch.tensor([[1, 2, 3]]), logits_to_keep=bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("bad", [1.5, True])
def test_logits_to_keep_must_be_an_int(tiny256, bad):
    with pytest.raises(TypeError, match="logits_to_keep"):
        tiny256(torch.tensor([[1, 2, 3]]), logits_to_keep=bad)


def test_logits_to_keep_keeps_the_last_positions(tiny256):
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        full = tiny256(tokens)
        assert tiny256(tokens, logits_to_keep=2).shape == (1, 2, 256)
        torch.testing.assert_close(tiny256(tokens, logits_to_keep=2), full[:, -2:])  # (other GEMM shapes)
