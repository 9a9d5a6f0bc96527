"""Message fields as the renderer reads them: content as text, tool calls with parsed arguments,
tool schemas. Each error names the message (``messages[i] (role)``) and the field."""

from __future__ import annotations

import json
from collections.abc import Mapping


def block(kind: str, content: str, index: int, call_id: str = "", name: str | None = None) -> dict:
    """One block of a (merged) user turn: a user's text or a tool's result."""
    return {"kind": kind, "text": content, "index": index, "call_id": call_id, "name": name}


def text(content, where: str) -> str:
    """A message's content as text; a list of blocks joins its texts with a blank line."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "\n\n".join(user_texts(content, where))
    raise TypeError(f"{where}: content must be a string or a list of content blocks, got {type(content).__name__}")


def user_texts(content, where: str) -> list[str]:
    """A user message's content as text blocks: list content keeps one block per entry (the format
    joins a user turn's blocks with a blank line); a block that is not text is named, not dropped."""
    if not isinstance(content, (list, tuple)):
        return [text(content, where)]
    texts = []
    for k, b in enumerate(content):
        if isinstance(b, str):
            texts.append(b)
        elif isinstance(b, Mapping):
            texts.append(b.get("text") or "" if b.get("type") == "text" else f"[Unsupported {b.get('type')}]")
        else:
            raise TypeError(f"{where}: content[{k}] must be a dict block or a string, got {type(b).__name__}")
    return texts


def tool_call(tc, where: str) -> dict:
    """{"name", "arguments": dict, "id"} from an OpenAI-style call ({"function": {...}}) or a flat one.
    Arguments given as a JSON string are parsed; one that is not a JSON object is passed whole as
    the single argument "arguments" (the reference's rule); a dict is taken as already parsed."""
    if not isinstance(tc, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(tc).__name__}")
    f = tc["function"] if isinstance(tc.get("function"), Mapping) else tc
    name, raw = f.get("name"), f.get("arguments")
    if not isinstance(name, str):
        raise TypeError(f"{where} has no function name: 'name' must be a string, got {name!r}")
    if raw is None:
        args = {}
    elif isinstance(raw, Mapping):
        args = dict(raw)
    elif isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else {"arguments": raw}
    else:
        raise TypeError(f"{where} arguments must be a JSON string or a dict, got {type(raw).__name__}")
    return {"name": name, "arguments": args, "id": tc.get("id") or f.get("id") or ""}


def schema(tool) -> dict:
    """A tool's function schema: OpenAI-style {"type": "function", "function": {...}}, the bare
    function dict, or a Python function with type hints and a docstring (transformers' convention)."""
    if callable(tool) and not isinstance(tool, Mapping):
        from transformers.utils import get_json_schema

        tool = get_json_schema(tool)
    if not isinstance(tool, Mapping):
        raise TypeError(f"a tool must be a JSON schema dict or a function, got {type(tool).__name__}")
    return dict(tool["function"]) if isinstance(tool.get("function"), Mapping) else dict(tool)
