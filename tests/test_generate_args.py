"""`generate`'s arguments: bad sampling settings, budgets, chat input, padded batches and
invalid text are refused with an error naming the argument (never silently reinterpreted)."""

from __future__ import annotations

import math

import pytest
import torch

import v4lens

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    return v4lens.load("tiny")


@pytest.mark.parametrize("top_p", [0, 0.0, -0.5, 1.5, math.nan, True, "0.9"])
def test_top_p_outside_0_1_is_refused(tiny, top_p):
    with pytest.raises((ValueError, TypeError), match="top_p"):
        tiny.generate("Hi", 2, temperature=1.0, top_p=top_p)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True, "5"])
def test_top_k_must_be_a_positive_int(tiny, top_k):
    with pytest.raises((ValueError, TypeError), match="top_k"):
        tiny.generate("Hi", 2, temperature=1.0, top_k=top_k)


@pytest.mark.parametrize("temperature", [-1, -0.001, math.nan, math.inf, "1"])  # (None: the default)
def test_temperature_must_be_finite_and_non_negative(tiny, temperature):
    with pytest.raises((ValueError, TypeError), match="temperature"):
        tiny.generate("Hi", 2, temperature=temperature)


@pytest.mark.parametrize("n", [2.5, 3.0, "3", True, -1, None])
def test_max_new_tokens_must_be_a_non_negative_int(tiny, n):
    with pytest.raises((ValueError, TypeError), match="max_new_tokens"):
        tiny.generate("Hi", n)


def test_valid_edge_values_still_work(tiny):
    assert tiny.generate("Hi", 0, return_type="generation").new_tokens.shape == (1, 0)
    greedy = tiny.generate("Hi", 2, stop_at_eos=False, return_type="tokens")
    assert torch.equal(tiny.generate("Hi", 2, temperature=0, stop_at_eos=False, return_type="tokens"), greedy)
    sampled = tiny.generate("Hi", 2, temperature=0.7, top_k=1, top_p=1.0, seed=3, stop_at_eos=False, return_type="tokens")
    assert torch.equal(sampled, greedy)  # top_k=1 samples the argmax
    assert tiny.generate("Hi", torch.tensor(2), stop_at_eos=False, return_type="tokens").shape == (1, 4)  # an int tensor


def test_sampler_seed_is_checked(tiny):
    with pytest.raises((ValueError, TypeError), match="seed"):
        tiny.generate("Hi", 2, temperature=1.0, seed=2**70)
    with pytest.raises((ValueError, TypeError), match="seed"):
        tiny.generate("Hi", 2, temperature=1.0, seed=1.5)


def test_chat_accepts_a_string_as_one_user_turn(tiny):
    text = "What is the capital of France?"
    as_str = tiny.generate(text, 2, chat=True, stop_at_eos=False, return_type="tokens")
    as_turn = tiny.generate([{"role": "user", "content": text}], 2, chat=True, stop_at_eos=False, return_type="tokens")
    assert torch.equal(as_str, as_turn)
    for bad in (torch.tensor([[0, 5, 6]]), [1, 2, 3], {"role": "user", "content": "x"}, [{"content": "no role"}]):
        with pytest.raises((TypeError, ValueError), match="chat"):
            tiny.generate(bad, 2, chat=True)


def test_a_right_padded_token_batch_without_a_mask_is_refused(tiny):
    texts = ["Hello there my dear friend", "Hi"]
    padded = tiny.to_tokens(texts)
    assert int(padded[1, -1]) == tiny.cfg.pad_token_id
    with pytest.raises(ValueError, match="pad.*attention_mask"):
        tiny.generate(padded, 2)
    # with the mask (or padding_side) each row continues as if alone: tests/test_padding.py
    # rows of the same length (no padding) still generate as a batch
    same = tiny.to_tokens(["Hello there", "Hello there"])
    out = tiny.generate(same, 2, stop_at_eos=False, return_type="generation")
    assert out.new_tokens.shape == (2, 2) and torch.equal(out.new_tokens[0], out.new_tokens[1])


def test_lone_surrogates_are_refused_with_their_position(tiny):
    from v4lens.tokenizer import check_text

    with pytest.raises(ValueError, match=r"position 2\b"):
        tiny.generate("ab\ud800c", 2)
    with pytest.raises(ValueError, match=r"text 1 .*position 0\b"):
        tiny.generate(["ok", "\udfffx"], 2)
    with pytest.raises(ValueError, match=r"content.*position 3\b"):
        tiny.generate([{"role": "user", "content": "abc\ud800"}], 2, chat=True)
    with pytest.raises(ValueError, match=r"position 1\b"):
        tiny.generate("a\ud800", 2, chat=True)
    check_text("fine: é 漢字 🙂")  # real non-ASCII text passes
    with pytest.raises(ValueError, match=r"prompt holds a lone surrogate .*position 4\b"):
        check_text("🙂abc\udc80", "prompt")
