"""The V4 prompt format against DeepSeek's reference encoder (encoding_dsv4.py), and parsing back.

tests/fixtures/chat_render.json holds a corpus of conversations (each feature of the format and
their combinations, in the reference's own input form), the options they are rendered with, and
the string the reference encoder wrote for each; chat_parse.json holds assistant completions and
what the reference parser returned. CI needs nothing fetched. With the reference at hand:

    V4LENS_DSV4_ENCODING=/path/to/encoding_dsv4.py pytest tests/test_chat_format.py -k reference   # check
    python tests/test_chat_format.py /path/to/encoding_dsv4.py                                    # rewrite

(the file is public in DeepSeek's V4 release repositories, under encoding/).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from v4lens.chat import DSMLError, parse_completion, render
from v4lens.chat.format import ASSISTANT, EOS, THINK_END, THINK_START
from v4lens.tokenizer import load_tokenizer, render_chat

FIXTURES = Path(__file__).parent / "fixtures"
RENDER_FILE, PARSE_FILE = FIXTURES / "chat_render.json", FIXTURES / "chat_parse.json"

# ----------------------------------------------------------------------------- the corpus

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo: the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}  # fmt: skip
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}}}}
TOOLS = [WEATHER, SEARCH]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}}}}}


def call(name, arguments, id=None):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": id, **out} if id else out


def sys_(content="You are a helpful assistant.", **kw):
    return {"role": "system", "content": content, **kw}


def user(content, **kw):
    return {"role": "user", "content": content, **kw}


def dev(content, **kw):
    return {"role": "developer", "content": content, **kw}


def asst(content, reasoning=None, calls=None, **kw):
    m = {"role": "assistant", "content": content, **kw}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if calls:
        m["tool_calls"] = calls
    return m


def tool(content, id=None):
    return {"role": "tool", "content": content, **({"tool_call_id": id} if id else {})}


ARGS = json.dumps({"s": "Paris", "i": 3, "f": 2.5, "b": True, "n": None, "l": [1, "two"], "d": {"k": "v"},
                   "u": "日本語 😀", "e": "", "q": 'say "hi"\nnow', "j": "{not: json}"}, ensure_ascii=False)  # fmt: skip
AGENT = [
    sys_("You are a research agent.", tools=TOOLS),
    user("What's the weather where the Eiffel Tower is?"),
    asst("", "I should find the city first.", [call("search", '{"query": "Eiffel Tower city"}', "c1")]),
    tool("The Eiffel Tower is in Paris, France.", "c1"),
    asst("", "It is in Paris; now the weather.", [call("get_weather", '{"city": "Paris"}', "c2")]),
    tool('{"temp": 18, "sky": "clear"}', "c2"),
    asst("It is 18°C and clear in Paris.", "Answer with the numbers."),
    user("And in Rome, in Fahrenheit?"),
    asst("", "Same tool, other unit.", [call("get_weather", '{"city": "Rome", "unit": "F"}', "c3")]),
    tool("77F, sunny", "c3"),
]
TWO = [sys_(), user("q1"), asst("a1", "r1"), user("q2")]

# name -> (messages, extra option sets beyond chat and thinking)
DROP, EFFORT = [{"thinking": True, "drop_thinking": False}], [{"thinking": True, "reasoning_effort": "max"}]
# fmt: off
CONVERSATIONS = {
    "hello": ([user("Hello")], EFFORT + [{"thinking": False, "reasoning_effort": "max"},
                                         {"thinking": True, "reasoning_effort": "high"}]),
    "system_user": ([sys_(), user("Hi")], EFFORT),
    "two_turns": (TWO, DROP + EFFORT),
    "ends_with_assistant": ([sys_(), user("q"), asst("a", "r")], DROP),
    "three_turns": ([user("q1"), asst("a1", "r1"), user("q2"), asst("a2", "r2"), user("q3")], DROP),
    "consecutive_users": ([user("first"), user("second"), asst("a", "r"), user("third"), user("fourth")], DROP),
    "empty_contents": ([sys_(""), user(""), asst("", ""), user("")], DROP),
    "unicode": ([sys_("Система: отвечай кратко"), user("日本語 émoji 😀 \\n"), asst("答え", "思考")], []),
    "system_mid": ([sys_(), user("q1"), asst("a1", "r1"), sys_("A second system prompt."), user("q2")], DROP),
    "developer_only": ([dev("Follow the house rules.")], []),
    "developer_then_user": ([sys_(), dev("Answer in French."), user("Hello")], DROP),
    "developer_mid": ([sys_(), user("q1"), asst("a1", "r1"), dev("Now be brief."), user("q2")], DROP + EFFORT),
    "developer_last": ([sys_(), user("q1"), asst("a1", "r1"), dev("Summarise.")], DROP),
    "developer_tools": ([sys_(), dev("Use the tools.", tools=TOOLS), user("Weather in Oslo?")], EFFORT),
    "developer_tools_mid": ([sys_(), user("q1"), asst("a1", "r1"), dev("Tools now.", tools=[SEARCH]), user("q2")], []),
    "developer_response_format": ([dev("Reply in JSON.", response_format=SCHEMA), user("Capital of Peru?")], []),
    "developer_tools_response_format": ([dev("Both.", tools=[WEATHER], response_format=SCHEMA), user("q")], []),
    "system_tools": ([sys_(tools=TOOLS), user("Weather in Oslo?")], EFFORT),
    "system_empty_tools": ([sys_("", tools=TOOLS), user("Weather in Oslo?")], []),
    "system_response_format": ([sys_(response_format=SCHEMA), user("Capital of Peru?")], []),
    "system_tools_response_format": ([sys_(tools=[SEARCH], response_format=SCHEMA), user("q")], EFFORT),
    "two_systems_with_tools": ([sys_(tools=[WEATHER]), user("q1"), asst("a1", "r1"), dev("More tools.", tools=[SEARCH]),
                                user("q2")], DROP),
    "tool_call": ([sys_(tools=TOOLS), user("Weather in Paris?"),
                   asst("", "Call the tool.", [call("get_weather", '{"city": "Paris"}', "c1")]), tool("18C", "c1")], []),
    "tool_call_answered": ([sys_(tools=TOOLS), user("Weather in Paris?"),
                            asst("", "Call it.", [call("get_weather", '{"city": "Paris"}', "c1")]), tool("18C", "c1"),
                            asst("18°C in Paris.", "Done.")], []),
    "tool_call_content_and_calls": ([sys_(tools=TOOLS), user("q"), asst("Let me check.", "r", [call("search", '{"query": "x"}')]),
                                     tool("result")], []),
    "tool_call_content_none": ([sys_(tools=TOOLS), user("q"), asst(None, None, [call("search", '{"query": "x"}')]), tool("r")],
                               []),
    "parallel_calls_sorted": ([sys_(tools=TOOLS), user("Paris and Rome?"),
                               asst("", "Both.", [call("get_weather", '{"city": "Paris"}', "p"),
                                                  call("get_weather", '{"city": "Rome"}', "r")]),
                               tool("Rome: 25C", "r"), tool("Paris: 18C", "p")], []),
    "parallel_calls_no_ids": ([sys_(tools=TOOLS), user("Paris and Rome?"),
                               asst("", "Both.", [call("get_weather", '{"city": "Paris"}'),
                                                  call("get_weather", '{"city": "Rome"}')]),
                               tool("Paris: 18C"), tool("Rome: 25C")], []),
    "argument_types": ([sys_(tools=TOOLS), user("q"), asst("", "r", [call("search", ARGS)]), tool("ok")], []),
    "argument_not_json": ([user("q"), asst("", "r", [call("search", "not json at all")]), tool("ok")], []),
    "argument_empty": ([user("q"), asst("", "r", [call("search", "{}")]), tool("ok")], []),
    "tool_result_blocks": ([user("q"), asst("", "r", [call("search", '{"query": "x"}', "c1")]),
                            {"role": "tool", "tool_call_id": "c1", "content": [
                                {"type": "text", "text": "part one"}, {"type": "image_url", "image_url": {"url": "x"}},
                                {"type": "text", "text": "part two"}]}], []),
    "tool_then_user": ([user("q"), asst("", "r", [call("search", '{"query": "x"}', "c1")]), tool("found", "c1"),
                        user("Thanks; also check y.")], DROP),
    "user_then_tool": ([user("q"), tool("a result with no call")], []),
    "agentic": (AGENT, DROP + EFFORT),
    "agentic_answered": (AGENT + [asst("Rome: 77F and sunny.", "Report it.")], DROP),
    "latest_reminder_before_reply": ([sys_(), user("q"), {"role": "latest_reminder", "content": "Be brief."},
                                      asst("a", "r")], []),
    "latest_reminder_last": ([sys_(), user("q"), {"role": "latest_reminder", "content": "Today is Monday."}], DROP),
    "latest_reminder_first": ([{"role": "latest_reminder", "content": "Context."}, user("q")], []),
    "task_action": ([sys_(), user("Find flights", task="action")], []),
    "task_query": ([sys_(), user("Find flights to Oslo", task="query")], []),
    "task_authority": ([user("Is this site reliable?", task="authority")], []),
    "task_domain": ([user("Which domain?", task="domain")], []),
    "task_title": ([user("Name this chat.", task="title")], []),
    "task_read_url": ([user("Read it.", task="read_url")], []),
    "task_answered": ([user("Find flights to Oslo", task="query"), asst("flights Oslo", "unused")], []),
    "task_action_answered": ([user("Find flights", task="action"), asst("search", "unused")], []),
    "task_then_user": ([user("Name it.", task="title"), user("More text.")], []),
    "task_then_tool": ([user("q", task="query"), tool("r")], []),
    "task_mid_conversation": ([user("q1", task="domain"), asst("travel"), user("q2"), asst("a2", "r2"), user("q3")], DROP),
    "wo_eos": ([user("q"), asst("The answer is", "r", wo_eos=True)], []),
}
# fmt: on


def option_sets(extra):
    return [{"thinking": False}, {"thinking": True}] + list(extra)


def cases():
    """(name, messages, options) for every fixture entry."""
    return [(f"{name}-{i}", msgs, opts) for name, (msgs, extra) in CONVERSATIONS.items()
            for i, opts in enumerate(option_sets(extra))]  # fmt: skip


# Malformed completions: (text, thinking, words the error must name). All are refused by the
# reference too, except the STRICTER ones: a tool-call block cut off right after a DSML tag, which
# the reference takes as complete.
D = "｜DSML｜"
GOOD_CALL = f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">x</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
# fmt: off
MALFORMED = [
    ("no end of sentence", False, ["without", EOS]),
    (f"reasoning only{EOS}", True, ["not closed by </think>", "end of the text"]),
    (f"r{GOOD_CALL}{EOS}", True, ["not closed by </think>", "tool-call block"]),
    (f"a{EOS}more", False, ["after", EOS, "character 2"]),
    (f"a{EOS}{EOS}", False, ["after", EOS]),
    (f"<think>r</think>a{EOS}", True, ["<think>", "follows the prompt"]),
    (f"a</think>b{EOS}", False, ["</think>", "content"]),
    (GOOD_CALL.replace(f"tool_calls>\n<{D}invoke", f"tool_calls>\nX<{D}invoke") + EOS, False, ["expected '>\\n'"]),
    (GOOD_CALL.replace('name="f">', 'nam="f">') + EOS, False, ["malformed invoke"]),
    (GOOD_CALL.replace('string="true"', 'string="yes"') + EOS, False, ["malformed parameter"]),
    (GOOD_CALL.replace("</｜DSML｜parameter>\n", "</｜DSML｜parameter>\n" + f'<{D}parameter name="a" string="true">y</{D}parameter>\n')
     + EOS, False, ["'a'", "twice"]),
    (GOOD_CALL + "trailing" + EOS, False, ["after the tool-call block"]),
    (GOOD_CALL[: GOOD_CALL.index(f"</{D}tool_calls>")], False, ["never closed", f"</{D}tool_calls>"]),
    (GOOD_CALL[: GOOD_CALL.index(f"</{D}parameter>") + 5], False, ["parameter", "never closed"]),
    (f"\n\n<{D}tool_calls>", False, ["never closed"]),
    (GOOD_CALL[: GOOD_CALL.index(f"</{D}invoke>") + len(f"</{D}invoke")], False, ["never closed"]),
    (f"\n\n<{D}tool_calls", False, ["never closed"]),
]
# fmt: on
STRICTER = {15, 16}


# ----------------------------------------------------------------------------- rendering


def load(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"cases": []}  # [] fails the cover test


RENDER_CASES = load(RENDER_FILE)["cases"]
PARSE_CASES = load(PARSE_FILE)["cases"]


def test_fixtures_cover_the_corpus():
    assert [c["name"] for c in RENDER_CASES] == [name for name, _, _ in cases()]
    for c, (_, msgs, opts) in zip(RENDER_CASES, cases()):
        assert c["messages"] == json.loads(json.dumps(msgs)) and c["options"] == opts, c["name"]


@pytest.mark.parametrize("case", RENDER_CASES, ids=[c["name"] for c in RENDER_CASES])
def test_render_matches_reference(case):
    assert render(copy.deepcopy(case["messages"]), **case["options"]) == case["expected"]


def test_apply_chat_template_is_the_same_renderer():
    tok = load_tokenizer()
    for case in RENDER_CASES:
        out = tok.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True, **case["options"])
        assert out == case["expected"] == render_chat(case["messages"], **case["options"]), case["name"]


def expected(name, i=0):
    return next(c for c in RENDER_CASES if c["name"] == f"{name}-{i}")["expected"]


def test_conveniences_render_as_their_reference_form():
    """What the reference's input form lacks, v4lens accepts and renders as that form would."""
    base = CONVERSATIONS["system_tools"][0]
    plain = [sys_(), base[1]]
    assert render(plain, tools=TOOLS) == expected("system_tools")
    assert render(plain, tools=[t["function"] for t in TOOLS]) == expected("system_tools")  # bare schemas
    assert render(plain[1:], tools=TOOLS) == expected("system_empty_tools")  # an empty system prompt is put first
    assert render([sys_(), user("Capital of Peru?")], response_format=SCHEMA) == expected("system_response_format")
    # Tool-call arguments as a dict (transformers' convention) render as their JSON string does.
    agent = copy.deepcopy(AGENT)
    for m in agent:
        for tc in m.get("tool_calls", []):
            tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
    assert render(agent, thinking=True) == expected("agentic", 1)
    assert load_tokenizer().apply_chat_template(agent, tools=None, tokenize=False, add_generation_prompt=True,
                                                thinking=True) == expected("agentic", 1)  # fmt: skip
    # List-of-blocks user content: one block per entry, joined as consecutive user messages are.
    blocks = [user([{"type": "text", "text": "first"}, {"type": "text", "text": "second"}])]
    assert render(blocks + CONVERSATIONS["consecutive_users"][0][2:]) == expected("consecutive_users")
    # continue_final_message leaves the last assistant message open, as wo_eos does.
    open_reply = [user("q"), asst("The answer is", "r")]
    for i, thinking in enumerate([False, True]):
        assert render(open_reply, thinking, continue_final_message=True) == expected("wo_eos", i)


