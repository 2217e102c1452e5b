"""``SplitLinear``: the module that replaces a ``down_proj`` when LoKI trains some of its rows."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .arch import Conv1D, is_transposed
from .backend import BACKENDS
from .ops.split_linear import make_index_map, split_linear, write_back_
from .target_pos import check_active_pos

__all__ = ["SplitLinear"]


class SplitLinear(nn.Module):
    """A linear layer whose rows ``active_pos`` train (``weight_active``) and whose other rows are frozen.

    ``weight`` is the original layer's own Parameter, kept as it was (frozen, same layout, no copy), so the
    module's ``state_dict()`` has exactly the original keys: ``weight`` holds the whole trained weight (the
    active rows are written back in place on save, :meth:`write_back_`) and ``weight_active``/``bias_active``
    are left out. Loading a standard state dict fills ``weight_active`` from the incoming ``weight``.

    Split weights are read only inside :meth:`forward`, where DeepSpeed ZeRO-3 has gathered them. A module
    built on the meta device works once materialised: ``to_empty()`` rebuilds the index buffers, and
    ``load_state_dict`` fills the weights, trainable rows included.

    **Silenced rows** (``silence``, or :meth:`silence` later): rows whose output is zero (bias included) and
    whose gradient is dropped before ``dX`` and ``dW`` (see :func:`~loki_kernels.ops.split_linear.split_linear`),
    FNSFT's training-time mask without a forward hook. A silenced row may be active (it then gets a zero
    gradient) or frozen; the module may have no active row at all. The mask is a non-persistent buffer
    (``silenced``, ``bool[out]``, or None): state dicts and ``save_pretrained`` hold the plain weights,
    unmasked, and :meth:`to_module` (``unpatch_model``) drops it.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: Optional[nn.Parameter],
        active_pos: Sequence[int],
        *,
        transposed: bool = False,
        silence: Sequence[int] = (),
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.transposed = transposed  # True for Conv1D: weight is stored as [in, out]
        self.backend = backend
        self._rows = tuple(check_active_pos(active_pos, weight.shape[1 if transposed else 0]))
        self._silenced_rows = tuple(check_active_pos(silence, weight.shape[1 if transposed else 0], "silence"))
        # The flags the wrapped layer had, given back by to_module.
        self._requires_grad = (weight.requires_grad, None if bias is None else bias.requires_grad)
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)
        self.register_buffer("active_pos", None, persistent=False)
        self.register_buffer("index_map", None, persistent=False)
        self.register_buffer("silenced", None, persistent=False)
        self._index_buffers(weight.device)
        with torch.no_grad():
            pos = self.active_pos
            self.weight_active = nn.Parameter(self.full_weight().index_select(0, pos).clone())
            self.bias_active = None if bias is None else nn.Parameter(bias.index_select(0, pos).clone())
        self._register_state_dict_hook(_write_back_on_save)
        self._register_load_state_dict_pre_hook(_split_on_load, with_module=True)

    # ----------------------------------------------------------------------------------- conversion
    @classmethod
    def from_module(cls, module: nn.Module, active_pos: Sequence[int], *, silence: Sequence[int] = (),
                    backend: str = "auto") -> "SplitLinear":
        """Wrap an ``nn.Linear`` or a transformers ``Conv1D``; shares (does not copy) its parameters."""
        if isinstance(module, nn.Linear) or is_transposed(module):
            return cls(module.weight, module.bias, active_pos, transposed=is_transposed(module), silence=silence,
                       backend=backend)
        raise TypeError(f"SplitLinear wraps nn.Linear or Conv1D, not {type(module).__name__}")

    def to_module(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) holding the trained weight: bit-exact, no copy."""
        self.write_back_()
        with torch.device("meta"):
            if self.transposed:
                plain = Conv1D(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        self.weight.requires_grad_(self._requires_grad[0])
        if self.bias is not None:
            self.bias.requires_grad_(self._requires_grad[1])
        return plain

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), to_empty(), ...: the index buffers are rebuilt from the row list, so that a module
        # made on the meta device (or moved by to_empty, which leaves buffers uninitialised) is correct.
        super()._apply(fn, recurse)
        self._index_buffers(self.active_pos.device)
        return self

    def _index_buffers(self, device: torch.device) -> None:
        """``active_pos``, ``index_map`` and ``silenced`` from the row lists, built on the CPU
        (``make_index_map`` has no meta kernel) and moved to ``device``."""
        pos = torch.tensor(self._rows, dtype=torch.long)
        self.index_map = make_index_map(pos, self.out_features).to(device)
        self.active_pos = pos.to(device)
        self._silence_buffer(device)

    def _silence_buffer(self, device: torch.device) -> None:
        """``silenced`` (``bool[out]``) from the silenced row list; None when it is empty."""
        self.silenced = None
        if self._silenced_rows:
            silenced = torch.zeros(self.out_features, dtype=torch.bool)
            silenced[list(self._silenced_rows)] = True
            self.silenced = silenced.to(device)

    def silence(self, rows: Optional[Sequence[int]]) -> "SplitLinear":
        """Silence exactly ``rows`` from now on (None or empty: no row); checked first (``ValueError``)."""
        self._silenced_rows = tuple(check_active_pos(() if rows is None else rows, self.out_features, "silence"))
        self._silence_buffer(self.active_pos.device)
        return self

    @property
    def silenced_rows(self) -> tuple[int, ...]:
        """The silenced rows, sorted (empty: none)."""
        return self._silenced_rows

    # ---------------------------------------------------------------------------------------- views
    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    def full_weight(self) -> Tensor:
        """``weight`` as ``[out, in]`` (a view). Its active rows are current only after :meth:`write_back_`."""
        return self.weight.t() if self.transposed else self.weight

    def write_back_(self) -> None:
        """Write the trained rows back into ``weight``/``bias`` in place.

        Under FSDP2 (``fully_shard``) the parameters are sharded DTensors outside ``forward``: the rows are
        then written on the gathered full tensors and each rank keeps its own shard (a collective: every rank
        must call it, as every rank calls ``state_dict()``).
        """
        if _is_dtensor(self.weight):
            _write_back_sharded(self)
        elif self.weight.numel():  # under ZeRO-3 a parameter outside forward can be an empty shard
            write_back_(self.full_weight(), self.weight_active, self.active_pos, self.bias, self.bias_active)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        return split_linear(
            x, self.full_weight(), self.weight_active, self.active_pos, self.bias, self.bias_active,
            index_map=self.index_map, silenced=self.silenced, backend=self.backend,
        )

    def extra_repr(self) -> str:
        silenced = f"silenced_rows={len(self._silenced_rows)}, " if self._silenced_rows else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"active_rows={self.active_pos.numel()}, {silenced}bias={self.bias is not None}, backend={self.backend!r}"
        )


def _write_back_on_save(module: SplitLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    module.write_back_()
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
def _write_back_sharded(module: SplitLinear) -> None:
    def full(t):
        return t.full_tensor() if _is_dtensor(t) else t

    weight = full(module.weight)
    bias = None if module.bias is None else full(module.bias)
    bias_active = None if module.bias_active is None else full(module.bias_active)
    rows = weight.t() if module.transposed else weight
    write_back_(rows, full(module.weight_active), module.active_pos.to(weight.device), bias, bias_active)
    module.weight.to_local().copy_(_like(weight, module.weight).to_local())
    if module.bias is not None:
        module.bias.to_local().copy_(_like(bias, module.bias).to_local())
