"""Create, restore and ablate LoKI models: the original project's functions, fixed.

Differences from the original (github.com/Nexround/LoKI):
* ``create_loki_model`` saves the real pretrained weights and a config whose ``auto_map`` points at
  ``modeling_loki.py`` (copied into the directory), so ``AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)`` builds a model whose only trainable parameters are the selected rows.
  (The latest original saved randomly initialised ``down_proj`` weights and a headless model.)
* ``restore_loki_model`` reads trained checkpoints in our format (standard keys) and in the original split
  format, and works for causal LMs (the latest original failed with ``AttributeError``). Only the selected
  rows are taken from the trained checkpoint; everything else comes from the base model, as in the original.
* ``set_zero_weights`` reads the list-of-lists position JSON (the original called ``.get`` on it).
* Nothing is written until the inputs are validated, and output directories are written atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import loki_kernels
from loki_kernels.modules import is_transposed, row_view
from loki_kernels.positions import normalize_positions

from . import modeling_loki
from .modeling_loki import LOKI_CLASSES, _safetensors_files

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

_MODEL_TYPE_ALIASES = {"qwen": "qwen2", "qwen2.5": "qwen2", "llama3": "llama"}


def get_loki_classes(model_identifier: str, trust_remote_code: bool = False):
    """(config class, model class) for a model type ("llama", "qwen2", ...) or a model name/path."""
    key = _MODEL_TYPE_ALIASES.get(model_identifier.lower(), model_identifier.lower())
    if key not in LOKI_CLASSES:
        try:
            config = AutoConfig.from_pretrained(model_identifier, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot tell the architecture of {model_identifier!r}: {e}") from None
        key = config.model_type
    if key not in LOKI_CLASSES:
        raise ValueError(f"no LoKI model class for model type {key!r}; supported: {', '.join(LOKI_CLASSES)}")
    return LOKI_CLASSES[key]


def get_loki_model_class(model_identifier: str):
    return get_loki_classes(model_identifier)[1]


def get_loki_config_class(model_identifier: str):
    return get_loki_classes(model_identifier)[0]


def _positions_for(target_pos_path: PathLike, model_name: PathLike, trust_remote_code: bool = False) -> list[list[int]]:
    """Read and validate a position JSON against the model's config, before any weights are loaded."""
    config = AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        return normalize_positions(target_pos_path, config.num_hidden_layers, config.hidden_size)
    except ValueError as e:
        raise ValueError(f"{os.fspath(target_pos_path)}: {e}") from None


def _save_tokenizer(model_name: PathLike, out_dir: PathLike, trust_remote_code: bool = False) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        logger.info("no tokenizer found for %s; saving the model only", model_name)
        return
    tokenizer.save_pretrained(out_dir)


class _AtomicDir:
    """Write into a temporary sibling directory; move its files into place only on success."""

    def __init__(self, target: PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.target.mkdir(exist_ok=True)
            for item in self.tmp.iterdir():
                dest = self.target / item.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(item, dest)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _load_base(model_name: PathLike, torch_dtype, trust_remote_code: bool = False):
    return AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype, trust_remote_code=trust_remote_code)


def create_loki_model(
    loki_model_class=None,
    loki_config_cls=None,
    model_name: PathLike = "Qwen/Qwen2.5-0.5B-Instruct",
    target_pos_path: PathLike = "",
    save_dir: PathLike = "./loki_model",
    torch_dtype: Union[torch.dtype, str] = torch.bfloat16,
    trust_remote_code: bool = False,
) -> None:
    """Write a LoKI model directory: the pretrained weights plus a config carrying ``target_pos``.

    ``AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True)`` then loads a model whose
    ``down_proj`` layers use loki_kernels' split matmul and whose only trainable parameters are the
    selected rows, which is what LlamaFactory's ``finetuning_type: full`` expects.
    """
    if loki_model_class is None or loki_config_cls is None:
        config_cls, model_cls = get_loki_classes(os.fspath(model_name), trust_remote_code)
        loki_config_cls = loki_config_cls or config_cls
        loki_model_class = loki_model_class or model_cls
    positions = _positions_for(target_pos_path, model_name, trust_remote_code)
    model = _load_base(model_name, torch_dtype, trust_remote_code)

    config = loki_config_cls.from_pretrained(model_name, target_pos=positions, trust_remote_code=trust_remote_code)
    module = Path(modeling_loki.__file__).stem
    config.auto_map = {
        "AutoConfig": f"{module}.{loki_config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{loki_model_class.__name__}",
    }
    config.architectures = [loki_model_class.__name__]
    with _AtomicDir(save_dir) as tmp:
        model.save_pretrained(tmp)
        config.save_pretrained(tmp)  # replaces the plain config.json
        shutil.copy(modeling_loki.__file__, tmp / f"{module}.py")
        _save_tokenizer(model_name, tmp, trust_remote_code)
    logger.info("LoKI model with %d trainable rows saved to %s", sum(map(len, positions)), save_dir)


