"""The analysis room: reading and editing what the model computes, through its hook points.

- `layout` — where each hook's position axis is (streams are 4-D, scores head-first, entries have none)
- `cache` — `V4ActivationCache`, TransformerLens's `ActivationCache` for n residual streams
  (`cache_compat`: its inherited residual methods made exact for mHC; `hook_names`: short names -> V4 hooks)
- `caching` — `run_with_cache` / `caching_hooks` (position slices, another device, chunked runs)
- `offload` — a cache on disk (`offload_dir=`), reopened with `open_offloaded`
- `lens` — logit lens and MTP lens through hc_head -> ln_final -> head
- `decomposition` — exact logit attribution through mHC (`decompose`, `stream_lineage`)
- `patching` — activation patching sweeps, attribution patching, mechanism-editing hooks
- `stats` — routing, mHC and attention statistics
- `experts` — routed experts by id: read, ablate, patch, force / forbid, sweep over (layer, expert)
- `token_space` — `token_attention`: sparse attention spread back over the source tokens
- `drafts` — the DSpark drafter: confidence calibration, stages vs Markov head

It reads the model room (`v4lens.model`) and nothing else of v4lens; figures (`v4lens.plot`) and
the command line build on it.
"""

from . import experts, patching, stats
from .cache import V4ActivationCache
from .caching import caching_hooks, run_with_cache
from .decomposition import decompose, stream_lineage
from .drafts import draft_calibration, draft_sources
from .lens import LensResult, logit_lens, mtp_lens
from .offload import open_offloaded
from .token_space import TokenAttention, token_attention

__all__ = [
    "LensResult", "TokenAttention", "V4ActivationCache", "caching_hooks", "decompose", "draft_calibration", "draft_sources", "experts", "logit_lens", "mtp_lens", "open_offloaded",
    "patching", "run_with_cache", "stats", "stream_lineage", "token_attention",
]  # fmt: skip
