"""Parse a V4 completion back into reasoning, content and tool calls.

A completion is what the model writes after the prompt's ``<｜Assistant｜><think>`` (thinking mode)
or ``<｜Assistant｜></think>`` (chat mode)::

    [reasoning</think>]content[\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>]<｜end▁of▁sentence｜>

The result is the reference parser's (``parse_message_from_completion_text`` in DeepSeek's
``encoding_dsv4.py``): the same dict for every well-formed completion, with the tool calls in
OpenAI's format and their arguments as a JSON string. A completion that does not follow the format
raises ``DSMLError`` naming what is wrong and the character where it is. The end-of-sentence token
may be missing after a tool-call block (generation often stops there) but not after plain content.
"""

from __future__ import annotations

import re

from . import format as F

CALLS_START = "\n\n" + F.CALLS_OPEN[:-1]  # "\n\n<｜DSML｜tool_calls": its ">\n" is checked on its own
INVOKE_END = F.INVOKE_CLOSE[:-1]  # "</｜DSML｜invoke": its ">\n" is checked on its own
PARAM_END = "/" + F.DSML + "parameter"  # the value's closing "<" and ">" are checked on their own
_NAME = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
_PARAM = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)


class DSMLError(ValueError):
    """A completion that does not follow V4's format (its message names what and where)."""


def parse_completion(text: str, thinking: bool = False) -> dict:
    """{"role": "assistant", "content", "reasoning_content", "tool_calls"} of a completion.

    ``thinking``: the prompt ended with ``<think>``, so the completion starts with the reasoning
    and must close it with ``</think>``. Each tool call is ``{"type": "function", "function":
    {"name": ..., "arguments": "<JSON object>"}}``: string parameters (``string="true"``) are
    JSON-quoted, the others copied as written.

        >>> parse_completion("Hi<｜end▁of▁sentence｜>")["content"]   # 'Hi'
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_completion: text must be a str, got {type(text).__name__}")
    reasoning, i = "", 0
    if thinking:
        pos, stop = _find(text, 0, [F.THINK_END, CALLS_START])
        if stop != F.THINK_END:
            found = "a tool-call block" if stop else "the end of the text"
            raise DSMLError(f"thinking mode: the reasoning is not closed by {F.THINK_END} before {found} "
                            f"{_at(text, pos)}")  # fmt: skip
        reasoning, i = text[:pos], pos + len(stop)
    content_at = i
    pos, stop = _find(text, i, [F.EOS, CALLS_START])
    content, calls = text[i:pos], []
    if stop is None:
        raise DSMLError(f"the completion ends without {F.EOS} (and has no tool-call block) {_at(text, pos)}: "
                        "was it cut off?")  # fmt: skip
    i = pos + len(stop)
    if stop == CALLS_START:
        calls, i = _tool_calls(text, i, block_at=pos + 2)
        pos, stop = _find(text, i, [F.EOS])
        if pos != i:
            raise DSMLError(f"text after the tool-call block {_at(text, i)}: only {F.EOS} may follow it")
        i = pos + len(stop or "")
    if i != len(text):
        raise DSMLError(f"text after {F.EOS} {_at(text, i)}: the completion must end there")
    for name, part, start in (("content", content, content_at), ("reasoning", reasoning, 0)):
        for token in (F.BOS, F.EOS, F.THINK_START, F.THINK_END, F.DSML):
            if token in part:
                raise DSMLError(f"the {name} holds the special token {token!r} {_at(text, start + part.index(token))}"
                                + (": pass only what follows the prompt's <think>" if token == F.THINK_START else ""))
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}


def _tool_calls(text: str, i: int, block_at: int) -> tuple[list[dict], int]:
    """The calls of a ``<｜DSML｜tool_calls>`` block whose ">\\n" starts at ``i``; returns them and
    the index after ``</｜DSML｜tool_calls>``."""
    calls, after = [], "<" + F.DSML + "tool_calls"
    while True:
        pos, stop = _find(text, i, [F.INVOKE_OPEN, F.CALLS_CLOSE])
        if stop is None:
            raise DSMLError(f"the tool-call block {_at(text, block_at)} is never closed by {F.CALLS_CLOSE}")
        if text[i:pos] != ">\n":
            raise DSMLError(f"expected '>\\n' after {after} {_at(text, i)}, found {text[i:pos][:60]!r}")
        if stop == F.CALLS_CLOSE:
            return calls, pos + len(stop)
        invoke_at, i = pos, pos + len(stop)
        pos, stop = _find(text, i, [F.PARAM_OPEN, INVOKE_END])
        if stop is None:
            raise DSMLError(f"the invoke {_at(text, invoke_at)} is never closed by {F.INVOKE_CLOSE}")
        name = _NAME.match(text[i:pos])
        if name is None:
            raise DSMLError(f"malformed invoke {_at(text, invoke_at)}: expected ' name=\"TOOL\">\\n', found "
                            f"{text[i:pos][:60]!r}")  # fmt: skip
        args: dict[str, tuple[str, str]] = {}
        while stop == F.PARAM_OPEN:
            param_at, i = pos, pos + len(stop)
            end = text.find(PARAM_END, i)
            if end < 0:
                raise DSMLError(f"the parameter {_at(text, param_at)} is never closed by {F.PARAM_CLOSE}")
            body = _PARAM.match(text[i:end])
            if body is None:
                raise DSMLError(f"malformed parameter {_at(text, param_at)}: expected ' name=\"KEY\" "
                                f"string=\"true|false\">VALUE', found {text[i:end][:60]!r}")  # fmt: skip
            key, is_str, value = body.groups()
            if key in args:
                raise DSMLError(f"the parameter {key!r} {_at(text, param_at)} is given twice in this invoke")
            args[key] = (value, is_str)
            i = end + len(PARAM_END)
            pos, stop = _find(text, i, [F.PARAM_OPEN, INVOKE_END])
            if stop is None:
                raise DSMLError(f"the invoke {_at(text, invoke_at)} is never closed by {F.INVOKE_CLOSE}")
            if text[i:pos] != ">\n":
                raise DSMLError(f"expected '>\\n' after {F.PARAM_CLOSE[:-1]} {_at(text, i)}, found "
                                f"{text[i:pos][:60]!r}")  # fmt: skip
        i, after = pos + len(stop), INVOKE_END
        arguments = ", ".join(f"{F.to_json(k)}: {F.to_json(v) if s == 'true' else v}" for k, (v, s) in args.items())
        calls.append({"type": "function", "function": {"name": name.group(1), "arguments": "{" + arguments + "}"}})


def _find(text: str, start: int, stops: list[str]) -> tuple[int, str | None]:
    """(position, which) of the earliest of ``stops`` at or after ``start``; (len(text), None) if none."""
    best, which = len(text), None
    for s in stops:
        pos = text.find(s, start)
        if 0 <= pos < best:
            best, which = pos, s
    return best, which


def _at(text: str, pos: int) -> str:
    """'at character N (near '...')' for error messages."""
    return f"at character {pos} (near {text[max(0, pos - 20) : pos + 30]!r})"
