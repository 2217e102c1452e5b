"""Helpers every op file shares: the CUDA device guard, accumulator dtypes and the interpreter switches."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..backend import interpreting, triton_available

__all__ = [
    "device_guard", "compute_dtype", "contiguous_rows", "autotune", "upcast_operands", "rows_aligned",
    "shared_memory_limit", "Launch",
]


def device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype kernels accumulate and compute in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def contiguous_rows(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension is contiguous, else a contiguous copy (kernels take a row stride only)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_aligned(*tensors: Tensor) -> bool:
    """True when every 2-D tensor is contiguous along its last dimension, 16-byte aligned, with 16-byte rows.

    This is what a kernel's vector loads of whole rows need (Triton's ``tl.multiple_of`` hints promise it).
    """
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors
    )


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (the opt-in maximum per block)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


@dataclass
class Launch:
    """One kernel launch, built by an op's launcher: ``kernel[grid](*args, **kwargs)``.

    Launchers build it and run it; the ahead-of-time compile check (:mod:`loki_kernels.ops.aot`) builds the
    same object from meta tensors and compiles it for GPU targets, so both see the same arguments.
    """

    name: str
    kernel: Any  # a triton JITFunction, or an Autotuner around one
    grid: Callable[[dict], tuple]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def upcast_operands(dtype: torch.dtype) -> bool:
    """True when a kernel must widen its bf16 operands to fp32 first: Triton's interpreter computes bf16 wrongly."""
    return interpreting() and dtype == torch.bfloat16


if triton_available():
    import triton

    def autotune(configs: list, key: list[str], interpreter_config, prune: Optional[Callable] = None):
        """``triton.autotune``; under the interpreter (which cannot benchmark) only ``interpreter_config``.

        ``prune(configs, named_args, **kwargs)`` drops configs before timing (``early_config_prune``).
        """
        if interpreting():
            return triton.autotune(configs=[interpreter_config], key=key)
        pruning = {"early_config_prune": prune} if prune else None
        return triton.autotune(configs=configs, key=key, prune_configs_by=pruning)
