"""Label every token of a rendered V4 conversation with the part of the conversation it belongs to.

    seg = v4lens.chat.segments(messages, thinking=True)     # or segments(messages, model)
    seg.ids                                 # the token ids of the rendered prompt (no second BOS)
    seg.to_pandas()                         # one row per span: start, stop, role, part, turn, tool, ...
    seg.mask("tool_result")                 # bool [S]: every token of every tool result
    seg.mask(part="argument", tool="search")  # the argument values of every call to `search`
    seg.positions("thinking")               # the positions of the reasoning tokens

The spans come from the renderer itself (``render_pieces``: each piece of text is written with its
labels), so they are exact, and from the fast tokenizer's character offsets. The rows tile the
tokens: in order, no gaps, no overlaps. A token that straddles two parts (byte-level BPE merges
``>{"`` across ``<tool_result>`` and a JSON result, say) goes to the part its first character is
in, except that a token starting in the format's own markup and reaching into a part of the
conversation goes to that part: every token that carries text of a message is labelled with it.
A part that owns no token (an empty content, or one swallowed by such a token) has no row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch

from .render import Piece, render_pieces


@dataclass(frozen=True)
class Segment:
    """One span of tokens ``[start, stop)`` and what it is (see ``Piece`` for the labels)."""

    start: int
    stop: int
    role: str
    part: str
    message: int | None
    turn: int
    tool: str | None
    call: int | None
    argument: str | None
    text: str  # the rendered text of the part
    char_start: int  # where that text is in the rendered prompt
    char_stop: int


class Segments(Sequence):
    """The spans of a rendered conversation: a sequence of ``Segment`` rows, plus the prompt's
    ``text``, token ``ids`` and per-token helpers. Filters take ``kind`` (a part or a role name:
    "tool_result", "thinking", "assistant", ...) and/or field=value pairs (a list, tuple or set of
    values matches any of them)."""

    def __init__(self, rows: list[Segment], text: str, ids: list[int], tokenizer):
        self.rows, self.text, self.ids, self.tokenizer = rows, text, ids, tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self) -> str:
        parts = sorted({r.part for r in self.rows})
        return f"Segments({len(self.rows)} spans over {len(self.ids)} tokens; parts: {', '.join(parts)})"

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def str_tokens(self) -> list[str]:
        """Each token decoded on its own, as ``model.to_str_tokens`` gives them."""
        return [self.tokenizer.decode([i]) for i in self.ids]

    def tokens(self) -> torch.Tensor:
        """The ids as a [1, S] tensor, ready for ``model(...)`` / ``run_with_cache``."""
        return torch.tensor([self.ids])

    def select(self, kind: str | None = None, **where) -> list[Segment]:
        """The rows matching ``kind`` (part or role) and every ``field=value``."""
        names = {f.name for f in fields(Segment)}
        unknown = sorted(set(where) - names)
        if unknown:
            raise TypeError(f"Segments.select: unknown field(s) {unknown}; the fields are {sorted(names)}")

        def hit(value, want) -> bool:
            return value in want if isinstance(want, (list, tuple, set, frozenset)) else value == want

        return [r for r in self.rows if (kind is None or kind in (r.part, r.role))
                and all(hit(getattr(r, k), v) for k, v in where.items())]  # fmt: skip

    def mask(self, kind: str | None = None, **where) -> torch.Tensor:
        """bool [S]: True at the tokens of the matching rows."""
        out = torch.zeros(len(self.ids), dtype=torch.bool)
        for r in self.select(kind, **where):
            out[r.start : r.stop] = True
        return out

    def positions(self, kind: str | None = None, **where) -> torch.Tensor:
        """long [n]: the token positions of the matching rows, in order."""
        return self.mask(kind, **where).nonzero().flatten()

    def labels(self, field: str = "part") -> list:
        """One value of ``field`` per token (e.g. to colour a token axis by part or role)."""
        out = [None] * len(self.ids)
        for r in self.rows:
            out[r.start : r.stop] = [getattr(r, field)] * (r.stop - r.start)
        return out

    def records(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def to_pandas(self):
        """A DataFrame with one row per span (nullable integer columns for message and call)."""
        import pandas as pd

        df = pd.DataFrame(self.records(), columns=[f.name for f in fields(Segment)])
        return df.astype({"message": "Int64", "call": "Int64"})


def segments(messages, tokenizer=None, thinking: bool = False, add_generation_prompt: bool = True,
             **options) -> Segments:  # fmt: skip
    """Render ``messages`` (as ``v4lens.chat.render`` does, same options) and label each token.

    ``tokenizer``: the V4 tokenizer (default ``v4lens.load_tokenizer()``), or a model whose
    ``.tokenizer`` to use. The ids are what ``model.to_tokens(text, prepend_bos=False)`` gives.
    """
    if tokenizer is None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    elif not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        tokenizer = tokenizer.tokenizer  # a HookedV4
    pieces = _join_alike(render_pieces(messages, thinking, add_generation_prompt, **options))
    text = "".join(p.text for p in pieces)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p.text))
    owner = [_owner(pieces, starts, a, b) for a, b in offsets]  # the piece each token belongs to
    rows, t = [], 0
    while t < len(ids):
        end = t
        while end < len(ids) and owner[end] == owner[t]:
            end += 1
        p = pieces[owner[t]]
        rows.append(Segment(t, end, p.role, p.part, p.message, p.turn, p.tool, p.call, p.argument, p.text,
                            starts[owner[t]], starts[owner[t] + 1]))  # fmt: skip
        t = end
    return Segments(rows, text, ids, tokenizer)


def _join_alike(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces with the same labels become one (``<｜Assistant｜>`` + ``</think>``, say)."""
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].labels() == p.labels():
            q = out[-1]
            out[-1] = Piece(q.text + p.text, *q.labels())
        else:
            out.append(p)
    return out


def _owner(pieces: list[Piece], starts: list[int], a: int, b: int) -> int:
    """The piece a token with characters [a, b) belongs to (the rule in the module doc)."""
    first = bisect.bisect_right(starts, a) - 1
    first = min(first, len(pieces) - 1)
    k = first
    while pieces[k].part == "marker" and k + 1 < len(pieces) and starts[k + 1] < b:
        k += 1  # the token reaches into the next piece: a part of the conversation wins over markup
    return k if pieces[k].part != "marker" else first
