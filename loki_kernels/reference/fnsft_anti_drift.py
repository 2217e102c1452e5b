"""FunctionalNetworksSFT's training-time masks and anti-drift parametrisation, kept as oracles. Do not train with them.

FNSFT (github.com/realdanielbyrne/FunctionalNetworksSFT, ``ica_mask.py``) trains with two mechanisms over the
same rows of each MLP down projection (row ``j`` writes residual channel ``j``), given ``U``, the per-layer
union of the chosen ICA components' channels:

* **forward masks** (:func:`apply_component_masks`, their ``apply_component_masks``): a forward hook on each
  decoder layer's ``mlp`` (its ``base_layer`` under peft) returns ``out * m`` with ``m`` a 0/1 vector over the
  hidden size: lesion ``m = 0`` on ``U``, preserve ``m = 1`` on ``U`` and 0 elsewhere. Layers with an empty
  ``U`` get no hook (so preserve leaves them unmasked). Removed before saving: the saved model is unmasked.
* **anti-drift** (:func:`apply_row_parametrizations`, their ``apply_row_parametrizations`` with
  ``RowMaskedDelta``, ``--anti_drift_apply_to base``): ``torch.nn.utils.parametrize`` on ``down_proj.weight``
  (and the bias) makes ``W_eff = frozen + row_mask ⊙ delta``; ``frozen`` is a buffer clone of ``W``,
  ``row_mask`` is 1 on the trainable rows (preserve: ``U``; lesion: the complement), and the underlying
  parameter (``parametrizations.weight.original``) is zeroed and becomes ``delta``. Every layer is
  parametrised, so a preserve layer with an empty ``U`` is fully frozen. Frozen rows get exactly zero gradient
  and AdamW's decoupled decay acts on ``delta``, so neither decay nor momentum moves them.
  :func:`remove_row_parametrizations` bakes ``frozen + row_mask ⊙ delta`` into a plain parameter
  (``leave_parametrized=True``), as FNSFT does before saving or merging.

FNSFT's ``NoDriftCheckCallback`` compares one whole parametrised weight before the first step and after it;
:func:`whole_weight_changed` is that check. The effective weight changes on the trainable rows at every
normal step, so it fires whether or not frozen rows drifted and proves nothing; :func:`rows_changed` compares
the given rows only, which is the check that means something.

Differences from FNSFT, none of which changes the math: the layers are found with :mod:`loki_kernels.arch`
(FNSFT walks ``model.layers`` / ``transformer.h`` / ``.blocks``), and a GPT-2 ``Conv1D`` weight (``[in, out]``)
gets its row mask as ``[1, out]``, so that it masks output channels there too. FNSFT's full fine-tuning leaves
every other parameter trainable; freezing them is up to the caller. Only the full-FT (``base``) mode is here.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..arch import find_down_projs, find_mlps, is_transposed
from ..target_pos import TargetPosLike, check_target_pos

__all__ = [
    "RowMaskedDelta",
    "apply_row_parametrizations",
    "remove_row_parametrizations",
    "apply_component_masks",
    "whole_weight_changed",
    "rows_changed",
]


class RowMaskedDelta(nn.Module):
    """``W_eff = frozen + row_mask ⊙ delta``: the parametrisation of FNSFT's anti-drift."""

    def __init__(self, frozen: Tensor, row_mask: Tensor):
        super().__init__()
        self.register_buffer("frozen", frozen)
        self.register_buffer("row_mask", row_mask)

    def forward(self, delta: Tensor) -> Tensor:
        return self.frozen + self.row_mask * delta


def _rows(model: nn.Module, rows: TargetPosLike):
    projs = find_down_projs(model)
    return projs, check_target_pos(rows, len(projs), [p.out_features for p in projs])


def apply_row_parametrizations(model: nn.Module, trainable: TargetPosLike) -> list[nn.Module]:
    """Parametrise every down projection's weight (and bias) so that only the rows ``trainable`` can move.

    ``trainable`` takes the forms of ``target_pos``. Each ``original`` (now ``delta``) is zeroed; its
    ``requires_grad`` is left as it was. Returns the parametrised modules.
    """
    projs, rows = _rows(model, trainable)
    modules = []
    for proj, layer_rows in zip(projs, rows):
        module = proj.module
        mask = torch.zeros(proj.out_features, dtype=module.weight.dtype, device=module.weight.device)
        mask[layer_rows] = 1
        weight_mask = mask[None, :] if is_transposed(module) else mask[:, None]
        targets = [("weight", weight_mask)] + ([("bias", mask)] if module.bias is not None else [])
        for name, row_mask in targets:
            frozen = getattr(module, name).detach().clone()
            parametrize.register_parametrization(module, name, RowMaskedDelta(frozen, row_mask))
            with torch.no_grad():
                getattr(module.parametrizations, name).original.zero_()
        modules.append(module)
    return modules


def remove_row_parametrizations(model: nn.Module, *, bake: bool = True) -> None:
    """Remove the parametrisations; ``bake=True`` leaves ``frozen + row_mask ⊙ delta`` as the plain parameter
    (FNSFT's default before saving), ``bake=False`` leaves ``delta`` (FNSFT's "unbake", rarely wanted)."""
    for proj in find_down_projs(model):
        module = proj.module
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=bake)


def apply_component_masks(model: nn.Module, union: TargetPosLike, mode: str) -> list:
    """FNSFT's training-time forward masks: ``out * m`` on each decoder layer's MLP output.

    ``mode`` is ``"lesion"`` (``m = 0`` on ``union``) or ``"preserve"`` (``m = 1`` on ``union`` only); layers
    whose ``union`` is empty get no hook. Returns the hook handles (``handle.remove()`` undoes them).
    """
    if mode not in ("lesion", "preserve"):
        raise ValueError(f"mode must be 'lesion' or 'preserve', not {mode!r}")
    projs, rows = _rows(model, union)
    handles = []
    for mlp, proj, layer_rows in zip(find_mlps(model), projs, rows):
        if not layer_rows:
            continue
        fill, keep = (1.0, 0.0) if mode == "lesion" else (0.0, 1.0)
        mask = torch.full((proj.out_features,), fill)
        mask[layer_rows] = keep

        def hook(_module, _inputs, out, mask=mask):
            return out * mask.to(device=out.device, dtype=out.dtype)

        handles.append(getattr(mlp.module, "base_layer", mlp.module).register_forward_hook(hook))
    return handles


def whole_weight_changed(before: Tensor, after: Tensor) -> bool:
    """FNSFT's ``NoDriftCheckCallback``: did the whole (effective) weight change? True after any normal step."""
    return not torch.equal(before, after)


def rows_changed(before: Tensor, after: Tensor, rows: Union[list[int], Tensor]) -> bool:
    """Did any of ``rows`` (of ``[out, in]`` weights, or ``[out]`` biases) change, bit for bit?"""
    index = torch.as_tensor(rows, dtype=torch.long, device=before.device)
    return not torch.equal(before.index_select(0, index), after.index_select(0, index))
