"""The original LoKI project's public API, implemented on ``loki_kernels``.

Existing code written against github.com/Nexround/LoKI keeps working (``from loki import ...``, or
``from src.loki import ...`` from the repository root), with the fast kernels and the original's bugs fixed.
"""

from loki_kernels.modules import SplitLinear

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


class LoKILinear(SplitLinear):
    """The original ``LoKILinear(original_linear, target_pos)``, backed by loki_kernels' split matmul.

    Only the constructor and the ``active_pos``/``frozen_pos`` index lists match the original; the
    parameters are ``weight`` (frozen, merged on save) and ``weight_active`` instead of ``active.weight``
    and ``frozen.weight``.
    """

    def __init__(self, original_linear, target_pos):
        super().__init__(original_linear.weight, original_linear.bias, target_pos)

    @property
    def frozen_pos(self) -> list[int]:
        return (self.slot < 0).nonzero().flatten().tolist()


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
