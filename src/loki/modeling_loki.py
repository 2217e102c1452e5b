"""LoKI model classes for transformers, with the original project's names, built on ``loki_kernels``.

``create_loki_model`` copies this file next to the weights, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds one of these classes. It
therefore imports only installed packages (no relative imports).

Loading works like the original first-commit classes: the standard pretrained weights load, then every
``down_proj`` listed in ``config.target_pos`` is patched so that only those rows train and every other
parameter is frozen. Unlike the original, a saved LoKI model keeps standard keys (``down_proj.weight``
holds the merged, trained weight), and checkpoints in the original split format
(``down_proj.active.weight`` / ``frozen.weight`` / ``index_map``) load too.
"""

import glob
import os

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import loki_kernels
import loki_kernels.modules


def _init_config(self, parent, target_pos, kwargs):
    self.target_pos = target_pos
    parent.__init__(self, **kwargs)


class LoKILlamaConfig(LlamaConfig):
    def __init__(self, target_pos=None, **kwargs):
        _init_config(self, LlamaConfig, target_pos, kwargs)


class LoKIQwen2Config(Qwen2Config):
    def __init__(self, target_pos=None, **kwargs):
        _init_config(self, Qwen2Config, target_pos, kwargs)


class LoKIQwen3Config(Qwen3Config):
    def __init__(self, target_pos=None, **kwargs):
        _init_config(self, Qwen3Config, target_pos, kwargs)


class LoKIMistralConfig(MistralConfig):
    def __init__(self, target_pos=None, **kwargs):
        _init_config(self, MistralConfig, target_pos, kwargs)


def _safetensors_files(path):
    if not os.path.isdir(path):
        return []
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(path, "model-*-of-*.safetensors")))


@torch.no_grad()
def load_split_checkpoint(model, path) -> int:
    """Merge original-format split weights (``active.weight``/``frozen.weight``) found under ``path``.

    Returns the number of layers merged (0 when ``path`` holds a standard checkpoint).
    """
    from safetensors import safe_open

    projs = loki_kernels.find_down_projs(model)
    merged = 0
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            for proj in projs:
                prefix = next((p for p in (proj.name, proj.name.partition(".")[2]) if f"{p}.active.weight" in keys), None)
                if prefix is None:
                    continue
                weight = loki_kernels.modules.row_view(proj.module)
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
                merged += 1
    return merged


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
        load_split_checkpoint(model, str(pretrained_model_name_or_path))
        model.apply_loki_linear()
        return model

    def apply_loki_linear(self):
        """Patch the ``down_proj`` rows in ``config.target_pos``; everything else is frozen."""
        loki_kernels.patch_model(self, self.config.target_pos)
        return self


class LoKILlamaForCausalLM(LoKIModelMixin, LlamaForCausalLM):
    config_class = LoKILlamaConfig


class LoKIQwen2ForCausalLM(LoKIModelMixin, Qwen2ForCausalLM):
    config_class = LoKIQwen2Config


class LoKIQwen3ForCausalLM(LoKIModelMixin, Qwen3ForCausalLM):
    config_class = LoKIQwen3Config


class LoKIMistralForCausalLM(LoKIModelMixin, MistralForCausalLM):
    config_class = LoKIMistralConfig


# model_type -> (config class, model class)
LOKI_CLASSES = {
    "llama": (LoKILlamaConfig, LoKILlamaForCausalLM),
    "qwen2": (LoKIQwen2Config, LoKIQwen2ForCausalLM),
    "qwen3": (LoKIQwen3Config, LoKIQwen3ForCausalLM),
    "mistral": (LoKIMistralConfig, LoKIMistralForCausalLM),
}
