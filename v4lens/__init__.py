"""v4lens: a hookable, faithful DeepSeek-V4 for mechanistic interpretability."""

from . import patching, stats
from .cache import V4ActivationCache, open_offloaded
from .config import PRESETS, V4Config, preset
from .decomposition import decompose, stream_lineage
from .lens import LensResult
from .loading import Checkpoint, init_weights, load
from .kv_cache import V4KVCache
from .model import HookedV4
from .names import canonical_name, official_name
from .slicing import slice_checkpoint
from .tokenizer import load_tokenizer

__all__ = [
    "PRESETS", "Checkpoint", "HookedV4", "LensResult", "V4ActivationCache", "V4Config", "V4KVCache",
    "canonical_name", "decompose", "init_weights", "load", "load_tokenizer", "official_name", "open_offloaded",
    "patching", "preset",
    "slice_checkpoint", "stats", "stream_lineage",
]  # fmt: skip
__version__ = "0.1.0"
