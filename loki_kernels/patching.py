"""Patch a causal LM in place so that only selected rows of each MLP down projection train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .backend import BACKENDS
from .modules import SplitLinear, is_transposed
from .positions import PositionsLike, normalize_positions

__all__ = ["patch_model", "unpatch_model", "find_down_projs", "count_parameters", "DOWN_PROJ_NAMES"]

# Where the MLP down projection sits inside one decoder layer, for the architectures we know
# (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi3, OLMo/OLMo2, Granite, Cohere: mlp.down_proj; GPT-2,
# StarCoder2: mlp.c_proj; GPT-NeoX, Falcon: mlp.dense_4h_to_h; Phi-1/2: mlp.fc2; OPT: fc2).
# Any other layer is searched by the rule out_features == hidden_size < in_features.
DOWN_PROJ_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "fc2", "feed_forward.w2")

_SAVED_FLAGS = "_loki_requires_grad"


@dataclass
class DownProj:
    """One decoder layer's down projection: ``parent.<attr>`` is ``module``, full name ``name``."""

    layer: int
    name: str
    parent: nn.Module
    attr: str
    module: nn.Module


def _shape(module: nn.Module):
    """(in_features, out_features) of a linear-like layer (Linear, Conv1D, SplitLinear, ...), else None."""
    if is_transposed(module):
        return module.weight.shape[0], module.weight.shape[1]
    shape = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return shape if all(isinstance(s, int) for s in shape) else None


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: patch_model expects a transformers model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _hidden_and_layers(model: nn.Module) -> tuple[int, int]:
    config = _text_config(model)
    hidden = next((getattr(config, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(config, a)), None)
    layers = next((getattr(config, a) for a in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, a)), None)
    if hidden is None or layers is None:
        raise ValueError(f"cannot read hidden size and layer count from {type(config).__name__}")
    return int(hidden), int(layers)


def _down_proj_in(layer: nn.Module, hidden: int):
    """(attribute path, module) of the down projection of one decoder layer, or None."""
    for path in DOWN_PROJ_NAMES:
        module = layer.get_submodule(path) if _has_submodule(layer, path) else None
        shape = _shape(module) if module is not None else None
        if shape and shape[1] == hidden and shape[0] > hidden:
            return path, module
    found = [(n, m) for n, m in layer.named_modules() if (s := _shape(m)) and s[1] == hidden and s[0] > hidden]
    mlp_like = [(n, m) for n, m in found if any(w in n for w in ("mlp", "ffn", "feed_forward"))]
    if len(found) == 1:
        return found[0]
    if len(mlp_like) == 1:
        return mlp_like[0]
    return None


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def find_down_projs(model: nn.Module) -> list[DownProj]:
    """The MLP down projection of every decoder layer, in layer order."""
    hidden, num_layers = _hidden_and_layers(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            found = [_down_proj_in(layer, hidden) for layer in module]
            if all(found):
                candidates.append((name, module, found))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: found no list of {num_layers} decoder layers that each have an MLP down "
            f"projection (a Linear with out_features == hidden_size == {hidden} < in_features)"
        )
    # Prefer the language model's layers over, e.g., a vision tower of the same depth.
    candidates.sort(key=lambda c: (any(w in c[0] for w in ("vision", "visual", "audio")), len(c[0])))
    list_name, layers, found = candidates[0]
    result = []
    for i, (path, module) in enumerate(found):
        parent_path, _, attr = path.rpartition(".")
        parent = layers[i].get_submodule(parent_path) if parent_path else layers[i]
        result.append(DownProj(i, f"{list_name}.{i}.{path}", parent, attr, module))
    return result


def patch_model(model: nn.Module, target_pos: PositionsLike, *, freeze_rest: bool = True, backend: str = "auto") -> nn.Module:
    """Make only the rows ``target_pos`` of each layer's MLP down projection trainable, in place.

    Args:
        model: a transformers causal LM (or its base model).
        target_pos: one list of row indices per decoder layer (LoKI's position JSON), a path to such a
            JSON, or a ``{layer: rows}`` dict. Layers with no rows keep their original module.
        freeze_rest: set ``requires_grad=False`` on every other parameter of the model.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the split matmul.

    Invalid input raises ``ValueError`` naming the layer and value, and leaves the model untouched.
    Returns the same model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if any(isinstance(m, SplitLinear) for m in model.modules()):
        raise ValueError("the model is already patched; call unpatch_model first")
    projs = find_down_projs(model)
    positions = normalize_positions(target_pos, len(projs), [_shape(p.module)[1] for p in projs])

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:  # building a SplitLinear freezes the shared weight; undo that if any layer fails
        replacements = [
            (proj, SplitLinear.from_module(proj.module, rows, backend=backend))
            for proj, rows in zip(projs, positions)
            if rows
        ]
    except BaseException:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        raise
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    for proj, split in replacements:
        setattr(proj.parent, proj.attr, split)
    setattr(model, _SAVED_FLAGS, flags)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Turn every ``SplitLinear`` back into a plain layer holding the trained rows (bit-exact), in place.

    ``requires_grad`` flags are restored to what they were before :func:`patch_model`.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SplitLinear):
                setattr(module, child_name, child.to_module())
    flags = model.__dict__.pop(_SAVED_FLAGS, None)
    if flags is not None:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
    return model


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
    shadows = {id(t) for m in model.modules() if isinstance(m, SplitLinear) for t in (m.weight_active, m.bias_active) if t is not None}
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
