"""Model anatomy: where a transformers causal LM keeps its decoder layers, their MLPs and the MLP projections.

Every method reads the same parts: LoKI trains rows of each layer's MLP down projection, KVA attributes its
output, and the ICA and K-FAC methods read its inputs and outputs. This module finds them once, for any
architecture, and is the only place that knows layer and attribute names::

    for down in find_down_projs(model):      # one Projection per decoder layer, in layer order
        down.layer, down.name                # 3, "model.layers.3.mlp.down_proj"
        down.out_features                    # hidden size: row j of the weight writes residual channel j
        down.rows()                          # the weight as [out, in], also for GPT-2's Conv1D
    for mlp in find_mlps(model):             # the same layers, with the input projections too
        mlp.gate, mlp.up, mlp.down

A down projection is found by name first (:data:`DOWN_PROJ_NAMES`), then by shape (the one linear layer of
the decoder layer with ``out_features == hidden_size < in_features``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

try:  # GPT-2 style layers keep their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the ops work without it
    Conv1D = None

__all__ = [
    "DOWN_PROJ_NAMES",
    "UP_PROJ_NAMES",
    "GATE_PROJ_NAMES",
    "Projection",
    "MLP",
    "find_down_projs",
    "find_mlps",
    "decoder_layers",
    "text_config",
    "model_dims",
    "max_positions",
    "is_transposed",
    "linear_shape",
    "row_view",
]

# Where the MLP down projection sits inside one decoder layer, for the architectures we know
# (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi3, OLMo/OLMo2, Granite, Cohere: mlp.down_proj; GPT-2,
# StarCoder2: mlp.c_proj; GPT-NeoX, Falcon: mlp.dense_4h_to_h; Phi-1/2: mlp.fc2; OPT: fc2).
DOWN_PROJ_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "fc2", "feed_forward.w2")
# The MLP's input projections, looked up next to the down projection. Phi3 fuses gate and up into
# ``gate_up_proj``: it is reported as ``up`` (with ``gate=None``); so are GPT-2's ``c_fc`` and OPT's ``fc1``.
UP_PROJ_NAMES = ("up_proj", "gate_up_proj", "c_fc", "dense_h_to_4h", "fc1", "w3")
GATE_PROJ_NAMES = ("gate_proj", "w1")


# ------------------------------------------------------------------------------------------ linear layers
def is_transposed(module: nn.Module) -> bool:
    """True for layers that store their weight as ``[in, out]`` (transformers' ``Conv1D``, GPT-2 style)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(in_features, out_features)`` of a linear-like layer (``Linear``, ``Conv1D``, a patched layer), else None."""
    if is_transposed(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    shape = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return shape if all(isinstance(s, int) for s in shape) else None


def row_view(module: nn.Module) -> Tensor:
    """The weight of a ``Linear`` or ``Conv1D`` as ``[out, in]`` (a view): row ``j`` writes output channel ``j``."""
    return module.weight.t() if is_transposed(module) else module.weight


# ------------------------------------------------------------------------------------------- the config
def text_config(model: nn.Module):
    """The language model's config (the text part of a multimodal config)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: expected a transformers model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_dims(model_or_config) -> tuple[int, int]:
    """``(hidden_size, num_layers)`` of a model or config, whatever the architecture calls them."""
    config = text_config(model_or_config) if isinstance(model_or_config, nn.Module) else model_or_config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = next((getattr(config, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(config, a)), None)
    layer_names = ("num_hidden_layers", "n_layer", "num_layers")
    layers = next((getattr(config, a) for a in layer_names if hasattr(config, a)), None)
    if hidden is None or layers is None:
        raise ValueError(f"cannot read the hidden size and layer count from {type(config).__name__}")
    return int(hidden), int(layers)


def max_positions(model_or_config) -> Optional[int]:
    """The longest sequence the model takes (``max_position_embeddings``, GPT-2's ``n_positions``), or None."""
    config = text_config(model_or_config) if isinstance(model_or_config, nn.Module) else model_or_config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return next((int(getattr(config, a)) for a in ("max_position_embeddings", "n_positions")
                 if isinstance(getattr(config, a, None), int)), None)


# ------------------------------------------------------------------------------------------- the parts
@dataclass
class Projection:
    """One linear layer of a decoder layer: ``parent.<attr>`` is ``module``, its full name is ``name``."""

    layer: int
    name: str
    parent: nn.Module
    attr: str
    module: nn.Module

    @property
    def in_features(self) -> int:
        return linear_shape(self.module)[0]

    @property
    def out_features(self) -> int:
        return linear_shape(self.module)[1]

    def rows(self) -> Tensor:
        """The weight as ``[out, in]`` (see :func:`row_view`)."""
        return row_view(self.module)

    def replace(self, module: nn.Module) -> None:
        """Put ``module`` in this layer's place (``self.module`` then names the new one)."""
        setattr(self.parent, self.attr, module)
        self.module = module


@dataclass
class MLP:
    """The MLP of one decoder layer: ``module`` holds ``down`` and, where found, ``up`` and ``gate``."""

    layer: int
    name: str
    module: nn.Module
    down: Projection
    up: Optional[Projection]
    gate: Optional[Projection]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the language model's list of decoder layers."""
    name, layers, _ = _layers_and_downs(model)
    return name, layers


def find_down_projs(model: nn.Module) -> list[Projection]:
    """The MLP down projection of every decoder layer, in layer order.

    Raises ``ValueError`` when the model has no list of ``num_hidden_layers`` layers that each hold one.
    """
    name, layers, found = _layers_and_downs(model)
    result = []
    for i, (path, module) in enumerate(found):
        parent_path, _, attr = path.rpartition(".")
        parent = layers[i].get_submodule(parent_path) if parent_path else layers[i]
        result.append(Projection(i, f"{name}.{i}.{path}", parent, attr, module))
    return result


def find_mlps(model: nn.Module) -> list[MLP]:
    """The MLP of every decoder layer: the down projection's parent module and its input projections."""
    mlps = []
    for down in find_down_projs(model):
        prefix = down.name.rpartition(".")[0]
        parts = {}
        for role, names in (("up", UP_PROJ_NAMES), ("gate", GATE_PROJ_NAMES)):
            attr = next((n for n in names if isinstance(getattr(down.parent, n, None), nn.Module)), None)
            parts[role] = None if attr is None else Projection(
                down.layer, f"{prefix}.{attr}", down.parent, attr, getattr(down.parent, attr))
        mlps.append(MLP(down.layer, prefix, down.parent, down, parts["up"], parts["gate"]))
    return mlps


def _layers_and_downs(model: nn.Module):
    hidden, num_layers = model_dims(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            found = [_down_proj_in(layer, hidden) for layer in module]
            if all(found):
                candidates.append((name, module, found))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: found no list of {num_layers} decoder layers that each have an MLP down "
            f"projection (a linear layer with out_features == hidden_size == {hidden} < in_features)"
        )
    # Prefer the language model's layers over, e.g., a vision tower of the same depth.
    candidates.sort(key=lambda c: (any(w in c[0] for w in ("vision", "visual", "audio")), len(c[0])))
    return candidates[0]


def _down_proj_in(layer: nn.Module, hidden: int):
    """(attribute path, module) of the down projection of one decoder layer, or None."""
    for path in DOWN_PROJ_NAMES:
        module = _submodule(layer, path)
        shape = linear_shape(module) if module is not None else None
        if shape and shape[1] == hidden and shape[0] > hidden:
            return path, module
    found = [(n, m) for n, m in layer.named_modules() if (s := linear_shape(m)) and s[1] == hidden and s[0] > hidden]
    mlp_like = [(n, m) for n, m in found if any(w in n for w in ("mlp", "ffn", "feed_forward"))]
    if len(found) == 1:
        return found[0]
    if len(mlp_like) == 1:
        return mlp_like[0]
    return None


def _submodule(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