def test_without_generation_prompt():
    for name in ("hello", "two_turns", "agentic", "developer_mid"):
        for i, thinking in enumerate([False, True]):
            full = expected(name, i)
            tail = ASSISTANT + (THINK_START if thinking else THINK_END)
            assert full.endswith(tail)
            assert render(CONVERSATIONS[name][0], thinking, add_generation_prompt=False) == full.removesuffix(tail)


@pytest.mark.parametrize("messages, options, error, words", [
    ([{"role": "robot", "content": "x"}], {}, ValueError, ["messages[0]", "'robot'"]),
    ([dev("")], {}, ValueError, ["messages[0] (developer)", "empty"]),
    ([user("q", tools=TOOLS)], {}, ValueError, ["messages[0] (user)", "'tools'"]),
    ([user("q", task="summary")], {}, ValueError, ["'summary'", "action"]),
    ([user("q")], {"reasoning_effort": "medium"}, ValueError, ["reasoning_effort", "'medium'"]),
    ([sys_(tools=TOOLS), user("q")], {"tools": TOOLS}, ValueError, ["tools", "once"]),
    ([user("q")], {"continue_final_message": True}, ValueError, ["continue_final_message", "assistant"]),
    ([asst("", calls=[{"function": {"arguments": "{}"}}])], {}, TypeError, ["tool_calls[0]", "name"]),
    ([user(3)], {}, TypeError, ["messages[0] (user)", "int"]),
    ("hello", {}, TypeError, ["messages", "list"]),
])  # fmt: skip
def test_render_errors_name_the_problem(messages, options, error, words):
    with pytest.raises(error) as info:
        render(messages, **options)
    for w in words:
        assert w in str(info.value)


