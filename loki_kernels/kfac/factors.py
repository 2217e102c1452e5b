"""K-FAC factors of MLP projections: what :func:`collect_factors` returns and the edit and row scores read.

For a projection ``y = W a`` (``W`` of shape ``[d_out, d_in]``) the K-FAC block of the Fisher is ``G ⊗ A``
with ``A = E[a aᵀ]`` over the layer's input vectors and ``G = E[g gᵀ]`` over the gradients with respect to
its output. Gate and up read the same input, so they share one ``A`` (stored once, under the input's name).

Keys:

* ``A["{layer}.mlp"]``: input of gate and up (the post-norm residual), ``[hidden, hidden]``;
  ``A["{layer}.down"]``: input of down (``act(gate)·up``), ``[d_ff, d_ff]``;
* ``G["{layer}.{module}"]`` with module ``gate``, ``up`` or ``down``;
* ``n_tokens["{layer}"]``: how many token positions the layer's factors average over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["MODULES", "Factors", "input_name"]

MODULES = ("gate", "up", "down")


def input_name(module: str) -> str:
    """The ``A`` key suffix a module reads: ``"down"`` for down, ``"mlp"`` for gate and up (one shared input)."""
    if module not in MODULES:
        raise ValueError(f"unknown MLP module {module!r}; expected one of {', '.join(MODULES)}")
    return "down" if module == "down" else "mlp"


@dataclass
class Factors:
    """K-FAC factors of some MLP projections of one model (fp32 second moments, uncentred)."""

    A: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def a(self, layer: int, module: str) -> Tensor:
        """``A`` of ``module`` (gate, up or down) in ``layer``; gate and up return the same tensor."""
        key = f"{int(layer)}.{input_name(module)}"
        if key not in self.A:
            raise KeyError(f"no A factor for layer {layer} {module} (have: {', '.join(sorted(self.A)) or 'none'})")
        return self.A[key]

    def g(self, layer: int, module: str) -> Tensor:
        """``G`` of ``module`` (gate, up or down) in ``layer``."""
        input_name(module)
        key = f"{int(layer)}.{module}"
        if key not in self.G:
            raise KeyError(f"no G factor for layer {layer} {module} (have: {', '.join(sorted(self.G)) or 'none'})")
        return self.G[key]

    def modules(self) -> list[tuple[int, str]]:
        """Every ``(layer, module)`` that has both factors, in layer order, then gate, up, down."""
        pairs = []
        for key in self.G:
            layer, module = key.split(".")
            if f"{layer}.{input_name(module)}" in self.A:
                pairs.append((int(layer), module))
        return sorted(pairs, key=lambda p: (p[0], MODULES.index(p[1])))

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.modules()})
