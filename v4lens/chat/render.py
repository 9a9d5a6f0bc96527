"""Render a conversation to DeepSeek-V4's prompt text, as labelled pieces.

This is the one implementation of the V4 prompt format in v4lens: ``render`` (the prompt string),
``v4lens.tokenizer.render_chat``, the tokenizer's ``apply_chat_template`` and ``segments`` (the
token spans of each part) all join or read the same ``Piece`` list. It follows DeepSeek's
reference encoder (``encoding_dsv4.py``) step by step, so the text is byte-for-byte the same:

1. normalise: top-level ``tools`` / ``response_format`` go on the first system message (an empty
   one is put first when there is none), list-of-blocks content is flattened, tool-call arguments
   become dicts;
2. merge: ``tool`` results and consecutive ``user`` messages fold into one user turn (V4 has no
   tool role: results are ``<tool_result>`` blocks of a user turn), tool results are put in the
   order of the calls they answer (by ``tool_call_id``);
3. drop (thinking mode with ``drop_thinking``, and no tools anywhere): developer messages before
   the last user turn vanish and earlier assistant turns lose their reasoning;
4. write each message, then the transition to the assistant (``<｜Assistant｜>`` + ``<think>`` or
   ``</think>``, or a task marker) after a user/developer turn that an assistant turn follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import format as F
from . import inputs

ROLES = ("system", "user", "developer", "assistant", "tool", "latest_reminder")


@dataclass(frozen=True)
class Piece:
    """A run of rendered text and what it is. ``role``: the message role it belongs to ("template"
    for BOS and the reasoning-effort paragraph); ``part``: what the text is ("marker" for the
    format's own markup, "opening" for the ``<｜Assistant｜>`` + ``<think>``/``</think>`` that opens
    a reply (written by the prompt, not the model), else "system", "user", "developer", "tool_result", "reminder",
    "task", "thinking", "content", "tool_name", "argument_name", "argument", "tools", "tool_schema",
    "response_format", "reasoning_effort"); ``message``: index into the caller's messages (None
    for text no message wrote); ``turn``: how many assistant messages come before that message."""

    text: str
    role: str
    part: str
    message: int | None
    turn: int = 0
    tool: str | None = None  # the tool a call, argument, schema or result is about
    call: int | None = None  # which call of its assistant message (a result: the call it answers)
    argument: str | None = None  # the argument's name (its name, value and markup)

    def labels(self) -> tuple:
        return (self.role, self.part, self.message, self.turn, self.tool, self.call, self.argument)


def render(messages, thinking: bool = False, add_generation_prompt: bool = True, **options) -> str:
    """The V4 prompt string (BOS included) of ``messages``; ``options`` as for ``render_pieces``."""
    return "".join(p.text for p in render_pieces(messages, thinking, add_generation_prompt, **options))


def render_pieces(
    messages,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    *,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    tools: list | None = None,
    response_format: Any = None,
    continue_final_message: bool = False,
) -> list[Piece]:
    """The prompt of ``messages`` as labelled pieces (their texts joined are the prompt).

    ``thinking``: thinking mode (``<think>`` opens each reply) or chat mode (``</think>``).
    ``add_generation_prompt``: end with the opening of the assistant's reply (the reference always
    does); False leaves the last message as it is. ``drop_thinking``: see the module doc.
    ``reasoning_effort``: None, "low", "high" or "max"; only "max" in thinking mode writes text.
    ``tools`` / ``response_format``: put on the first system message. ``continue_final_message``:
    the last (assistant) message is left open, without EOS, for the model to continue it.
    """
    if reasoning_effort not in F.REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {F.REASONING_EFFORTS}, got {reasoning_effort!r}")
    msgs = _normalise(messages, tools, response_format, continue_final_message)
    turns = _merge(msgs)
    _sort_tool_results(turns)
    drop = drop_thinking and not any(m.get("tools") for m in turns)  # tools anywhere keep every turn's reasoning
    if thinking and drop:
        turns = _drop(turns)
    n_assistant = sum(m["role"] == "assistant" for m in msgs)
    out = _Writer(turns, thinking, drop)
    out.add(F.BOS, "template", "marker", None)
    for i, m in enumerate(turns):
        out.turn = m["turn"]
        if i == 0 and thinking and reasoning_effort == "max":
            out.add(F.REASONING_EFFORT_MAX, "template", "reasoning_effort", None)
        getattr(out, m["role"])(m, i)
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if nxt is None and not add_generation_prompt:
            continue
        if nxt is None or nxt["role"] in ("assistant", "latest_reminder"):
            reply = nxt["index"] if nxt is not None and nxt["role"] == "assistant" else None
            out.transition(m, i, reply, n_assistant if nxt is None else m["turn"])
    return out.pieces


# ----------------------------------------------------------------------------- normalise, merge, drop


def _normalise(messages, tools, response_format, continue_final_message) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    msgs, n_assistant = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with a 'role', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; the V4 format knows {', '.join(ROLES)}")
        for key in ("tools", "response_format"):
            if m.get(key) and role not in ("system", "developer"):
                raise ValueError(f"messages[{i}] ({role}) has {key!r}: the format writes them only in a system "
                                 "or developer message (or pass them to the renderer as arguments)")  # fmt: skip
        if m.get("task") is not None and m["task"] not in F.TASK_TOKENS:
            raise ValueError(f"messages[{i}] has task {m['task']!r}; the tasks are {', '.join(F.TASK_TOKENS)}")
        msg = {"role": role, "index": i, "turn": n_assistant, "task": m.get("task"), "tools": m.get("tools"),
               "response_format": m.get("response_format"), "wo_eos": bool(m.get("wo_eos"))}  # fmt: skip
        where = f"messages[{i}] ({role})"
        if role == "user":
            msg["blocks"] = [inputs.block("text", t, i) for t in inputs.user_texts(m.get("content"), where)]
        elif role == "tool":
            result = inputs.text(m.get("content"), where)
            msg["blocks"] = [inputs.block("tool_result", result, i, m.get("tool_call_id") or "", m.get("name"))]
        else:
            msg["content"] = inputs.text(m.get("content"), where)
        if role == "developer" and not msg["content"]:
            raise ValueError(f"{where} has no content: the format refuses an empty developer message")
        if role == "assistant":
            msg["reasoning"] = inputs.text(m.get("reasoning_content"), f"{where} reasoning_content")
            calls = m.get("tool_calls") or []
            msg["tool_calls"] = [inputs.tool_call(tc, f"{where} tool_calls[{k}]") for k, tc in enumerate(calls)]
            n_assistant += 1
        msgs.append(msg)
    if continue_final_message:
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs an assistant message last (the reply to continue)")
        msgs[-1]["wo_eos"] = True
    if tools or response_format:  # the conventional top-level arguments belong to the system prompt
        if msgs and msgs[0]["role"] == "system":
            for key, value in (("tools", tools), ("response_format", response_format)):
                if value and msgs[0][key]:
                    raise ValueError(f"{key} given both as an argument and on messages[0] (system): give them once")
                msgs[0][key] = msgs[0][key] or value
        else:
            msgs.insert(0, {"role": "system", "index": None, "turn": 0, "content": "", "task": None, "tools": tools,
                            "response_format": response_format, "wo_eos": False})  # fmt: skip
    return msgs


def _merge(msgs: list[dict]) -> list[dict]:
    """Fold tool results and consecutive user messages into one user turn. A user message that
    carries a task starts its own turn and later user messages do not join it; tool results do."""
    turns: list[dict] = []
    for m in msgs:
        if m["role"] not in ("user", "tool"):
            turns.append(m)
            continue
        prev = turns[-1] if turns else None
        if prev is not None and prev["role"] == "user" and (m["role"] == "tool" or prev["task"] is None):
            prev["blocks"] = prev["blocks"] + m["blocks"]
        else:
            task = m["task"] if m["role"] == "user" else None
            turns.append({**m, "role": "user", "task": task})
    return turns


def _sort_tool_results(turns: list[dict]) -> None:
    """Put each turn's tool results in the order of the calls they answer (by call id; the order
    comes from the latest assistant message that made calls, unknown ids sort first, stably).
    Also name each result after its call: by id, else by its own "name", else by position."""
    order: dict[str, int] = {}
    calls: list[dict] = []
    for m in turns:
        if m["role"] == "assistant":
            calls = m["tool_calls"]
            if calls:
                order = {tc["id"]: k for k, tc in enumerate(calls) if tc["id"]}
        elif m["role"] == "user":
            slots = [k for k, b in enumerate(m["blocks"]) if b["kind"] == "tool_result"]
            blocks = list(m["blocks"])
            if len(slots) > 1 and order:
                ranked = sorted((blocks[k] for k in slots), key=lambda b: order.get(b["call_id"], 0))
                for k, b in zip(slots, ranked):
                    blocks[k] = b
            ids = {tc["id"]: k for k, tc in enumerate(calls) if tc["id"]}
            for pos, k in enumerate(slots):
                b = blocks[k] = dict(blocks[k])
                b["call"] = ids.get(b["call_id"]) if b["call_id"] else None
                if b["call"] is None and b["name"] is None and pos < len(calls):
                    b["call"] = pos
                b["tool"] = calls[b["call"]]["name"] if b["call"] is not None else b["name"]
            m["blocks"] = blocks


def _last_user(turns: list[dict]) -> int:
    return max((k for k, m in enumerate(turns) if m["role"] in ("user", "developer")), default=-1)


def _drop(turns: list[dict]) -> list[dict]:
    last = _last_user(turns)
    kept = []
    for k, m in enumerate(turns):
        if k >= last or m["role"] in ("user", "system", "latest_reminder"):
            kept.append(m)
        elif m["role"] == "assistant":
            kept.append({**m, "reasoning": ""})
        # a developer message before the last user turn is dropped
    return kept


# ----------------------------------------------------------------------------- writing


class _Writer:
    """Writes each kind of message as pieces (one method per merged role)."""

    def __init__(self, turns: list[dict], thinking: bool, drop: bool):
        self.turns, self.thinking, self.drop, self.last_user = turns, thinking, drop, _last_user(turns)
        self.pieces: list[Piece] = []
        self.turn = 0

    def add(self, text: str, role: str, part: str, message: int | None, **labels) -> None:
        if text:
            self.pieces.append(Piece(text, role, part, message, self.turn, **labels))

    def system(self, m: dict, i: int) -> None:
        self.add(m["content"], "system", "system", m["index"])
        self._instructions(m, "system")

    def developer(self, m: dict, i: int) -> None:
        self.add(F.USER, "developer", "marker", m["index"])
        self.add(m["content"], "developer", "developer", m["index"])
        self._instructions(m, "developer")

    def _instructions(self, m: dict, role: str) -> None:
        """The tools block (one schema per line) and the response-format block of a message."""
        at = m["index"]
        if m["tools"]:
            self.add("\n\n", role, "marker", at)
            self.add(F.TOOLS_HEAD, role, "tools", at)
            for k, tool in enumerate(m["tools"]):
                schema = inputs.schema(tool)
                self.add("\n" if k else "", role, "tools", at)
                self.add(F.to_json(schema), role, "tool_schema", at, tool=schema.get("name"))
            self.add(F.TOOLS_TAIL, role, "tools", at)
        if m["response_format"]:
            self.add("\n\n", role, "marker", at)
            self.add(F.RESPONSE_FORMAT_HEAD + F.to_json(m["response_format"]), role, "response_format", at)

    def user(self, m: dict, i: int) -> None:
        first = m["blocks"][0]
        self.add(F.USER, "user" if first["kind"] == "text" else "tool", "marker", first["index"])
        for k, b in enumerate(m["blocks"]):
            role = "user" if b["kind"] == "text" else "tool"
            self.add("\n\n" if k else "", role, "marker", b["index"])
            if b["kind"] == "text":
                self.add(b["text"], "user", "user", b["index"])
                continue
            labels = {"tool": b["tool"], "call": b["call"]}
            self.add(F.TOOL_RESULT_OPEN, "tool", "marker", b["index"], **labels)
            self.add(b["text"], "tool", "tool_result", b["index"], **labels)
            self.add(F.TOOL_RESULT_CLOSE, "tool", "marker", b["index"], **labels)

    def latest_reminder(self, m: dict, i: int) -> None:
        self.add(F.LATEST_REMINDER, "latest_reminder", "marker", m["index"])
        self.add(m["content"], "latest_reminder", "reminder", m["index"])

    def assistant(self, m: dict, i: int) -> None:
        at, role = m["index"], "assistant"
        after_task = i > 0 and self.turns[i - 1]["task"] is not None  # a task's answer has no thinking
        if self.thinking and not after_task and (not self.drop or i > self.last_user):
            self.add(m["reasoning"], role, "thinking", at)
            self.add(F.THINK_END, role, "marker", at)
        self.add(m["content"], role, "content", at)
        if m["tool_calls"]:
            self.add("\n\n" + F.CALLS_OPEN + "\n", role, "marker", at)
            for k, tc in enumerate(m["tool_calls"]):
                call = {"tool": tc["name"], "call": k}
                self.add("\n" if k else "", role, "marker", at)
                self.add(F.INVOKE_OPEN + ' name="', role, "marker", at, **call)
                self.add(tc["name"], role, "tool_name", at, **call)
                self.add('">\n', role, "marker", at, **call)
                for j, (key, value) in enumerate(tc["arguments"].items()):
                    is_str = isinstance(value, str)
                    arg = {**call, "argument": str(key)}
                    self.add("\n" if j else "", role, "marker", at, **call)
                    self.add(F.PARAM_OPEN + ' name="', role, "marker", at, **arg)
                    self.add(str(key), role, "argument_name", at, **arg)
                    self.add(f'" string="{"true" if is_str else "false"}">', role, "marker", at, **arg)
                    self.add(value if is_str else F.to_json(value), role, "argument", at, **arg)
                    self.add(F.PARAM_CLOSE, role, "marker", at, **arg)
                self.add("\n" + F.INVOKE_CLOSE, role, "marker", at, **call)
            self.add("\n" + F.CALLS_CLOSE, role, "marker", at)
        if not m["wo_eos"]:
            self.add(F.EOS, role, "marker", at)

    def transition(self, m: dict, i: int, reply: int | None, turn: int) -> None:
        """What follows a message that an assistant turn (or the generation prompt) comes after."""
        first = m["blocks"][0] if m["role"] == "user" else m
        at, role = first["index"], ("tool" if m["role"] == "user" and first["kind"] != "text" else m["role"])
        self.turn = turn
        if m["task"] is not None:
            if m["task"] != "action":  # other tasks: the marker right after the message
                self.add(F.TASK_TOKENS[m["task"]], role, "task", at)
                return
            self.add(F.ASSISTANT + (F.THINK_START if self.thinking else F.THINK_END), "assistant", "opening", reply)
            self.add(F.TASK_TOKENS["action"], role, "task", at)
        elif m["role"] in ("user", "developer"):
            opens = self.thinking and (not self.drop or i >= self.last_user)
            self.add(F.ASSISTANT + (F.THINK_START if opens else F.THINK_END), "assistant", "opening", reply)


__all__ = ["ROLES", "Piece", "render", "render_pieces"]
