"""v4lens: a hookable, faithful DeepSeek-V4 for mechanistic interpretability.

The package has four rooms and a few tools (docs/architecture.md):

- `v4lens.model` — the network: config, components, `HookedV4`, the decoding cache
- `v4lens.weights` — checkpoints on disk: loading, saving, names, FP8/FP4, slicing, the transformers oracle
- `v4lens.analysis` — the stream-aware cache, lenses, decomposition, patching, statistics
- `v4lens.plot` — plotly figures and their export
- tools: `generate`, `speculative`, `tokenizer`, `train` (with its synthetic `tasks`), `activations` (bulk
  collection to disk for probes and SAEs), `utils` (`get_act_name` for V4's hook names), `cli`, `demo`
"""

from . import _moved
from .analysis import experts, patching, stats, token_attention
from .analysis.cache import V4ActivationCache
from .analysis.decomposition import decompose, stream_lineage
from .analysis.lens import LensResult
from .analysis.offload import open_offloaded
from .model import HookedV4
from .model.config import V4Config
from .model.kv_cache import V4KVCache
from .model.presets import PRESETS, preset
from .tokenizer import load_tokenizer
from .weights.loading import Checkpoint, init_weights, load
from .weights.names import canonical_name, official_name
from .weights.slicing import slice_checkpoint

_moved.install()  # the flat module paths of earlier versions (v4lens.cache, v4lens.config, ...) still import


def __getattr__(name: str):
    # `v4lens.plot`, `v4lens.train`, ... are ordinary submodules; old flat names resolve to their new homes
    return _moved.moved_attribute(name)


__all__ = [
    "PRESETS", "Checkpoint", "HookedV4", "LensResult", "V4ActivationCache", "V4Config", "V4KVCache",
    "canonical_name", "decompose", "experts", "init_weights", "load", "load_tokenizer", "official_name", "open_offloaded",
    "patching", "preset", "slice_checkpoint", "stats", "stream_lineage", "token_attention",
]  # fmt: skip
__version__ = "0.1.0"
