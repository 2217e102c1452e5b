"""The original LoKI ``LoKILinear``, kept only to test and benchmark against. Do not train with it.

``LoKILinear`` is the class from github.com/Nexround/LoKI (``src/loki/core/loki_linear.py`` at HEAD; the
first commit's class computes the same and differs only in its error messages, "Activated position index
out of range" and "Duplicate indices found in active_pos"): the weight is split into an ``active`` and a
``frozen`` ``nn.Linear``, the forward runs both, concatenates the outputs and gathers the columns back
through ``index_map``. Like the original, it assumes a 3-D input ``[batch, seq, in]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..arch import find_down_projs
from ..target_pos import TargetPosLike, check_target_pos

__all__ = ["LoKILinear", "apply_reference_loki"]


class LoKILinear(nn.Module):
    def __init__(self, original_linear: nn.Linear, target_pos: Sequence[int]):
        super().__init__()
        self.in_features = original_linear.in_features
        self.out_features = original_linear.out_features
        self.active_pos = sorted(target_pos)
        active = set(self.active_pos)
        self.frozen_pos = [i for i in range(self.out_features) if i not in active]
        if not all(0 <= idx < self.out_features for idx in self.active_pos):
            raise ValueError(f"Target neuron indices must be within [0, {self.out_features - 1}]")
        if len(self.active_pos) != len(set(self.active_pos)):
            raise ValueError("Target neuron indices contain duplicate values")

        weight = original_linear.weight.data
        self.active = nn.Linear(self.in_features, len(self.active_pos), bias=False)
        self.active.weight = nn.Parameter(weight[self.active_pos].clone(), requires_grad=True)
        self.frozen = nn.Linear(self.in_features, len(self.frozen_pos), bias=False)
        self.frozen.weight = nn.Parameter(weight[self.frozen_pos].clone(), requires_grad=False)

        if original_linear.bias is not None:
            bias = original_linear.bias.data
            self.active_bias = nn.Parameter(bias[self.active_pos].clone(), requires_grad=True)
            self.frozen_bias = nn.Parameter(bias[self.frozen_pos].clone(), requires_grad=False)
        else:
            self.register_parameter("active_bias", None)
            self.register_parameter("frozen_bias", None)

        index_map = torch.empty(self.out_features, dtype=torch.long)
        index_map[self.active_pos] = torch.arange(len(self.active_pos))
        index_map[self.frozen_pos] = torch.arange(len(self.frozen_pos)) + len(self.active_pos)
        self.register_buffer("index_map", index_map.to(weight.device))

    def forward(self, x):
        active_out = self.active(x)
        frozen_out = self.frozen(x)
        output = torch.cat([active_out, frozen_out], dim=-1)
        if self.active_bias is not None:
            bias = torch.cat([self.active_bias, self.frozen_bias], dim=0)
            output += bias.unsqueeze(0).unsqueeze(0)
        return output.gather(-1, self.index_map.view(1, 1, -1).expand(output.size(0), output.size(1), -1))

    def full_weight(self) -> torch.Tensor:
        """The whole ``[out, in]`` weight, for comparing against other implementations (not in the original)."""
        weight = torch.empty(self.out_features, self.in_features, dtype=self.active.weight.dtype,
                             device=self.active.weight.device)
        weight[self.active_pos] = self.active.weight.detach()
        weight[self.frozen_pos] = self.frozen.weight.detach()
        return weight


def apply_reference_loki(model: nn.Module, target_pos: TargetPosLike) -> nn.Module:
    """What the original ``LoKI*ForCausalLM`` does: freeze everything, then swap in ``LoKILinear``s."""
    projs = find_down_projs(model)
    target_pos = check_target_pos(target_pos, len(projs), [p.out_features for p in projs])
    for p in model.parameters():
        p.requires_grad_(False)
    for proj, active_pos in zip(projs, target_pos):
        if active_pos:
            proj.replace(LoKILinear(proj.module, active_pos))
    return model
