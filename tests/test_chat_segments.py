"""Every token of a rendered V4 conversation labelled with its part: the spans tile the tokens and
each span is the text its part rendered (v4lens.chat.segments)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_chat_format import AGENT, ARGS, CONVERSATIONS, SEARCH, TOOLS, asst, call, dev, sys_, tool, user

from v4lens.chat import Segments, render, segments
from v4lens.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

# fmt: off
CASES = {
    "agentic-thinking": (AGENT, {"thinking": True}),
    "agentic-chat": (AGENT + [asst("Rome: 77F.")], {"thinking": False}),
    "two-turns-thinking": (CONVERSATIONS["two_turns"][0], {"thinking": True, "drop_thinking": False}),
    "developer-tools": (CONVERSATIONS["developer_tools"][0], {"thinking": True, "reasoning_effort": "max"}),
    "reminder-and-task": ([sys_(), user("q"), {"role": "latest_reminder", "content": "Be brief."}, asst("a", "r"),
                           user("Name it.", task="title")], {"thinking": True}),
    "arguments": ([sys_(tools=TOOLS), user("q"), asst("Checking.", "r", [call("search", ARGS), call("get_weather", "{}")]),
                   tool('{"hits": 3}'), tool("/usr/bin")], {"thinking": False}),
}
# fmt: on


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tok):
    msgs, opts = CASES[request.param]
    return msgs, opts, segments(msgs, tok, **opts)


def token_chars(seg: Segments, tok):
    return tok(seg.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def test_ids_are_the_rendered_prompt(case, tok, tiny256):
    msgs, opts, seg = case
    assert seg.text == render(msgs, **opts)
    assert seg.ids == tok(seg.text, add_special_tokens=False)["input_ids"]
    assert seg.ids == tiny256.to_tokens(seg.text, prepend_bos=False)[0].tolist()  # no second BOS
    assert seg.str_tokens == tiny256.to_str_tokens(seg.text, prepend_bos=False)
    assert seg.tokens().shape == (1, seg.n_tokens)


def test_spans_tile_the_tokens(case):
    _, _, seg = case
    assert seg[0].start == 0 and seg[-1].stop == seg.n_tokens
    for a, b in itertools.pairwise(seg):
        assert a.stop == b.start, (a, b)
    assert all(r.start < r.stop for r in seg)
    assert seg.mask().all() and len(seg.labels()) == seg.n_tokens and None not in seg.labels()


def test_each_span_decodes_to_its_part(case, tok):
    """A span decodes to its part's text when the part starts and ends on token boundaries; a token
    shared by two parts follows the documented rule: it belongs to the part its first character is
    in, unless it starts in the format's markup and reaches into a part of the conversation."""
    _, _, seg = case
    offsets = token_chars(seg, tok)
    assert "".join(tok.decode(seg.ids[r.start : r.stop]) for r in seg) == seg.text
    talk = [(r.char_start, r.char_stop) for r in seg if r.part != "marker"]

    def in_markup(c: int) -> bool:
        return not any(a <= c < b for a, b in talk)

    for k, r in enumerate(seg):
        assert seg.text[r.char_start : r.char_stop] == r.text
        decoded = tok.decode(seg.ids[r.start : r.stop])
        for a, b in offsets[r.start : r.stop]:
            inside = r.char_start <= a < r.char_stop
            assert inside or (r.part != "marker" and in_markup(a) and b > r.char_start), (r, a, b)
        if offsets[r.start][0] == r.char_start and offsets[r.stop - 1][1] == r.char_stop:
            assert decoded == r.text
        elif r.part != "marker" and (k == 0 or seg[k - 1].part == "marker"):
            assert r.text in decoded, (r, decoded)  # a part of the conversation keeps all of its text


