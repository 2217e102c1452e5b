"""loki-kernels: fast, low-damage, row-selective fine-tuning of LLM MLP down projections (LoKI)."""

from .backend import resolve_backend
from .modules import SplitLinear
from .ops import split_linear
from .patching import count_parameters, find_down_projs, patch_model, unpatch_model
from .positions import load_positions, normalize_positions, save_positions
from .selection import select_positions

__version__ = "0.1.0"

__all__ = [
    "patch_model",
    "unpatch_model",
    "count_parameters",
    "find_down_projs",
    "SplitLinear",
    "split_linear",
    "resolve_backend",
    "load_positions",
    "normalize_positions",
    "save_positions",
    "select_positions",
]
