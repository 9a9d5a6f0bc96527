"""The few places where the TransformerLens lines v4lens runs on differ: 3.9+ and 4.x.

v4lens is written against TransformerLens 4 (`HookedRootModule`, `HookPoint`, `ActivationCache`,
`transformer_lens.patching`). SAELens, the library most sparse-autoencoder work uses, pins
transformer-lens < 4, so v4lens also runs on the 3.x line from 3.9 on (the first 3.x release that
accepts the transformers 5 v4lens needs). Every name v4lens imports exists on both lines; the
behaviours that differ are answered here, so the rest of v4lens is written against one API.

    from .tl_versions import TL_VERSION, added_handle, patching_result
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

from transformer_lens.ActivationCache import ActivationCache


def _major_minor(text: str) -> tuple[int, int]:
    parts = (text.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # "4.3.0rc1" -> (4, 3)


TL_VERSION: tuple[int, int] = _major_minor(version("transformer-lens"))  # e.g. (4, 3); (3, 9) beside SAELens


def added_handle(hook_point, handle, wrapped):
    """The `LensHandle` that `HookPoint.add_hook` just registered for the hook function `wrapped`.

    TransformerLens 4.3 returns it; 3.x returns None, so it is found on the hook point's lists
    (TransformerLens records the function it was given as the handle's `user_hook` on both lines).
    """
    if handle is not None:
        return handle
    registered = (*hook_point.fwd_hooks, *hook_point.bwd_hooks)
    return next((h for h in registered if getattr(h, "user_hook", None) is wrapped), None)


_REMOVE_TAKES_BATCH_SIZE = "batch_size" in inspect.signature(ActivationCache.remove_batch_dim).parameters


def remove_batch_dim(remove, batch_size: int | None):
    """Call an `ActivationCache.remove_batch_dim` (the bound method `remove`) with the true batch size.

    TransformerLens 4.2+ takes `batch_size`; 3.x infers it from the cached entries (the same answer
    for v4lens's caches, whose entries are all batch-first), so a given size is checked here.
    """
    if batch_size is None:
        return remove()
    if _REMOVE_TAKES_BATCH_SIZE:
        return remove(batch_size)
    if batch_size != 1:
        raise ValueError(f"Cannot remove the batch dimension of a cache with batch size {batch_size} (needs 1)")
    return remove()


def patching_result():
    """TransformerLens's `PatchingResult` and `make_df_from_ranges` (per-example patching results).

    They came with TransformerLens 4.2; on 3.x the patching sweeps still return plain tensors
    (`reduce="scalar"` / `"mean"`), and asking for more raises this ImportError.
    """
    try:
        from transformer_lens.patching import PatchingResult, make_df_from_ranges
    except ImportError:
        raise ImportError(
            f"reduce='none', baseline=True and several metrics return TransformerLens's PatchingResult, which "
            f"transformer-lens {version('transformer-lens')} does not have (it came in 4.2). Use reduce='scalar' "
            "or 'mean' here, or a venv with transformer-lens>=4.3 (SAELens, which needs < 4, can live in another)"
        ) from None
    return PatchingResult, make_df_from_ranges