def test_every_part_of_the_conversation_is_labelled(tok):
    msgs, opts = CASES["arguments"]
    seg = segments(msgs, tok, **opts)
    assert [r.text for r in seg.select(part="system")] == ["You are a helpful assistant."]  # "system" alone: the role
    assert [(r.tool, r.text[:9]) for r in seg.select("tool_schema")] == [("get_weather", '{"name": '), ("search", '{"name": ')]
    assert [(r.text, r.message) for r in seg.select(part="user")] == [("q", 1)]
    assert [r.text for r in seg.select("content")] == ["Checking."]
    assert [(r.tool, r.call) for r in seg.select("tool_name")] == [("search", 0), ("get_weather", 1)]
    args = json.loads(ARGS)
    assert [r.text for r in seg.select("argument_name", tool="search")] == list(args)
    assert seg.select("argument", argument="i")[0].text == "3" and seg.select("argument", argument="s")[0].text == "Paris"
    assert not seg.select(tool="get_weather", part=["argument", "argument_name"])  # "{}": no arguments
    # Results answer the calls in order (no ids): the first is search's, the second get_weather's.
    assert [(r.tool, r.call, r.message, r.turn) for r in seg.select("tool_result")] == [
        ("search", 0, 3, 1), ("get_weather", 1, 4, 1)]  # fmt: skip
    assert seg.select("opening")[-1].message is None and seg.select("opening")[-1].turn == 1  # the reply to come


def test_masks_select_the_tool_result_tokens(tok):
    msgs, opts = CASES["agentic-thinking"]
    seg = segments(msgs, tok, **opts)
    m = seg.mask("tool_result")
    assert m.dtype == torch.bool and m.shape == (seg.n_tokens,)
    results = [m_["content"] for m_ in msgs if m_["role"] == "tool"]
    spans = [tok.decode(seg.ids[r.start : r.stop]) for r in seg.select("tool_result")]
    assert len(spans) == len(results) and int(m.sum()) == sum(r.stop - r.start for r in seg.select("tool_result"))
    for text, span in zip(results, spans):  # each result whole, plus at most the '>' / '</' of a shared token
        assert text in span and len(span) - len(text) <= 3, (text, span)
    assert torch.equal(seg.positions("tool_result"), m.nonzero().flatten())
    # role "tool" adds the <tool_result> markup (and the <｜User｜> that opens a turn of results)
    assert (seg.mask("tool") & ~m).sum() > 0 and not (m & ~seg.mask("tool")).any()
    # Calls by tool, thinking by turn: turn k is the k-th assistant reply and what leads to it.
    assert [r.turn for r in seg.select("thinking")] == [0, 1, 2, 3]
    assert {r.message for r in seg.select("tool_name", tool="get_weather")} == {4, 8}
    assert torch.equal(seg.mask("thinking", turn=[0, 1]), seg.mask("thinking", turn=0) | seg.mask("thinking", turn=1))


def test_straddling_tokens_go_to_the_conversation_not_the_markup(tok):
    """'>/' spans the end of <tool_result> and the start of '/usr/bin': the token belongs to the result."""
    seg = segments(CASES["arguments"][0], tok)
    result = seg.select("tool_result", call=1)[0]
    first = tok.decode(seg.ids[result.start : result.start + 1])
    assert first.startswith(">") and "/usr/bin".startswith(first[1:]), first
    marker = seg[seg.rows.index(result) - 1]
    assert marker.part == "marker" and tok.decode(seg.ids[marker.start : marker.stop]) == "<tool_result"


def test_dropped_messages_have_no_rows(tok):
    msgs = CONVERSATIONS["developer_mid"][0]
    assert not segments(msgs, tok, thinking=True).select("developer")
    kept = segments(msgs, tok, thinking=True, drop_thinking=False).select(part="developer")
    assert [(r.text, r.message, r.turn) for r in kept] == [("Now be brief.", 3, 1)]
    task = segments(CASES["reminder-and-task"][0], tok, thinking=True)
    # "Be brief." + "a" (a reply without thinking: an earlier turn) share the token ".a": it is the reminder's
    assert [r.text for r in task.select("reminder")] == ["Be brief."] and not task.select("content")
    assert [(r.text, r.role) for r in task.select("task")] == [("<｜title｜>", "user")]


def test_table_and_model_tokenizer(tiny256):
    msgs = [sys_(tools=[SEARCH]), user("q"), dev("d")]
    seg = segments(msgs, tiny256, add_generation_prompt=False)  # a model: its tokenizer is used
    df = seg.to_pandas()
    assert list(df.columns[:4]) == ["start", "stop", "role", "part"] and len(df) == len(seg)
    assert str(df["message"].dtype) == "Int64" and df["message"].isna().sum() == 1  # BOS
    assert seg.records()[0]["text"] == "<｜begin▁of▁sentence｜>"
    assert "spans over" in repr(seg)
    with pytest.raises(TypeError, match="unknown field"):
        seg.select(colour="red")
