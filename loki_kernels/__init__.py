"""loki-kernels: fast, low-damage, row-selective fine-tuning of LLM MLP down projections (LoKI).

The names a trainer needs are here; everything else lives in one module per concept (see ARCHITECTURE.md):
:mod:`.arch` (model anatomy), :mod:`.ops` (kernels), :mod:`.modules` (``SplitLinear``), :mod:`.patching`,
:mod:`.kva` (attribution), :mod:`.selection`, :mod:`.target_pos` and :mod:`.formats` (files),
:mod:`.lora`, and :mod:`.reference` (the original implementations, as test oracles).
"""

from .arch import find_down_projs, find_mlps
from .backend import resolve_backend
from .modules import SplitLinear
from .ops import split_linear
from .patching import count_parameters, lesion, patch_model, set_silence, unpatch_model
from .selection import select_target_pos
from .target_pos import check_target_pos, load_target_pos, save_target_pos

__version__ = "0.1.0"

__all__ = [
    "patch_model",
    "unpatch_model",
    "set_silence",
    "lesion",
    "count_parameters",
    "find_down_projs",
    "find_mlps",
    "SplitLinear",
    "split_linear",
    "resolve_backend",
    "load_target_pos",
    "check_target_pos",
    "save_target_pos",
    "select_target_pos",
]
