"""Synthetic tasks for training and probing small V4s (`v4lens.train` trains on them).

Tasks (token layout for a 128-token vocabulary; ids below 16 are special or filler):

    0 BOS   1 EOS   2 PAD   3 SEP   4 QUERY   5-7 unused
    8-15    filler tokens            FILLER_IDS
    16-71   keys   (56 ids)          KEY_IDS
    72-127  values (56 ids)          VALUE_IDS

Each id has a name (`TOKEN_NAMES`: BOS, EOS, PAD, SEP, QUERY, UNUSED_5..7, FILL_0..7, KEY_0..55,
VAL_0..55), which the synthetic vocabulary's tokenizer (`v4lens.tokenizer.synthetic_tokenizer`,
tiny-recall's) reads and writes: `model.to_tokens("QUERY KEY_3")`, `model.to_str_tokens(tokens)`.

* recall (`recall_batch`): key->value recall from far outside the sliding window.
  `[BOS f f f] [k_0 v_0 f f] ... [k_{n-1} v_{n-1} f f] [QUERY k_q v_q]`: a header block, then
  `n_pairs` records (default 4) of 4 tokens (one record per CSA compression block of m=4 tokens: position
  4+4i holds key i, 4+4i+1 its value, then two random fillers), then QUERY, the query key and
  the answer. Keys are distinct within a sequence; values are drawn with replacement.
  `query_pos` is the position of the query key (logits there predict `answer`, which is also the
  last token); the queried record is drawn uniformly among those whose value lies at least
  `min_gap` (default 8 = the tiny-recall window) positions before the query, so the key and the
  value are outside the query's sliding window and can only be read through compressed entries.
* induction (`induction_batch`): `[BOS x_1..x_L x_1..x_L]` with x distinct tokens drawn from the
  key and value ids; `mask` marks positions L+1..2L-1 of the second copy (each predicts the next
  token of the copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import HookedV4

# ---------------------------------------------------------------------- token layout
BOS, EOS, PAD, SEP, QUERY = 0, 1, 2, 3, 4
FILLER_IDS = range(8, 16)
KEY_IDS = range(16, 72)
VALUE_IDS = range(72, 128)
RECORD_LEN = 4  # one record per CSA compression block (ratio 4)
HEADER_LEN = 4  # [BOS f f f]: records start on a block boundary
EVAL_SEED = 1_000_003
TASKS = ("recall", "induction", "mix")


def _token_names() -> list[str]:
    """id -> name, from the layout above: KEY_i is key id KEY_IDS[i], VAL_i value id VALUE_IDS[i]."""
    names = [f"UNUSED_{i}" for i in range(VALUE_IDS.stop)]
    for i, name in ((BOS, "BOS"), (EOS, "EOS"), (PAD, "PAD"), (SEP, "SEP"), (QUERY, "QUERY")):
        names[i] = name
    for ids, prefix in ((FILLER_IDS, "FILL"), (KEY_IDS, "KEY"), (VALUE_IDS, "VAL")):
        for j, i in enumerate(ids):
            names[i] = f"{prefix}_{j}"
    return names


TOKEN_NAMES = _token_names()  # [128]: the synthetic vocabulary, one name per id


def _draw(ids: range, shape: tuple[int, ...], generator) -> torch.Tensor:
    return torch.randint(ids.start, ids.stop, shape, generator=generator)


def recall_batch(batch_size: int, generator: torch.Generator | None = None, n_pairs: int = 4,
                 min_gap: int = 8, n_keys: int = 16, n_values: int = 16,
                 random_filler: bool = True) -> dict:
    """Key->value recall far outside the sliding window (layout in the module docstring).

    Defaults are the distribution tiny-recall was trained on (4 records, keys from the first 16
    key ids, values from the first 16 value ids). Returns `tokens` [b, S] (S = 4·n_pairs + 7), `query_pos` [b] (logits[:, query_pos] predict
    `answer`), `answer` [b] (= tokens[:, query_pos + 1], the last token), `key_pos` [b] (the
    matching key; its value sits at key_pos + 1). Every queried value lies >= min_gap positions
    before the query (query_pos - key_pos > min_gap). n_keys / n_values restrict the id ranges.
    """
    if not 1 <= n_keys <= len(KEY_IDS) or not 1 <= n_values <= len(VALUE_IDS):
        raise ValueError(f"n_keys and n_values must be in [1, {len(KEY_IDS)}]")
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs ({n_pairs}) > n_keys ({n_keys}): keys must be distinct")
    b, S = batch_size, HEADER_LEN + RECORD_LEN * n_pairs + 3
    query_pos = S - 2
    key_pos_of = HEADER_LEN + RECORD_LEN * torch.arange(n_pairs)
    eligible = int(((query_pos - (key_pos_of + 1)) >= min_gap).sum())  # records are in position order
    if eligible == 0:
        raise ValueError(f"no record lies min_gap={min_gap} before the query; use more pairs")
    tokens = _draw(FILLER_IDS, (b, S), generator) if random_filler else torch.full((b, S), SEP)
    tokens[:, 0] = BOS
    keys = torch.rand(b, n_keys, generator=generator).argsort(dim=-1)[:, :n_pairs] + KEY_IDS.start
    values = torch.randint(VALUE_IDS.start, VALUE_IDS.start + n_values, (b, n_pairs), generator=generator)
    tokens[:, key_pos_of] = keys
    tokens[:, key_pos_of + 1] = values
    which = torch.randint(0, eligible, (b,), generator=generator)
    rows = torch.arange(b)
    tokens[:, query_pos - 1] = QUERY
    tokens[:, query_pos] = keys[rows, which]
    tokens[:, query_pos + 1] = values[rows, which]
    return {
        "tokens": tokens,
        "query_pos": torch.full((b,), query_pos, dtype=torch.long),
        "answer": values[rows, which].clone(),
        "key_pos": key_pos_of[which],
    }


def induction_batch(batch_size: int, generator: torch.Generator | None = None, length: int = 24) -> dict:
    """`[BOS x_1..x_L x_1..x_L]`, x distinct ids from KEY_IDS ∪ VALUE_IDS. Returns `tokens` [b, 2L+1]
    and `mask` [b, 2L+1] bool: True at positions L+1..2L-1, whose next token is the copy's next token."""
    pool = len(KEY_IDS) + len(VALUE_IDS)
    if not 2 <= length <= pool:
        raise ValueError(f"length must be in [2, {pool}]")
    seq = torch.rand(batch_size, pool, generator=generator).argsort(dim=-1)[:, :length] + KEY_IDS.start
    tokens = torch.cat([torch.full((batch_size, 1), BOS), seq, seq], dim=1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, length + 1 : 2 * length] = True
    return {"tokens": tokens, "mask": mask}


