"""The V4 tokenizer's ``apply_chat_template``, done by v4lens's Python renderer.

Some rules of V4's format (a JSON-string argument parsed, tool results put in call order, the
task markers) do not fit a Jinja template, so the tokenizer renders in Python (``render.py``) and
its ``chat_template`` only splices the rendered pieces: transformers then tokenizes, batches,
pads and builds ``return_assistant_tokens_mask`` as it does for any template. Used on a plain
conversation by anything but v4lens (a tokenizer saved and reloaded elsewhere), the template
refuses with a message saying so rather than render something else.
"""

from __future__ import annotations

from .render import render_pieces

# Each message here is one rendered piece: {"role": "v4lens", "content": text, "generation": bool}.
PIECES_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role != 'v4lens' -%}{{- raise_exception('The DeepSeek-V4 prompt format is rendered in Python by "
    "v4lens: use v4lens.load_tokenizer().apply_chat_template(...) or v4lens.chat.render(messages)') -}}{%- endif -%}"
    "{%- if m.generation -%}{% generation %}{{- m.content -}}{% endgeneration %}"
    "{%- else -%}{{- m.content -}}{%- endif -%}"
    "{%- endfor -%}"
)

RENDER_OPTIONS = ("thinking", "enable_thinking", "drop_thinking", "reasoning_effort", "response_format")
# apply_chat_template's own arguments, passed on to transformers unchanged.
TOKENIZE_OPTIONS = ("tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
                    "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens")  # fmt: skip


def piece_conversations(conversation, tools, documents, add_generation_prompt, continue_final_message,
                        default_thinking: bool, kwargs: dict) -> tuple[list, dict]:  # fmt: skip
    """(the conversation(s) as rendered pieces for ``PIECES_TEMPLATE``, the kwargs left for transformers)."""
    unknown = sorted(set(kwargs) - set(RENDER_OPTIONS) - set(TOKENIZE_OPTIONS))
    if unknown:
        raise TypeError(f"apply_chat_template: unknown argument(s) {unknown}; the V4 format takes "
                        f"{', '.join(RENDER_OPTIONS)} and tools")  # fmt: skip
    if documents is not None:
        raise ValueError("apply_chat_template: the V4 format has no documents; put them in a message")
    if kwargs.get("sanitize_control_tokens"):
        raise ValueError("apply_chat_template: sanitize_control_tokens is not supported by the V4 renderer")
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    if continue_final_message not in (False, True):
        raise ValueError("continue_final_message: only True is supported (the last assistant message is left "
                         f"open), got {continue_final_message!r}")  # fmt: skip
    options = {k: kwargs.pop(k) for k in RENDER_OPTIONS if k in kwargs}
    thinking = options.pop("thinking", None)
    enable = options.pop("enable_thinking", None)
    thinking = thinking if thinking is not None else enable if enable is not None else default_thinking
    options = {k: v for k, v in options.items() if v is not None}
    batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))  # fmt: skip
    convs = []
    for conv in conversation if batched else [conversation]:
        pieces = render_pieces(getattr(conv, "messages", conv), bool(thinking), add_generation_prompt, tools=tools,
                               continue_final_message=bool(continue_final_message), **options)  # fmt: skip
        convs.append([{"role": "v4lens", "content": p.text, "generation": p.role == "assistant" and p.part != "opening"}
                      for p in pieces])  # fmt: skip
    return (convs if batched else convs[0]), kwargs
