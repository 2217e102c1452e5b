"""``LoKILinear``: the original class's whole surface, computing with loki_kernels' split matmul.

Code written against the original (``from loki.core.loki_linear import LoKILinear`` there) reads
``layer.active.weight`` (the trainable rows, sorted), ``layer.frozen.weight`` (the other rows),
``layer.active_bias``/``frozen_bias`` and ``layer.index_map``; all of them are here, with the original
semantics and state-dict keys. The forward is :func:`loki_kernels.split_linear` on the original's own
storage (the "compact" layout: ``index_map`` is exactly the op's), so no output is concatenated and
gathered back, and on CUDA no merged weight is built.

Differences from the original:

* any input shape ``[..., in]`` works (the original assumed ``[batch, seq, in]``);
* a transformers ``Conv1D`` (GPT-2) can be split too;
* a non-integer index raises ``ValueError`` naming it (the original failed later, in indexing);
* ``backend`` picks the split matmul's implementation (``"auto"``, ``"triton"``, ``"torch"``).

The error messages for out-of-range and duplicate indices are the original's (HEAD's wording).
Models built by ``LoKI*ForCausalLM`` and ``create-model`` use :class:`loki_kernels.SplitLinear` instead,
whose checkpoints keep the standard ``down_proj.weight`` key.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from loki_kernels.arch import linear_shape, row_view
from loki_kernels.backend import BACKENDS
from loki_kernels.ops.split_linear import make_index_map, split_linear

__all__ = ["LoKILinear"]


class LoKILinear(nn.Module):
    """Linear layer whose output rows ``target_pos`` train (``active``) while the others stay frozen (``frozen``).

    Attributes (as the original's): ``in_features``, ``out_features``, ``active_pos`` (sorted list),
    ``frozen_pos`` (sorted list), ``active``/``frozen`` (``nn.Linear`` without bias, holding the trainable and
    the frozen rows; only ``active.weight`` requires grad), ``active_bias``/``frozen_bias`` (Parameters, or
    None when the original layer has no bias), ``index_map`` (persistent ``long[out_features]`` buffer: row
    ``n`` is entry ``index_map[n]`` of ``cat([active rows, frozen rows])``).
    """

    def __init__(self, original_linear: nn.Module, target_pos, *, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        shape = linear_shape(original_linear)
        if shape is None:
            raise TypeError(f"LoKILinear splits an nn.Linear (or Conv1D), not {type(original_linear).__name__}")
        self.in_features, self.out_features = shape
        self.backend = backend
        target_pos = target_pos.tolist() if hasattr(target_pos, "tolist") else list(target_pos)
        for idx in target_pos:
            if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
                raise ValueError(f"Target neuron indices must be integers, got {idx!r}")
        self.active_pos = sorted(int(i) for i in target_pos)
        active = set(self.active_pos)
        self.frozen_pos = [i for i in range(self.out_features) if i not in active]

        # Parameter validation (the original's checks and wording)
        if not all(0 <= idx < self.out_features for idx in self.active_pos):
            raise ValueError(f"Target neuron indices must be within [0, {self.out_features - 1}]")
        if len(self.active_pos) != len(active):
            raise ValueError("Target neuron indices contain duplicate values")

        weight = row_view(original_linear).detach()
        with torch.device("meta"):  # shells only: the weights are assigned below
            self.active = nn.Linear(self.in_features, len(self.active_pos), bias=False)
            self.frozen = nn.Linear(self.in_features, len(self.frozen_pos), bias=False)
        self.active.weight = nn.Parameter(weight[self.active_pos].clone(), requires_grad=True)
        self.frozen.weight = nn.Parameter(weight[self.frozen_pos].clone(), requires_grad=False)
        if original_linear.bias is not None:
            bias = original_linear.bias.detach()
            self.active_bias = nn.Parameter(bias[self.active_pos].clone(), requires_grad=True)
            self.frozen_bias = nn.Parameter(bias[self.frozen_pos].clone(), requires_grad=False)
        else:
            self.register_parameter("active_bias", None)
            self.register_parameter("frozen_bias", None)

        rows = torch.tensor(self.active_pos, dtype=torch.long, device=weight.device)
        self.register_buffer("index_map", make_index_map(rows, self.out_features, compact=True))
        self.register_buffer("_active_rows", rows, persistent=False)  # active_pos as a tensor, for the op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``, rows in the original order."""
        return split_linear(x, self.frozen.weight, self.active.weight, self._active_rows, self.frozen_bias,
                            self.active_bias, index_map=self.index_map, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, "
            f"out_features={self.out_features}, "
            f"active_neurons={len(self.active_pos)} "
            f"({100 * len(self.active_pos) / self.out_features:.1f}%)"
        )