def target_mask(batch: dict) -> torch.Tensor:
    """bool [b, S]: positions whose next-token prediction the task scores."""
    if "mask" in batch:
        return batch["mask"]
    mask = torch.zeros_like(batch["tokens"], dtype=torch.bool)
    mask[torch.arange(mask.shape[0]), batch["query_pos"]] = True
    return mask


def task_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the scored positions (logits [b,S,V] predict tokens shifted by one)."""
    mask = target_mask(batch).to(logits.device)[:, :-1]
    targets = batch["tokens"].to(logits.device)[:, 1:]
    return F.cross_entropy(logits[:, :-1][mask], targets[mask])


@torch.no_grad()
def task_accuracy(model: HookedV4, batch: dict) -> float:
    """Fraction of scored positions whose argmax is right (the answer for recall, the masked next
    tokens for induction). Runs the model in whatever mode it is in."""
    tokens = batch["tokens"].to(model.device)
    pred = model(tokens)[:, :-1].argmax(-1)
    mask = target_mask(batch).to(model.device)[:, :-1]
    return (pred[mask] == tokens[:, 1:][mask]).float().mean().item()


def make_batch(task: str, batch_size: int, generator, step: int = 0, eval: bool = False, **task_kwargs) -> dict:
    """A batch of `task`; "mix" alternates recall (even steps) and induction (odd steps).

    A task kwarg given as a (lo, hi) pair (e.g. n_pairs=(2, 14), a length curriculum) is drawn
    uniformly in [lo, hi] per batch from `generator`; with eval=True it takes hi.
    """
    if task == "mix":
        task = "recall" if step % 2 == 0 else "induction"
    fn = {"recall": recall_batch, "induction": induction_batch}[task]
    kwargs = {}
    for k, v in task_kwargs.items():
        if k not in fn.__code__.co_varnames:
            continue
        if isinstance(v, (tuple, list)):
            lo, hi = v
            v = hi if eval else int(torch.randint(lo, hi + 1, (1,), generator=generator))
        kwargs[k] = v
    return fn(batch_size, generator, **kwargs)
