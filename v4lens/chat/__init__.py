"""DeepSeek-V4's chat format: render a conversation, parse a completion, label every token.

    from v4lens import chat
    text = chat.render(messages, thinking=True, tools=tools)      # the prompt, as DeepSeek's encoder writes it
    reply = chat.parse_completion(completion, thinking=True)      # {"content", "reasoning_content", "tool_calls"}
    seg = chat.segments(messages, model, thinking=True)           # each token's role / part / turn / tool
    seg.mask("tool_result")                                       # bool [S] over the prompt's tokens

docs/chat.md describes every role, field and rule.
"""

from .format import TASK_TOKENS
from .parse import DSMLError, parse_completion
from .render import ROLES, Piece, render, render_pieces
from .segments import Segment, Segments, segments

__all__ = [
    "ROLES", "TASK_TOKENS", "DSMLError", "Piece", "Segment", "Segments", "parse_completion", "render", "render_pieces",
    "segments",
]  # fmt: skip
