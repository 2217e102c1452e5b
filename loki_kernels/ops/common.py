"""Helpers every op file shares: the CUDA device guard, accumulator dtypes and the interpreter switches."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..backend import interpreting, triton_available

__all__ = ["device_guard", "compute_dtype", "contiguous_rows", "autotune", "upcast_operands"]


def device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype kernels accumulate and compute in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def contiguous_rows(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension is contiguous, else a contiguous copy (kernels take a row stride only)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def upcast_operands(dtype: torch.dtype) -> bool:
    """True when a kernel must widen its bf16 operands to fp32 first: Triton's interpreter computes bf16 wrongly."""
    return interpreting() and dtype == torch.bfloat16


if triton_available():
    import triton

    def autotune(configs: list, key: list[str], interpreter_config):
        """``triton.autotune``; under the interpreter (which cannot benchmark) only ``interpreter_config``."""
        return triton.autotune(configs=[interpreter_config] if interpreting() else configs, key=key)