def test_low_reasoning_effort_writes_nothing():
    """The reference knows only None / "high" / "max"; v4lens also takes "low" (no text, like "high")."""
    assert render([user("Hello")], True, reasoning_effort="low") == expected("hello", 4)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c["name"] for c in PARSE_CASES])
def test_parse_matches_reference(case):
    assert parse_completion(case["text"], case["thinking"]) == case["expected"]


def test_parse_inverts_render():
    """Each rendered assistant turn parses back to its content, reasoning and tool calls."""
    reply = asst("Here.", "Think.", [call("search", ARGS), call("get_weather", '{"city": "Oslo"}')])
    for thinking in (False, True):
        prompt = render([user("q")], thinking)
        text = render([user("q"), reply], thinking)[len(prompt):]
        out = parse_completion(text, thinking)
        assert out["content"] == "Here." and out["reasoning_content"] == ("Think." if thinking else "")
        assert [json.loads(c["function"]["arguments"]) for c in out["tool_calls"]] == [json.loads(ARGS), {"city": "Oslo"}]


@pytest.mark.parametrize("k", range(len(MALFORMED)))
def test_parse_errors_name_what_and_where(k):
    text, thinking, words = MALFORMED[k]
    with pytest.raises(DSMLError) as info:
        parse_completion(text, thinking)
    for w in words:
        assert w in str(info.value), (str(info.value), w)
    assert "character" in str(info.value)


