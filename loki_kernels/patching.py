"""Patch a causal LM in place so that only selected rows of each MLP down projection train.

Also: silenced rows (:func:`patch_model`'s ``silence``, :func:`set_silence`), the training-time output mask of
FNSFT's ICA functional-network method, and :func:`lesion`, the inference-time lesion of its paper (a
reversible weight edit on any model).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from .arch import find_down_projs, is_transposed
from .backend import BACKENDS
from .modules import SplitLinear
from .target_pos import TargetPosLike, check_target_pos

__all__ = ["patch_model", "unpatch_model", "set_silence", "lesion", "count_parameters", "ParameterCount"]

# patch_model stores the requires_grad flags it found here (on the module it patched), for unpatch_model.
_SAVED_FLAGS = "_loki_requires_grad"


def patch_model(
    model: nn.Module, target_pos: TargetPosLike, *, silence: Optional[TargetPosLike] = None,
    freeze_rest: bool = True, backend: str = "auto",
) -> nn.Module:
    """Make only the rows ``target_pos`` of each layer's MLP down projection trainable, in place.

    Args:
        model: a transformers causal LM (or its base model).
        target_pos: one list of row indices per decoder layer (LoKI's position JSON), a path to such a
            JSON, or a ``{layer: rows}`` dict. Layers with no rows (and none to silence) keep their original
            module.
        silence: rows to silence, in the same forms as ``target_pos`` (a dict may leave layers out; a layer
            absent or empty gets no mask), checked the same way (``ValueError`` naming ``silence``, the layer
            and the value). A silenced row outputs zero and gets no gradient (see
            :class:`~loki_kernels.modules.SplitLinear`); the weights are untouched and saved unmasked. A
            layer with rows to silence and none to train is split with no trainable row (its down projection
            is then frozen, also with ``freeze_rest=False``). :func:`set_silence` changes the masks later.
        freeze_rest: set ``requires_grad=False`` on every other parameter of the model.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the split matmul.

    **FNSFT (ICA functional networks) as row training.** FNSFT masks and freezes the same rows: it silences
    exactly the rows it freezes. With ``U`` the per-layer union of the chosen components' channels:

    * preserve: ``target_pos = U``, ``silence`` = the complement of ``U``, except that a layer whose ``U`` is
      empty is left alone, neither silenced nor trained;
    * lesion: ``target_pos`` = the complement of ``U``, ``silence = U``.

    :mod:`loki_kernels.ica` makes both inputs (``positions`` and ``silenced``). With ``freeze_rest=True`` this
    equals FNSFT's anti-drift parametrisation plus its forward mask when FNSFT trains only ``down_proj``
    (FNSFT's full fine-tuning leaves every other parameter trainable), at zero weight decay (decay acts on
    FNSFT's delta, which pulls towards the base weight, and on our rows, which pulls towards zero); the
    optimizer state covers the trained rows only (tests/test_silence.py shows all of this).

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
    sizes = [p.out_features for p in projs]
    target_pos = check_target_pos(target_pos, len(projs), sizes)
    silenced = _check_rows(silence, "silence", len(projs), sizes)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:  # building a SplitLinear freezes the shared weight; undo that if any layer fails
        replacements = [
            (proj, SplitLinear.from_module(proj.module, active_pos, silence=rows, backend=backend))
            for proj, active_pos, rows in zip(projs, target_pos, silenced)
            if active_pos or rows
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


def set_silence(model: nn.Module, silence: Optional[TargetPosLike]) -> nn.Module:
    """Silence exactly ``silence`` on a patched model from now on (None: clear every mask), in place.

    ``silence`` takes the forms of ``target_pos``. A layer given rows must be patched (a ``SplitLinear``,
    also under a peft adapter); every other layer's mask is cleared. Checked before anything changes
    (``ValueError``). Returns the same model.
    """
    projs = find_down_projs(model)
    splits = [_split_of(p.module) for p in projs]
    sizes = [p.out_features if s is None else s.out_features for p, s in zip(projs, splits)]
    rows = _check_rows(silence, "silence", len(projs), sizes)
    for proj, split, layer_rows in zip(projs, splits, rows):
        if layer_rows and split is None:
            raise ValueError(
                f"silence layer {proj.layer}: {proj.name} is not patched; patch_model(model, target_pos, "
                f"silence=...) splits every layer that has rows to train or to silence"
            )
    for split, layer_rows in zip(splits, rows):
        if split is not None:
            split.silence(layer_rows)
    return model


@contextlib.contextmanager
def lesion(model: nn.Module, rows: TargetPosLike) -> Iterator[nn.Module]:
    """Zero the MLP down projection rows ``rows`` (and their bias entries) inside the block; restore on exit.

    The inference-time lesion of Liu et al. (FNSFT's ``lesion``/``preserve`` evaluations): output channel
    ``j`` of the layer's MLP is removed by zeroing row ``j`` of its weight. ``rows`` takes the forms of
    ``target_pos`` (a preserve evaluation lesions the complement of the network). Works on plain models
    (``Linear``, GPT-2 ``Conv1D``) and patched ones, where an active row is zeroed in ``weight_active``
    (and in the stale copy in ``weight``) and a frozen row in ``weight``. On exit, also on an exception,
    every zeroed element gets its earlier value back, bit for bit; what the block changed elsewhere stays.
    Checked before anything is touched (``ValueError``); peft-wrapped layers are refused (merge first).
    Not for training through: a zeroed trainable row still gets gradients.
    """
    projs = find_down_projs(model)
    rows = _check_rows(rows, "lesion", len(projs), [p.out_features for p in projs], allow_none=False)
    for proj, layer_rows in zip(projs, rows):
        wrapper = next((m for m in (proj.module, proj.parent) if _is_peft_layer(m)), None)
        if layer_rows and wrapper is not None:
            raise ValueError(f"lesion layer {proj.layer}: {proj.name} is wrapped by peft "
                             f"({type(wrapper).__name__}); merge_and_unload first")
    saved = []
    try:
        with torch.no_grad():
            for proj, layer_rows in zip(projs, rows):
                if layer_rows:
                    saved.extend(_zero_rows(proj.module, layer_rows))
        yield model
    finally:
        with torch.no_grad():
            for tensor, index, values in reversed(saved):
                tensor.index_copy_(0, index, values)


def _zero_rows(module: nn.Module, rows: list[int]) -> list[tuple]:
    """Zero ``rows`` of a down projection's output wherever they are stored; return what to restore."""
    targets = []  # (row-major view, row indices)
    weight_rows = module.full_weight() if isinstance(module, SplitLinear) else (
        module.weight.t() if is_transposed(module) else module.weight)
    index = torch.tensor(rows, dtype=torch.long, device=weight_rows.device)
    targets.append((weight_rows, index))
    if module.bias is not None:
        targets.append((module.bias, index))
    if isinstance(module, SplitLinear):  # the trained copies of the active rows among them
        slot = module.index_map.index_select(0, index)
        active = slot < module.active_pos.numel()
        if active.any():
            slots = slot[active]
            targets.append((module.weight_active, slots))
            if module.bias_active is not None:
                targets.append((module.bias_active, slots))
    saved = []
    for tensor, idx in targets:
        saved.append((tensor, idx, tensor.index_select(0, idx).clone()))
        tensor.index_fill_(0, idx, 0)
    return saved


def _check_rows(rows: Optional[TargetPosLike], name: str, num_layers: int, sizes: list[int], *,
                allow_none: bool = True) -> list[list[int]]:
    """``check_target_pos`` for another per-layer row list; its errors name ``name`` instead of target_pos.

    ``None`` means no rows where ``allow_none``."""
    if rows is None and allow_none:
        return [[] for _ in range(num_layers)]
    try:
        return check_target_pos(rows, num_layers, sizes)
    except ValueError as error:
        raise ValueError(str(error).replace("target_pos", name, 1)) from None


def _split_of(module: nn.Module) -> Optional[SplitLinear]:
    """The ``SplitLinear`` of a down projection, also under a peft adapter, or None."""
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, SplitLinear) else None


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
