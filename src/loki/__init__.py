"""The original LoKI project's public API, implemented on ``loki_kernels``.

Existing code written against github.com/Nexround/LoKI keeps working (``from loki import ...``, or
``from src.loki import ...`` from the repository root), with the fast kernels and the original's bugs fixed.
"""

from .loki_linear import LoKILinear
from .model_utils import create_loki_model, restore_loki_model, set_zero_weights
from .modeling_loki import (
    LoKILlamaConfig,
    LoKILlamaForCausalLM,
    LoKIMistralConfig,
    LoKIMistralForCausalLM,
    LoKIQwen2Config,
    LoKIQwen2ForCausalLM,
    LoKIQwen3Config,
    LoKIQwen3ForCausalLM,
)

__version__ = "0.1.0"

__all__ = [
    "LoKILinear",
    "LoKILlamaConfig",
    "LoKILlamaForCausalLM",
    "LoKIQwen2Config",
    "LoKIQwen2ForCausalLM",
    "LoKIQwen3Config",
    "LoKIQwen3ForCausalLM",
    "LoKIMistralConfig",
    "LoKIMistralForCausalLM",
    "create_loki_model",
    "restore_loki_model",
    "set_zero_weights",
]
