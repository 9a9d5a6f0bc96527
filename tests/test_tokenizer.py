"""The real V4 tokenizer and the V4 chat template (SPEC §D)."""

import pytest

from v4lens.tokenizer import (
    ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, load_tokenizer, render_chat,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_vocab_sizes(tok):
    assert len(tok) == 129_280
    assert tok.vocab_size == 128_000  # ids >= 128000 are added special tokens


def test_special_token_ids(tok):
    ids = {
        BOS: 0, EOS: 1, "<｜▁pad▁｜>": 2, USER: 128803, ASSISTANT: 128804,
        THINK_START: 128821, THINK_END: 128822, "｜DSML｜": 128825,
    }
    for token, idx in ids.items():
        assert tok.convert_tokens_to_ids(token) == idx, token
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)


def test_round_trip_and_no_bos(tok):
    text = "Hello, world! Grüße — 你好世界 😀 x=12345\n\tend"
    ids = tok(text)["input_ids"]
    assert ids[0] != tok.bos_token_id
    assert tok.bos_token_id not in ids
    assert tok.decode(ids) == text


def test_special_tokens_in_text_are_single_tokens(tok):
    ids = tok(f"{BOS}{USER}Hello{ASSISTANT}{THINK_START}x{THINK_END}y{EOS}")["input_ids"]
    assert ids[:2] == [0, 128803]
    assert 128804 in ids and 128821 in ids and 128822 in ids and ids[-1] == 1
    assert tok.decode(ids) == f"{BOS}{USER}Hello{ASSISTANT}{THINK_START}x{THINK_END}y{EOS}"


def test_loader_is_cached():
    assert load_tokenizer() is load_tokenizer()
    assert load_tokenizer(thinking=True) is not load_tokenizer()


HELLO = [{"role": "user", "content": "Hello"}]


def test_hello_chat_and_thinking(tok):
    assert tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True) == (
        f"{BOS}{USER}Hello{ASSISTANT}{THINK_END}"
    )
    assert tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True, thinking=True) == (
        f"{BOS}{USER}Hello{ASSISTANT}{THINK_START}"
    )
    # enable_thinking (Qwen-style kwarg) and the load_tokenizer default both switch the mode.
    assert tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True, enable_thinking=True).endswith(
        THINK_START
    )
    thinking_tok = load_tokenizer(thinking=True)
    assert thinking_tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True).endswith(THINK_START)
    assert thinking_tok.apply_chat_template(
        HELLO, tokenize=False, add_generation_prompt=True, thinking=False
    ).endswith(THINK_END)


@pytest.mark.parametrize("thinking, last", [(False, 128822), (True, 128821)])
def test_hello_token_ids(tok, thinking, last):
    out = tok.apply_chat_template(
        HELLO, add_generation_prompt=True, return_tensors="pt", return_dict=True, thinking=thinking
    )
    ids = out["input_ids"]
    assert ids.ndim == 2 and ids.shape[0] == 1
    row = ids[0].tolist()
    assert row[0] == 0 and 128803 in row and 128804 in row and row[-1] == last
    # Special tokens were not split into pieces: the prompt is exactly 5 tokens.
    assert row == [0, 128803, tok("Hello")["input_ids"][0], 128804, last]
    assert out["attention_mask"].shape == ids.shape


def test_one_turn_with_system():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"}]
    assert render_chat(msgs) == f"{BOS}SYS{USER}Q{ASSISTANT}{THINK_END}"
    assert render_chat(msgs, thinking=True) == f"{BOS}SYS{USER}Q{ASSISTANT}{THINK_START}"


TWO_TURNS = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1", "reasoning_content": "old reasoning"},
    {"role": "user", "content": "q2"},
]


def test_thinking_second_turn_drops_old_reasoning():
    assert render_chat(TWO_TURNS, thinking=True) == (
        f"{BOS}SYS{USER}q1{ASSISTANT}{THINK_END}a1{EOS}{USER}q2{ASSISTANT}{THINK_START}"
    )


def test_thinking_without_drop_keeps_reasoning():
    assert render_chat(TWO_TURNS, thinking=True, drop_thinking=False) == (
        f"{BOS}SYS{USER}q1{ASSISTANT}{THINK_START}old reasoning{THINK_END}a1{EOS}"
        f"{USER}q2{ASSISTANT}{THINK_START}"
    )


def test_chat_multi_turn():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert render_chat(msgs) == f"{BOS}{USER}q1{ASSISTANT}{THINK_END}a1{EOS}{USER}q2{ASSISTANT}{THINK_END}"


def test_no_generation_prompt():
    msgs = [{"role": "user", "content": "q1"}]
    assert render_chat(msgs, add_generation_prompt=False) == f"{BOS}{USER}q1"
    assert render_chat(msgs, thinking=True, add_generation_prompt=False) == f"{BOS}{USER}q1"


def test_assistant_after_last_user_keeps_reasoning_in_thinking_mode():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert render_chat(msgs, thinking=True) == f"{BOS}{USER}q{ASSISTANT}{THINK_START}r{THINK_END}a{EOS}"
    assert render_chat(msgs) == f"{BOS}{USER}q{ASSISTANT}{THINK_END}a{EOS}"


def test_developer_renders_like_user():
    msgs = [{"role": "developer", "content": "d"}]
    assert render_chat(msgs) == f"{BOS}{USER}d{ASSISTANT}{THINK_END}"


def test_tool_call_and_results():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"a": "x", "n": 3}'}},
        ]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    d = "｜DSML｜"
    assert render_chat(msgs) == (
        f"{BOS}{USER}q{ASSISTANT}{THINK_END}\n\n<{d}tool_calls>\n<{d}invoke name=\"f\">\n"
        f"<{d}parameter name=\"a\" string=\"true\">x</{d}parameter>\n"
        f"<{d}parameter name=\"n\" string=\"false\">3</{d}parameter>\n"
        f"</{d}invoke>\n</{d}tool_calls>{EOS}"
        f"{USER}<tool_result>r1</tool_result>\n\n<tool_result>r2</tool_result>{ASSISTANT}{THINK_END}"
    )


def test_tools_block_follows_system_prompt():
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    out = render_chat([{"role": "system", "content": "SYS"}, {"role": "user", "content": "q"}], tools=tools)
    assert out.startswith(f"{BOS}SYS\n\n## Tools\n\n")
    assert '\n{"name": "f", "description": "d", "parameters": {}}\n' in out
    assert out.endswith(f"invoke tool calls.\n{USER}q{ASSISTANT}{THINK_END}")