def _read_rows(tensors: dict, proj, rows: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The trained rows of one down projection, from our format or the original split format."""
    for prefix in (proj.name, proj.name.partition(".")[2]):
        if f"{prefix}.active.weight" in tensors:  # original split format: rows in sorted order
            bias = tensors.get(f"{prefix}.active_bias")
            return tensors[f"{prefix}.active.weight"], bias
        if f"{prefix}.weight" in tensors:
            weight = tensors[f"{prefix}.weight"]
            if weight.shape != proj.module.weight.shape:
                raise ValueError(f"{proj.name}.weight has shape {tuple(weight.shape)}, expected {tuple(proj.module.weight.shape)}")
            full = weight.t() if is_transposed(proj.module) else weight
            bias = tensors.get(f"{prefix}.bias")
            return full[rows], (bias[rows] if bias is not None else None)
    raise ValueError(f"layer {proj.layer}: no {proj.name}.weight or {proj.name}.active.weight in the trained checkpoint")


def _read_checkpoint(model_path: PathLike) -> dict:
    from safetensors.torch import load_file

    files = _safetensors_files(os.fspath(model_path))
    if not files:
        raise ValueError(f"{os.fspath(model_path)}: no model.safetensors or model-*-of-*.safetensors found")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


@torch.no_grad()
def restore_loki_model(
    target_pos_path: PathLike,
    model_path: PathLike,
    model_name: PathLike,
    output_path: PathLike,
    torch_dtype: Union[torch.dtype, str] = torch.bfloat16,
) -> None:
    """Write a plain checkpoint: the base model with the selected ``down_proj`` rows taken from ``model_path``."""
    positions = _positions_for(target_pos_path, model_name)
    tensors = _read_checkpoint(model_path)
    base = _load_base(model_name, torch_dtype)
    for proj, rows in zip(loki_kernels.find_down_projs(base), positions):
        if not rows:
            continue
        weight_rows, bias_rows = _read_rows(tensors, proj, rows)
        full = row_view(proj.module)
        full[rows] = weight_rows.to(full)
        if bias_rows is not None and proj.module.bias is not None:
            proj.module.bias[rows] = bias_rows.to(full)
    if getattr(base.config, "target_pos", None) is not None:
        del base.config.target_pos
    with _AtomicDir(output_path) as tmp:
        base.save_pretrained(tmp)
        _save_tokenizer(model_name, tmp)
    logger.info("restored model saved to %s", output_path)


@torch.no_grad()
def set_zero_weights(
    target_pos_path: PathLike,
    output_path: PathLike,
    model_name: PathLike,
    torch_dtype: Union[torch.dtype, str] = torch.bfloat16,
) -> None:
    """Save a copy of the model with the listed ``down_proj`` rows zeroed (the suppression ablation)."""
    positions = _positions_for(target_pos_path, model_name)
    model = _load_base(model_name, torch_dtype)
    for proj, rows in zip(loki_kernels.find_down_projs(model), positions):
        row_view(proj.module)[rows] = 0
    with _AtomicDir(output_path) as tmp:
        model.save_pretrained(tmp)
        _save_tokenizer(model_name, tmp)
