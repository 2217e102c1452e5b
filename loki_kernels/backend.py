"""Which implementation an op runs: ``"triton"`` kernels or the ``"torch"`` path.

``"auto"`` (the default) means Triton for CUDA tensors when Triton is installed, PyTorch otherwise.
The environment variable ``LOKI_KERNELS_BACKEND`` replaces ``"auto"`` process-wide; a backend named
explicitly in a call wins over both. The library never uses Triton's interpreter on its own: a CPU tensor
runs the Triton kernels only when ``"triton"`` is asked for *and* ``TRITON_INTERPRET=1`` is set (the tests
do this to check the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LOKI_KERNELS_BACKEND"


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


def interpreting() -> bool:
    """True when Triton kernels run on the CPU under ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} ({where}); expected one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` into ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    _check(backend, "backend argument")
    if backend == "auto":
        backend = _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 to run the kernels on the CPU for testing"
            )
    return backend
