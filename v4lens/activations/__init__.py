"""Bulk activations: run a model over a dataset and keep chosen hooks at chosen positions on disk.

    >>> import v4lens.activations as acts
    >>> store = acts.collect(model, texts, ["blocks.2.hook_streams_post"], "acts/", positions="last")
    >>> store = acts.open_store("acts/")                   # later: a torch Dataset, memory-mapped
    >>> store[0]["blocks.2.hook_streams_post"].shape        # [n, d]; plus "row", "position", "token"

`collect` (collect.py) batches rows of similar length, pads them on the right (which cannot change
a real position's values in V4: everything looks backwards), keeps only the chosen positions of
each hook, and appends them to a store of safetensors shards (store.py) that a crashed or
interrupted collection resumes without duplicates. docs/activations.md walks through it.
"""

from .collect import check_hooks, collect
from .store import ActivationStore, open_store

__all__ = ["ActivationStore", "check_hooks", "collect", "open_store"]
