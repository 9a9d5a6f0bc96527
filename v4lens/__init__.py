"""v4lens: a hookable, faithful DeepSeek-V4 for mechanistic interpretability."""

from .cache import V4ActivationCache
from .config import PRESETS, V4Config, preset
from .decomposition import decompose, stream_lineage
from .lens import LensResult
from .loading import Checkpoint, init_weights, load
from .names import canonical_name, official_name
from .slicing import slice_checkpoint
from .model import HookedV4
from .tokenizer import load_tokenizer

__all__ = [
    "HookedV4", "V4ActivationCache", "V4Config", "PRESETS", "preset", "load", "load_tokenizer",
    "init_weights", "canonical_name", "official_name", "Checkpoint",
    "slice_checkpoint", "decompose", "stream_lineage", "LensResult",
]  # fmt: skip
__version__ = "0.1.0"
