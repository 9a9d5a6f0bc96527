"""Generation with hooks (one full forward per token): greedy, sampling, EOS, hooks, caches, MTP read-out."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.generate import sample_next

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return v4lens.load("tiny-recall")


@pytest.fixture(scope="module")
def prompt():
    from v4lens.train import recall_batch

    batch = recall_batch(3, generator=torch.Generator().manual_seed(7))
    return batch["tokens"][:, :-1], batch["answer"]  # stop right after the query key


def test_greedy_equals_an_argmax_loop_and_recalls(model, prompt):
    tokens, answer = prompt
    out = model.generate(tokens, max_new_tokens=4, stop_at_eos=False)
    expected = tokens
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.tokens, expected) and out.new_tokens.shape == (3, 4)
    assert torch.equal(out.new_tokens[:, 0], answer)  # the trained model answers the recall query


def test_sampling_is_seeded_and_filters_behave():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_next(logits, 1.0, generator=g1), sample_next(logits, 1.0, generator=g2))
    assert torch.equal(sample_next(logits, 0.7, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.7, top_p=1e-6), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for s in range(20):
        picked = sample_next(logits, 2.0, top_k=3, generator=torch.Generator().manual_seed(s))
        assert bool((picked[:, None] == top3).any(-1).all())


def test_sampled_generation_reproducible(model, prompt):
    tokens, _ = prompt
    a = model.generate(tokens, 5, temperature=1.0, seed=11, stop_at_eos=False)
    b = model.generate(tokens, 5, temperature=1.0, seed=11, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens)


def test_eos_stops_and_pads(model, prompt):
    tokens, answer = prompt
    out = model.generate(tokens, 6, eos_token_id=int(answer[0]))  # row 0 "ends" at once
    assert int(out.new_tokens[0, 0]) == int(answer[0])
    assert bool((out.new_tokens[0, 1:] == model.cfg.pad_token_id).all())
    one = model.generate(tokens[:1], 6, eos_token_id=int(answer[0]))
    assert one.new_tokens.shape == (1, 1)  # stopped after EOS


def test_hooks_act_at_every_step_and_caches_are_kept(model, prompt):
    tokens, answer = prompt
    calls = []

    def no_picks(picks, hook):
        calls.append(picks.shape[1])
        return torch.full_like(picks, -1)

    out = model.generate(tokens, 3, stop_at_eos=False, fwd_hooks=[("blocks.1.attn.indexer.hook_topk", no_picks)],
                         cache_steps=True, names_filter=["blocks.1.attn.indexer.hook_topk"])  # fmt: skip
    S = tokens.shape[1]
    assert calls == [S, S + 1, S + 2]  # the hook saw the whole, growing sequence at each step
    assert not torch.equal(out.new_tokens[:, 0], answer)  # without the indexer's picks recall fails
    assert len(out.caches) == 3 and bool((out.caches[1]["blocks.1.attn.indexer.hook_topk"] == -1).all())
    assert not model.hook_dict["blocks.1.attn.indexer.hook_topk"]._forward_hooks  # nothing left attached


def test_stream_callback_text_and_chat_input():
    tiny = v4lens.load("tiny")
    seen = []
    out = tiny.generate("The capital of France is", 3, stop_at_eos=False, stream=seen.append)
    assert len(seen) == 3 and torch.equal(torch.stack(seen, 1), out.new_tokens)
    assert out.text == [tiny.to_string(out.new_tokens[0])]
    chat = tiny.generate([{"role": "user", "content": "Hi"}], 2, chat=True, stop_at_eos=False)
    rendered = tiny.to_tokens(v4lens.tokenizer.render_chat([{"role": "user", "content": "Hi"}]), prepend_bos=False)
    assert torch.equal(chat.tokens[:, : rendered.shape[1]], rendered)


def test_mtp_drafts_and_acceptance():
    tiny = v4lens.load("tiny")
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = tiny.generate(tokens, 5, stop_at_eos=False, mtp=True)
    assert out.mtp_drafts.shape == (2, 5) and bool((out.mtp_drafts[:, -1] == -1).all())
    hits = (out.mtp_drafts[:, :-1] == out.new_tokens[:, 1:]).float().mean().item()
    assert out.mtp_acceptance == pytest.approx(hits)
    with pytest.raises(ValueError, match="MTP"):
        v4lens.load("tiny-recall").generate(tokens % 128, 2, mtp=True)