# ----------------------------------------------------------------------------- the reference itself


def reference_module(path):
    spec = importlib.util.spec_from_file_location("encoding_dsv4_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_render(ref, msgs, opts):
    mode = "thinking" if opts.get("thinking") else "chat"
    return ref.encode_messages(copy.deepcopy(msgs), mode, drop_thinking=opts.get("drop_thinking", True),
                               reasoning_effort=opts.get("reasoning_effort"))  # fmt: skip


def reference_parse_cases(ref):
    """Every distinct assistant turn of the corpus as a completion, and the reference's parse of it."""
    out, seen = [], set()
    for name, (msgs, _) in CONVERSATIONS.items():
        for k, m in enumerate(msgs):
            if m["role"] != "assistant" or m.get("wo_eos"):
                continue
            for mode in ("chat", "thinking"):
                prompt = ref.encode_messages([user("x")], mode)
                text = ref.encode_messages([user("x"), m], mode)[len(prompt):]
                if (text, mode) not in seen:
                    seen.add((text, mode))
                    out.append({"name": f"{name}-{k}-{mode}", "text": text, "thinking": mode == "thinking",
                                "expected": ref.parse_message_from_completion_text(text, mode)})  # fmt: skip
    return out


REFERENCE = os.environ.get("V4LENS_DSV4_ENCODING")


@pytest.mark.skipif(not REFERENCE, reason="set V4LENS_DSV4_ENCODING to DeepSeek's encoding_dsv4.py to check the fixtures")
def test_fixtures_are_the_reference_output():
    ref = reference_module(REFERENCE)
    for case, (name, msgs, opts) in zip(RENDER_CASES, cases()):
        assert reference_render(ref, msgs, opts) == case["expected"], name
    assert reference_parse_cases(ref) == PARSE_CASES
    for k, (text, thinking, _) in enumerate(MALFORMED):
        mode = "thinking" if thinking else "chat"
        if k in STRICTER:
            ref.parse_message_from_completion_text(text, mode)  # accepted there, refused here
        else:
            with pytest.raises((AssertionError, ValueError)):
                ref.parse_message_from_completion_text(text, mode)


def write_fixtures(path):
    ref = reference_module(path)
    source = "DeepSeek's encoding_dsv4.py (DeepSeek-V4 release, encoding/encoding_dsv4.py)"
    render_cases = [{"name": name, "messages": msgs, "options": opts, "expected": reference_render(ref, msgs, opts)}
                    for name, msgs, opts in cases()]  # fmt: skip
    FIXTURES.mkdir(exist_ok=True)
    for file, data in ((RENDER_FILE, render_cases), (PARSE_FILE, reference_parse_cases(ref))):
        text = json.dumps({"source": source, "cases": data}, ensure_ascii=False, indent=1)
        file.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_fixtures(sys.argv[1])
