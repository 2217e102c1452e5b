"""Patch a causal LM in place so that only selected rows of each MLP down projection train."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .arch import find_down_projs, is_transposed
from .backend import BACKENDS
from .modules import SplitLinear
from .target_pos import TargetPosLike, check_target_pos

__all__ = ["patch_model", "unpatch_model", "count_parameters", "ParameterCount"]

# patch_model stores the requires_grad flags it found here (on the module it patched), for unpatch_model.
_SAVED_FLAGS = "_loki_requires_grad"


def patch_model(
    model: nn.Module, target_pos: TargetPosLike, *, freeze_rest: bool = True, backend: str = "auto"
) -> nn.Module:
    """Make only the rows ``target_pos`` of each layer's MLP down projection trainable, in place.

    Args:
        model: a transformers causal LM (or its base model).
        target_pos: one list of row indices per decoder layer (LoKI's position JSON), a path to such a
            JSON, or a ``{layer: rows}`` dict. Layers with no rows keep their original module.
        freeze_rest: set ``requires_grad=False`` on every other parameter of the model.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the split matmul.

    Patch before wrapping the model (peft, DDP, FSDP, ``torch.compile``). A model built on the meta device
    may be patched; after ``to_empty()``, load its weights with ``load_state_dict`` (which fills the trainable
    rows too; as for any model built on meta, call ``tie_weights()`` and recompute non-persistent buffers such
    as rotary ``inv_freq``, which no state dict holds). Invalid input raises ``ValueError`` naming the layer
    and value, and leaves the model untouched. Returns the same model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if any(isinstance(m, SplitLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already patched; call unpatch_model first")
    projs = find_down_projs(model)
    for proj in projs:
        if _is_peft_layer(proj.module):
            raise ValueError(
                f"{proj.name} is already wrapped by peft ({type(proj.module).__name__}): call patch_model before "
                f"adding LoRA, and use loki_kernels.lora.lora_config to put the adapter on the selected rows only"
            )
        if not (isinstance(proj.module, nn.Linear) or is_transposed(proj.module)):
            raise ValueError(f"{proj.name} is a {type(proj.module).__name__}; patch_model splits nn.Linear or Conv1D")
    target_pos = check_target_pos(target_pos, len(projs), [p.out_features for p in projs])

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:  # building a SplitLinear freezes the shared weight; undo that if any layer fails
        replacements = [
            (proj, SplitLinear.from_module(proj.module, active_pos, backend=backend))
            for proj, active_pos in zip(projs, target_pos)
            if active_pos
        ]
    except BaseException:
        _restore_flags(model, flags)
        raise
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    for proj, split in replacements:
        proj.replace(split)
    setattr(model, _SAVED_FLAGS, flags)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Turn every ``SplitLinear`` back into a plain layer holding the trained rows (bit-exact), in place.

    ``requires_grad`` flags come back to what they were before :func:`patch_model`, whether it was called
    on ``model`` or on one of its submodules (its base model, say).
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SplitLinear):
                setattr(module, child_name, child.to_module())
    for module in model.modules():
        flags = module.__dict__.pop(_SAVED_FLAGS, None)
        if flags is not None:
            _restore_flags(module, flags)
    return model


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def _is_peft_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.") or hasattr(module, "base_layer")


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, counting each weight once.

    A patched layer's ``weight_active``/``bias_active`` are rows of its ``weight``: they count as
    trainable but not again towards the total.
    """
    seen: set[int] = set()
    splits = [m for m in model.modules() if isinstance(m, SplitLinear)]
    shadows = {id(t) for m in splits for t in (m.weight_active, m.bias_active) if t is not None}
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        if id(p) not in shadows:
            total += p.numel()
    return ParameterCount(trainable, total)
