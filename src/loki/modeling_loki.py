"""LoKI model classes for transformers, with the original project's names, built on ``loki_kernels``.

``create_loki_model`` copies this file next to the weights, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds one of these classes. It
therefore imports only installed packages (no relative imports).

Every class is made from one registry, :data:`BASES` (model type -> transformers config and causal LM
classes): ``LoKI<Name>Config`` adds ``target_pos`` and has its own ``model_type`` (``"loki_<type>"``), so a
LoKI directory loaded without ``trust_remote_code=True`` fails loudly instead of becoming a plain, fully
trainable model; ``LoKI<Name>ForCausalLM`` loads the standard weights, then patches every ``down_proj`` listed
in ``config.target_pos`` so that only those rows train and every other parameter is frozen.

Unlike the original, a saved LoKI model keeps standard keys (``down_proj.weight`` holds the trained weight),
and its layers are ``loki_kernels.SplitLinear`` modules; checkpoints in the original split format
(``down_proj.active.weight`` / ``frozen.weight`` / ``index_map``) load too.
"""

import glob
import os

import torch
import transformers

import loki_kernels
from loki_kernels.arch import find_down_projs

# model type -> (name in the class names, transformers config class, transformers causal LM class)
BASES = {
    "llama": ("Llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("Mistral", "MistralConfig", "MistralForCausalLM"),
}
LOKI_PREFIX = "loki_"


def safetensors_files(path):
    """The checkpoint's ``model.safetensors`` or its ``model-*-of-*.safetensors`` shards, or [] (not a directory)."""
    if not os.path.isdir(path):
        return []
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(path, "model-*-of-*.safetensors")))


@torch.no_grad()
def load_split_format(model, path) -> int:
    """Write original split-format rows (``active.weight``/``frozen.weight``) found under ``path`` into the model.

    Returns the number of layers read (0 when ``path`` holds a standard checkpoint).
    """
    from safetensors import safe_open

    projs = find_down_projs(model)
    loaded = 0
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            for proj in projs:
                names = (proj.name, proj.name.partition(".")[2])  # with and without the base model's prefix
                prefix = next((p for p in names if f"{p}.active.weight" in keys), None)
                if prefix is None:
                    continue
                weight = proj.rows()
                active = f.get_tensor(f"{prefix}.active.weight")
                frozen = f.get_tensor(f"{prefix}.frozen.weight")
                if f"{prefix}.index_map" in keys:
                    index_map = f.get_tensor(f"{prefix}.index_map")
                    is_active = index_map < active.shape[0]
                else:  # the rows listed in the config, sorted, as LoKILinear stores them
                    is_active = torch.zeros(weight.shape[0], dtype=torch.bool)
                    is_active[model.config.target_pos[proj.layer]] = True
                weight[is_active.to(weight.device)] = active.to(weight)
                weight[~is_active.to(weight.device)] = frozen.to(weight)
                if proj.module.bias is not None and f"{prefix}.active_bias" in keys:
                    proj.module.bias[is_active] = f.get_tensor(f"{prefix}.active_bias").to(weight)
                    proj.module.bias[~is_active] = f.get_tensor(f"{prefix}.frozen_bias").to(weight)
                loaded += 1
    return loaded


class LoKIConfigMixin:
    """Adds ``target_pos`` (one list of row indices per decoder layer) to a transformers config."""

    base_model_type = None  # set per class: the transformers model type it extends

    def __init__(self, target_pos=None, **kwargs):
        self.target_pos = target_pos
        super().__init__(**kwargs)

    @classmethod
    def from_base(cls, base_config, target_pos):
        """This LoKI config for a plain ``base_config`` of the same architecture."""
        fields = base_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "target_pos"):
            fields.pop(key, None)
        return cls(target_pos=target_pos, **fields)


class LoKIModelMixin:
    """``from_pretrained`` loads the standard weights, then patches ``config.target_pos``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.pop("config", None)
        if config is None:
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        if getattr(config, "target_pos", None) is None:
            raise ValueError(f"{cls.__name__}: the config has no target_pos (one list of rows per layer)")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        load_split_format(model, str(pretrained_model_name_or_path))
        model.apply_loki_linear()
        return model

    def apply_loki_linear(self):
        """Patch the ``down_proj`` rows in ``config.target_pos``; everything else is frozen."""
        loki_kernels.patch_model(self, self.config.target_pos)
        return self


def _make_classes(model_type, name, config_base, model_base):
    config_cls = type(f"LoKI{name}Config", (LoKIConfigMixin, getattr(transformers, config_base)), {
        "__module__": __name__,
        "model_type": LOKI_PREFIX + model_type,
        "base_model_type": model_type,
        # In the class's own dict: transformers >= 5 turns config classes without one into dataclasses.
        "__init__": LoKIConfigMixin.__init__,
        "__doc__": f"``{config_base}`` plus ``target_pos``; model type ``{LOKI_PREFIX + model_type}``.",
    })
    model_cls = type(f"LoKI{name}ForCausalLM", (LoKIModelMixin, getattr(transformers, model_base)), {
        "__module__": __name__,
        "config_class": config_cls,
        "__doc__": f"``{model_base}`` whose ``down_proj`` rows in ``config.target_pos`` train, nothing else.",
    })
    return config_cls, model_cls


# model type -> (LoKI config class, LoKI model class)
LOKI_CLASSES = {model_type: _make_classes(model_type, *names) for model_type, names in BASES.items()}

# The classes by name (config.json's auto_map and ``from loki import ...`` refer to them so).
LoKILlamaConfig, LoKILlamaForCausalLM = LOKI_CLASSES["llama"]
LoKIQwen2Config, LoKIQwen2ForCausalLM = LOKI_CLASSES["qwen2"]
LoKIQwen3Config, LoKIQwen3ForCausalLM = LOKI_CLASSES["qwen3"]
LoKIMistralConfig, LoKIMistralForCausalLM = LOKI_CLASSES["mistral"]
