"""The model room: DeepSeek-V4 as a hookable PyTorch network, and nothing else.

One module per component, read top to bottom in the order a token meets them:

- `config` (`V4Config`, presets; `config_formats`: transformers' / DeepSeek's config files)
- `params`, `norm`, `rope` — parameter helpers (fp32 islands), RMSNorm, partial RoPE + YaRN
- `hyper_connections` — mHC: the n residual streams, Sinkhorn-Knopp mixing, the final `HyperHead`
- `compressor`, `indexer`, `attention` — KV compression (CSA / HCA), the Lightning Indexer,
  shared-KV multi-query attention over window + compressed candidates with sinks
- `moe` — DeepSeekMoE: sqrt(softplus) router, hash routing, clamped SwiGLU experts
- `block`, `mtp`, `head` — one transformer block, the MTP block, the fp32 logits head
- `kv_cache` — the incremental-decoding state a forward can continue from
- `hooked` — `HookedV4`, the whole model on TransformerLens's `HookedRootModule`

Nothing here imports from the other rooms (`weights`, `analysis`, `plot`, the tools at the top)
when it is imported; `HookedV4`'s conveniences that reach them (`tokenizer`, `generate`,
`save_pretrained`, `run_with_cache`) import them on first use, all in one marked section of
`hooked.py`.
"""

from .config import V4Config, resolve_dtype
from .hooked import HookedV4, lm_cross_entropy
from .kv_cache import V4KVCache
from .presets import PRESETS, preset

__all__ = ["PRESETS", "HookedV4", "V4Config", "V4KVCache", "lm_cross_entropy", "preset", "resolve_dtype"]
