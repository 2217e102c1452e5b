"""``SplitLinear``: the module that replaces a ``down_proj`` when LoKI trains some of its rows."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .backend import BACKENDS
from .ops.split_linear import make_slot, merge_rows_, split_linear
from .positions import check_rows

try:  # GPT-2 style layers keep their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the op works without it
    Conv1D = None

__all__ = ["SplitLinear", "is_transposed", "row_view"]


def is_transposed(module: nn.Module) -> bool:
    """True for layers that store their weight as ``[in, out]`` (transformers' ``Conv1D``, GPT-2 style)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def row_view(module: nn.Module) -> Tensor:
    """The weight of a ``Linear`` or ``Conv1D`` as ``[out, in]``: row ``j`` writes output channel ``j``."""
    return module.weight.t() if is_transposed(module) else module.weight


class SplitLinear(nn.Module):
    """A linear layer whose rows ``active_pos`` train (``weight_active``) and whose other rows are frozen.

    ``weight`` is the original layer's own Parameter, kept as it was (frozen, same layout, no copy), so the
    module's ``state_dict()`` has exactly the original keys: ``weight`` holds the merged weight (active rows
    written back in place on save) and ``weight_active``/``bias_active`` are left out. Loading a standard
    state dict fills ``weight_active`` from the incoming ``weight``.

    Split weights are read only inside :meth:`forward`, where DeepSpeed ZeRO-3 has gathered them.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: Optional[nn.Parameter],
        active_pos: Sequence[int],
        *,
        transposed: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.transposed = transposed  # True for Conv1D: weight is stored as [in, out]
        self.backend = backend
        rows = check_rows(active_pos, weight.shape[1 if transposed else 0], "active_pos")
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)
        pos = torch.tensor(rows, dtype=torch.long, device=weight.device)
        self.register_buffer("active_pos", pos, persistent=False)
        self.register_buffer("slot", make_slot(pos, self.out_features), persistent=False)
        with torch.no_grad():
            self.weight_active = nn.Parameter(self.full_weight().index_select(0, pos).clone())
            self.bias_active = None if bias is None else nn.Parameter(bias.index_select(0, pos).clone())
        self._register_state_dict_hook(_merge_on_save)
        self._register_load_state_dict_pre_hook(_split_on_load, with_module=True)

    # ----------------------------------------------------------------------------------- conversion
    @classmethod
    def from_module(cls, module: nn.Module, active_pos: Sequence[int], *, backend: str = "auto") -> "SplitLinear":
        """Wrap an ``nn.Linear`` or a transformers ``Conv1D``; shares (does not copy) its parameters."""
        if isinstance(module, nn.Linear) or is_transposed(module):
            return cls(module.weight, module.bias, active_pos, transposed=is_transposed(module), backend=backend)
        raise TypeError(f"SplitLinear wraps nn.Linear or Conv1D, not {type(module).__name__}")

    def to_module(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) holding the merged weight: bit-exact, no copy."""
        self.merge_()
        with torch.device("meta"):
            if self.transposed:
                plain = Conv1D(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    # ---------------------------------------------------------------------------------------- views
    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    def full_weight(self) -> Tensor:
        """``weight`` as ``[out, in]`` (a view). Its active rows are current only after :meth:`merge_`."""
        return self.weight.t() if self.transposed else self.weight

    def merge_(self) -> None:
        """Write the trained rows back into ``weight``/``bias`` in place.

        Under FSDP2 (``fully_shard``) the parameters are sharded DTensors outside ``forward``: the rows are
        then merged on the gathered full tensors and each rank keeps its own shard (a collective: every rank
        must call it, as every rank calls ``state_dict()``).
        """
        if _is_dtensor(self.weight):
            _merge_sharded(self)
        elif self.weight.numel():  # under ZeRO-3 a parameter outside forward can be an empty shard
            merge_rows_(self.full_weight(), self.weight_active, self.active_pos, self.bias, self.bias_active)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        return split_linear(
            x, self.full_weight(), self.weight_active, self.active_pos, self.bias, self.bias_active,
            slot=self.slot, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"active_rows={self.active_pos.numel()}, bias={self.bias is not None}, backend={self.backend!r}"
        )


def _merge_on_save(module: SplitLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    module.merge_()
    state_dict.pop(prefix + "weight_active", None)
    state_dict.pop(prefix + "bias_active", None)


def _split_on_load(module: SplitLinear, state_dict: dict, prefix: str, *args) -> None:
    for full, active in (("weight", "weight_active"), ("bias", "bias_active")):
        incoming = state_dict.get(prefix + full)
        if incoming is None or prefix + active in state_dict or getattr(module, active) is None:
            continue
        if _is_dtensor(incoming):  # FSDP2: a sharded full weight in, a sharded weight_active out
            incoming = incoming.full_tensor()
        rows = incoming.t() if module.transposed and full == "weight" else incoming
        if rows.shape[0] != module.out_features:
            continue  # the regular loader reports the shape mismatch for `weight`
        selected = rows.index_select(0, module.active_pos.to(incoming.device))
        target = getattr(module, active)
        state_dict[prefix + active] = _like(selected, target) if _is_dtensor(target) else selected


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # without importing torch.distributed on every call


def _like(full: Tensor, dtensor) -> Tensor:
    """``full`` (the same on every rank) sharded like ``dtensor``, without communication where possible."""
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(full, dtensor.device_mesh, dtensor.placements, src_data_rank=None)
    except TypeError:  # torch < 2.7: no src_data_rank; rank 0's (identical) copy is scattered
        return distribute_tensor(full, dtensor.device_mesh, dtensor.placements)


@torch.no_grad()
def _merge_sharded(module: SplitLinear) -> None:
    def full(t):
        return t.full_tensor() if _is_dtensor(t) else t

    weight = full(module.weight)
    bias = None if module.bias is None else full(module.bias)
    bias_active = None if module.bias_active is None else full(module.bias_active)
    rows = weight.t() if module.transposed else weight
    merge_rows_(rows, full(module.weight_active), module.active_pos.to(weight.device), bias, bias_active)
    module.weight.to_local().copy_(_like(weight, module.weight).to_local())
    if module.bias is not None:
        module.bias.to_local().copy_(_like(bias, module.bias).to_local())
