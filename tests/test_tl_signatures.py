"""TransformerLens-shaped signatures: `to_tokens(padding_side=)`, `forward(prepend_bos=, padding_side=,
attention_mask=, start_at_layer=, tokens=)` and `generate(do_sample=, temperature=, use_past_kv_cache=,
return_type="input" | "str" | "tokens", verbose=)` mean what they mean in TransformerLens."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.generate import Generation

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["Hello there my dear friend", "Hi"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with the real V4 tokenizer (text in, text out)."""
    return v4lens.load("tiny")


def test_to_tokens_pads_on_the_side_asked(tiny):
    right = tiny.to_tokens(TEXTS)
    left = tiny.to_tokens(TEXTS, padding_side="left")
    assert torch.equal(tiny.to_tokens(TEXTS, padding_side="right"), right)
    n = int((right[1] != tiny.cfg.pad_token_id).sum())  # the short text's real tokens
    assert torch.equal(left[1, -n:], right[1, :n]) and bool((left[1, :-n] == tiny.cfg.pad_token_id).all())
    assert torch.equal(left[0], right[0])
    assert int(tiny.to_tokens("Hi", prepend_bos=False)[0, 0]) != tiny.cfg.bos_token_id
    assert tiny.to_tokens("Hi", move_to_device=False).device.type == "cpu"
    with pytest.raises(ValueError, match="padding_side"):
        tiny.to_tokens(TEXTS, padding_side="up")


@torch.no_grad()
def test_forward_tokenizes_text_as_asked(tiny):
    no_bos = tiny.to_tokens("Hello there", prepend_bos=False)
    torch.testing.assert_close(tiny("Hello there", prepend_bos=False), tiny(no_bos), rtol=0, atol=0)
    left = tiny(TEXTS, padding_side="left")  # each row's real positions equal the text alone
    short = tiny(TEXTS[1])[0]
    torch.testing.assert_close(left[1, -short.shape[0] :], short)
    _, cache = tiny.run_with_cache("Hello there", prepend_bos=False, names_filter="hook_embed")
    assert torch.equal(cache.tokens, no_bos)  # the cache keeps the tokens the forward ran on
    with pytest.raises(TypeError, match="prepend_bos"):
        tiny("Hi", prepend_bos="no")


@torch.no_grad()
def test_generate_returns_what_transformer_lens_returns(tiny):
    text = tiny.generate("Hello there", 3, stop_at_eos=False)
    tokens = tiny.generate("Hello there", 3, stop_at_eos=False, return_type="tokens")
    assert isinstance(text, str) and tokens.shape == (1, tiny.to_tokens("Hello there").shape[1] + 3)
    assert text == tiny.tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)  # prompt and continuation
    assert text.startswith("Hello there")
    prompt = tiny.to_tokens("Hello there")
    assert torch.equal(tiny.generate(prompt, 3, stop_at_eos=False), tokens)  # tokens in, tokens out
    full = tiny.generate(prompt, 3, stop_at_eos=False, return_type="generation")
    assert isinstance(full, Generation) and torch.equal(full.tokens, tokens)
    assert tiny.generate(prompt, 3, stop_at_eos=False, return_type="str") == text
    # a list of texts: left-padded as TransformerLens pads it, each text continued as if alone
    both = tiny.generate(TEXTS, 3, stop_at_eos=False)
    assert both == [tiny.generate(t, 3, stop_at_eos=False) for t in TEXTS]
    padded = tiny.generate(TEXTS, 3, stop_at_eos=False, return_type="tokens")
    assert torch.equal(padded[:, :-3], tiny.to_tokens(TEXTS, padding_side="left"))
    with pytest.raises(ValueError, match="return_type"):
        tiny.generate(prompt, 3, return_type="embeds")


@torch.no_grad()
def test_generate_sampling_options(tiny, capsys):
    prompt = tiny.to_tokens("Hello there")
    greedy = tiny.generate(prompt, 4, stop_at_eos=False)
    assert torch.equal(tiny.generate(prompt, 4, stop_at_eos=False, do_sample=False, temperature=0.7), greedy)
    sampled = tiny.generate(prompt, 4, stop_at_eos=False, do_sample=True, seed=3)  # TransformerLens: temperature 1
    assert torch.equal(sampled, tiny.generate(prompt, 4, stop_at_eos=False, temperature=1.0, seed=3))
    assert not torch.equal(sampled, greedy)
    assert torch.equal(tiny.generate(prompt, 4, stop_at_eos=False, use_past_kv_cache=False), greedy)
    with pytest.raises(ValueError, match="disagree"):
        tiny.generate(prompt, 2, use_cache=True, use_past_kv_cache=False)
    with pytest.raises(TypeError, match="do_sample"):
        tiny.generate(prompt, 2, do_sample="yes")
    tiny.generate(prompt, 2, verbose=True)
    assert "generate" in capsys.readouterr().err  # a progress bar


@torch.no_grad()
def test_start_at_layer_continues_from_the_streams(tiny256, tokens_2x40):
    logits, cache = tiny256.run_with_cache(tokens_2x40)
    for layer in range(tiny256.cfg.n_layers):
        streams = cache[f"blocks.{layer}.hook_streams_pre"]
        out = tiny256(streams, start_at_layer=layer, tokens=tokens_2x40)
        torch.testing.assert_close(out, logits, rtol=0, atol=0)
    streams = cache["blocks.2.hook_streams_pre"]
    torch.testing.assert_close(tiny256(streams, start_at_layer=-2), logits, rtol=0, atol=0)  # no hash layer runs
    mid = tiny256(cache["blocks.1.hook_streams_pre"], start_at_layer=1, stop_at_layer=3)
    torch.testing.assert_close(mid, cache["blocks.2.hook_streams_post"], rtol=0, atol=0)
    loss = tiny256(streams, start_at_layer=2, tokens=tokens_2x40, return_type="loss")
    torch.testing.assert_close(loss, tiny256(tokens_2x40, return_type="loss"), rtol=0, atol=0)
    fired = []
    tiny256.run_with_hooks(
        streams, start_at_layer=2, fwd_hooks=[(lambda n: True, lambda t, hook: fired.append(hook.name))]
    )
    assert fired[0] == "blocks.2.hook_streams_pre" and "hook_embed" not in fired
    with pytest.raises(ValueError, match="hash routing.*tokens"):
        tiny256(cache["blocks.0.hook_streams_pre"], start_at_layer=0)
    with pytest.raises(ValueError, match="needs tokens"):
        tiny256(streams, start_at_layer=2, return_type="loss")
    with pytest.raises(ValueError, match="before start_at_layer"):
        tiny256(streams, start_at_layer=2, stop_at_layer=1)
    with pytest.raises(ValueError, match="start_at_layer cannot be combined"):
        tiny256(streams, start_at_layer=2, mtp=True)
    with pytest.raises(ValueError, match=r"\[b, p, n=4, d=64\]"):
        tiny256(streams[:, :, 0], start_at_layer=2)
    with pytest.raises(ValueError, match="tokens must be"):
        tiny256(streams, start_at_layer=2, tokens=tokens_2x40[:, :5])
    with pytest.raises(ValueError, match="tokens= is for start_at_layer"):
        tiny256(tokens_2x40, tokens=tokens_2x40)
