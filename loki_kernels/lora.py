"""LoKI + LoRA (the paper's LoKI*): LoRA adapters on the selected ``down_proj`` rows only, with ``peft``.

The original trains LoRA on the ``active`` half of each split ``down_proj`` (paper: q = 30, r = 32, 16M
trainable parameters on Llama-3.1-8B), merges it and restores the model. Here the adapter of a patched
layer has ``B [k, r]`` and ``A [r, d_ff]`` and adds ``scale · x Aᵀ Bᵀ`` to the ``k`` selected output channels
only, so every other row of the model stays exactly as it was::

    model = loki_kernels.patch_model(model, positions)
    model = peft.get_peft_model(model, loki_kernels.lora_config(model, r=32, lora_alpha=64))
    ...  # train: only lora_A / lora_B have requires_grad
    model = model.merge_and_unload()     # B·A·scale added to weight_active
    loki_kernels.unpatch_model(model)    # a plain model; only the selected rows differ from the base

Silenced rows (``patch_model(..., silence=...)``) stay silent: the adapter's output on them is zeroed, so
their ``B`` rows get no gradient either (FNSFT's ``lora`` anti-drift mode restricts ``B`` to the trained rows
by a row mask; here ``B`` has only the trained rows, and a silenced trained row is masked like the base).

Plain LoRA features only: no DoRA or other variants, no ``lora_bias``, no mixed-adapter batches.
The adapter alone saves with ``PeftModel.save_pretrained``; to load it, patch the base model the same way
and pass ``config=lora_config(model, r=..., lora_alpha=...)`` to ``PeftModel.from_pretrained`` (peft does not
store the custom layer type). Merged and saved whole models need nothing special.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .modules import SplitLinear

__all__ = ["lora_config", "SplitLoraLinear"]


def lora_config(model: nn.Module, **kwargs: Any):
    """A ``peft.LoraConfig`` whose targets are exactly the patched ``down_proj`` layers of ``model``.

    ``kwargs`` go to ``LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``, ``init_lora_weights``, ...);
    ``target_modules`` is set here and may not be passed.
    """
    from peft import LoraConfig

    if "target_modules" in kwargs:
        raise ValueError("lora_config sets target_modules itself (the patched down_proj layers); do not pass it")
    names = [name for name, module in model.named_modules() if isinstance(module, SplitLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no patched down_proj layer: call loki_kernels.patch_model first")
    kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(target_modules=names, **kwargs)
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise ValueError("LoKI + LoRA supports plain LoRA only (use_dora=False, lora_bias=False)")
    config._register_custom_module({SplitLinear: SplitLoraLinear})
    return config


def _lora_linear_base():
    from peft.tuners.lora.layer import Linear

    return Linear


class SplitLoraLinear(_lora_linear_base()):
    """peft's LoRA ``Linear`` around a :class:`SplitLinear`: the adapter's outputs are the ``k`` active rows."""

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.active_pos.numel()

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("SplitLoraLinear does not support mixed-adapter batches (adapter_names)")
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        rows = self.base_layer.active_pos
        silenced = self.base_layer.silenced
        silenced = None if silenced is None else silenced.index_select(0, rows)  # [k]: the adapter's rows
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            delta = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]
            if silenced is not None:
                delta = delta.masked_fill(silenced, 0)
            result = result.index_add(-1, rows, delta.to(result.dtype))
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            active = self.base_layer.weight_active
            merged = active.data + self.get_delta_weight(name).to(active.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems to be broken")
            active.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                active = self.base_layer.weight_active
                active.data -= self.get_delta_weight(name).to(active.dtype)
