"""Quadrature ops for KVA (Knowledge Vector Attribution, integrated gradients on ``down_proj`` outputs).

Integrated gradients along the straight path from a baseline ``b`` to an activation ``x`` is approximated by
a quadrature rule with nodes ``alphas[k]`` and weights ``weights[k]`` (``k = 0..m-1``)::

    IG(x) = (x - b) ⊙ Σ_k weights[k] · ∇f(b + alphas[k] · (x - b))

Two ops, each with a Triton kernel and a PyTorch path of identical semantics, work on ``G`` groups at once
(a group is one layer's activation, or one layer's whole flattened sequence):

* :func:`interpolate`: ``out[g*m + k, :] = b[g] + alphas[k] * (x[g] - b[g])`` for every (group, step) row,
  built on the fly from ``x [G, H]``, ``b [G, H]`` (or ``None`` = zeros) and ``alphas [m]``.
* :func:`weighted_grad_sum`: ``scores[g] = (x[g] - b[g]) ⊙ Σ_k weights[k] * grads[g*m + k]``, accumulated in
  fp32 (fp64 for fp64 inputs) straight into ``[G, H]``, without a per-step weighted tensor.

Both compute in fp32 whatever the storage dtype (fp64 inputs compute in fp64). :func:`quadrature` gives
Captum's nodes and weights for its five methods, bit for bit.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..backend import resolve_backend, triton_available
from .common import Launch, compute_dtype, contiguous_rows, device_guard

__all__ = ["METHODS", "quadrature", "interpolate", "weighted_grad_sum"]

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def quadrature(method: str, steps: int) -> tuple[Tensor, Tensor]:
    """``(alphas, weights)``, float64 tensors of length ``steps``, exactly as Captum's ``approximation_methods``.

    * ``riemann_left``: alphas ``linspace(0, 1 - 1/m, m)``, weights ``1/m`` (the LoKI paper's estimator:
      ``alphas[k] = k/m``).
    * ``riemann_right``: ``linspace(1/m, 1, m)``, ``1/m``.
    * ``riemann_middle``: ``linspace(1/(2m), 1 - 1/(2m), m)``, ``1/m``.
    * ``riemann_trapezoid``: ``linspace(0, 1, m)``, ``1/m`` with both ends halved (the weights sum to
      ``(m-1)/m``, not 1 -- Captum's convention, kept as is).
    * ``gausslegendre``: numpy's Gauss-Legendre nodes mapped to ``[0, 1]``, weights halved (sum 1).

    Like Captum, the Riemann alphas are float32 ``torch.linspace`` values (then widened to float64), and the
    Riemann rules need ``steps >= 2``; Gauss-Legendre needs ``steps >= 1``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quadrature method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    steps = int(steps)
    if method == "gausslegendre":
        if steps < 1:
            raise ValueError(f"gausslegendre needs steps >= 1, got {steps}")
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return torch.tensor(0.5 * (1 + nodes), dtype=torch.float64), torch.tensor(0.5 * w, dtype=torch.float64)
    if steps < 2:
        raise ValueError(f"{method} needs steps >= 2 (as in Captum), got {steps}")
    m = steps
    start, end = {
        "riemann_left": (0, 1 - 1 / m),
        "riemann_right": (1 / m, 1),
        "riemann_middle": (1 / (2 * m), 1 - 1 / (2 * m)),
        "riemann_trapezoid": (0, 1),
    }[method]
    alphas = torch.tensor(torch.linspace(start, end, m).tolist(), dtype=torch.float64)
    deltas = [1 / m] * m
    if method == "riemann_trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
    return alphas, torch.tensor(deltas, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _interpolate_kernel(
        x_ptr, b_ptr, a_ptr, out_ptr,
        H, M, stride_xg, stride_bg, stride_or,
        HAS_BASE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """out[g*M + k, h] = b[g, h] + a[k] * (x[g, h] - b[g, h]); one program per (column block, group)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        g = tl.program_id(1).to(tl.int64)
        mask = offs < H
        # Loads are widened at once: the interpreter computes bf16 arithmetic on the raw bits.
        x = tl.load(x_ptr + g * stride_xg + offs, mask=mask, other=0.0).to(COMPUTE)
        if HAS_BASE:
            b = tl.load(b_ptr + g * stride_bg + offs, mask=mask, other=0.0).to(COMPUTE)
            d = x - b
        out_row = out_ptr + g * M * stride_or + offs  # 64-bit offsets: rows can be a whole flattened sequence
        for k in range(M):
            a = tl.load(a_ptr + k).to(COMPUTE)
            if HAS_BASE:
                v = b + a * d
            else:
                v = a * x
            tl.store(out_row, v.to(out_ptr.dtype.element_ty), mask=mask)
            out_row += stride_or

    @triton.jit
    def _weighted_grad_sum_kernel(
        g_ptr, w_ptr, x_ptr, b_ptr, out_ptr,
        H, M, stride_gr, stride_xg, stride_bg, stride_og,
        HAS_BASE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """out[g, h] = (x[g, h] - b[g, h]) * sum_k w[k] * grads[g*M + k, h], accumulated in ACC."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        g = tl.program_id(1).to(tl.int64)
        mask = offs < H
        acc = tl.zeros((BLOCK,), dtype=ACC)
        grad_row = g_ptr + g * M * stride_gr + offs
        for k in range(M):
            w = tl.load(w_ptr + k).to(ACC)
            acc += w * tl.load(grad_row, mask=mask, other=0.0).to(ACC)
            grad_row += stride_gr
        d = tl.load(x_ptr + g * stride_xg + offs, mask=mask, other=0.0).to(ACC)
        if HAS_BASE:
            d = d - tl.load(b_ptr + g * stride_bg + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + g * stride_og + offs, (d * acc).to(out_ptr.dtype.element_ty), mask=mask)


def _block(h: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(h)))


def interpolate_launch(x: Tensor, alphas: Tensor, baseline: Optional[Tensor], out: Tensor) -> Launch:
    """``out[g*m + k] = b[g] + alphas[k] (x[g] - b[g])``; rows of ``x``/``baseline`` contiguous."""
    (g, h), m = x.shape, alphas.numel()
    b = x if baseline is None else baseline  # never read without a baseline
    block = _block(h)
    return Launch(
        "kva.interpolate", _interpolate_kernel, (triton.cdiv(h, block), g),  # column blocks on axis 0: no 65535 limit
        (x, b, alphas, out, h, m, x.stride(0), b.stride(0), out.stride(0)),
        dict(HAS_BASE=baseline is not None, COMPUTE=tl.float64 if alphas.dtype == torch.float64 else tl.float32,
             BLOCK=block),
    )


def weighted_grad_sum_launch(grads: Tensor, weights: Tensor, x: Tensor, baseline: Optional[Tensor],
                             out: Tensor) -> Launch:
    """``out[g] = (x[g] - b[g]) ⊙ Σ_k weights[k] grads[g*m + k]``, accumulated in ``weights``' dtype."""
    (g, h), m = x.shape, weights.numel()
    b = x if baseline is None else baseline
    block = _block(h)
    return Launch(
        "kva.weighted_grad_sum", _weighted_grad_sum_kernel, (triton.cdiv(h, block), g),
        (grads, weights, x, b, out, h, m, grads.stride(0), x.stride(0), b.stride(0), out.stride(0)),
        dict(HAS_BASE=baseline is not None, ACC=tl.float64 if weights.dtype == torch.float64 else tl.float32,
             BLOCK=block),
    )


def _check_groups(name: str, x: Tensor, baseline: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [G, H], got shape {tuple(x.shape)}")
    if baseline is not None and baseline.shape != x.shape:
        raise ValueError(f"{name}: baseline has shape {tuple(baseline.shape)}, x has {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# interpolate
# --------------------------------------------------------------------------------------------------
def _interpolate_torch(x: Tensor, alphas: Tensor, baseline: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    dt = compute_dtype(x, baseline)
    a = alphas.to(x.device, dt).view(1, -1, 1)
    xc = x.to(dt).unsqueeze(1)
    if baseline is None:
        out = a * xc
    else:
        bc = baseline.to(dt).unsqueeze(1)
        out = bc + a * (xc - bc)
    return out.to(out_dtype).reshape(-1, x.shape[1])


def _interpolate_triton(x: Tensor, alphas: Tensor, baseline: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    (g, h), m = x.shape, alphas.numel()
    out = torch.empty((g * m, h), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    dt = compute_dtype(x, baseline)
    x = contiguous_rows(x)
    b = contiguous_rows(baseline) if baseline is not None else None
    a = alphas.to(x.device, dt).contiguous()
    with device_guard(x):
        interpolate_launch(x, a, b, out)()
    return out


def interpolate(
    x: Tensor, alphas: Tensor, baseline: Optional[Tensor] = None, *, out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tensor:
    """``[G*m, H]`` interpolated activations: row ``g*m + k`` is ``b[g] + alphas[k] * (x[g] - b[g])``.

    Args:
        x: ``[G, H]`` activations (one row per group, e.g. per layer).
        alphas: ``[m]`` quadrature nodes (any float dtype).
        baseline: ``[G, H]`` or ``None`` for a zero baseline (then rows are ``alphas[k] * x[g]``).
        out_dtype: dtype of the result; ``x.dtype`` by default. The arithmetic is fp32 (fp64 for fp64 inputs).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`loki_kernels.backend`).
    """
    _check_groups("interpolate", x, baseline)
    if alphas.dim() != 1:
        raise ValueError(f"interpolate: alphas must be 1-D, got shape {tuple(alphas.shape)}")
    out_dtype = out_dtype or x.dtype
    if resolve_backend(backend, x.device) == "triton":
        return _interpolate_triton(x, alphas, baseline, out_dtype)
    return _interpolate_torch(x, alphas, baseline, out_dtype)


# --------------------------------------------------------------------------------------------------
# weighted_grad_sum
# --------------------------------------------------------------------------------------------------
def _weighted_grad_sum_torch(grads: Tensor, weights: Tensor, x: Tensor, baseline: Optional[Tensor],
                             out_dtype: torch.dtype) -> Tensor:
    dt = compute_dtype(grads, x, baseline)
    g, h = x.shape
    total = torch.einsum("gmh,m->gh", grads.reshape(g, -1, h).to(dt), weights.to(grads.device, dt))
    d = x.to(dt) if baseline is None else x.to(dt) - baseline.to(dt)
    return (d * total).to(out_dtype)


def _weighted_grad_sum_triton(grads: Tensor, weights: Tensor, x: Tensor, baseline: Optional[Tensor],
                              out_dtype: torch.dtype) -> Tensor:
    (g, h), m = x.shape, weights.numel()
    out = torch.empty((g, h), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    if m == 0:
        return out.zero_()
    dt = compute_dtype(grads, x, baseline)
    grads, x = contiguous_rows(grads), contiguous_rows(x)
    b = contiguous_rows(baseline) if baseline is not None else None
    w = weights.to(x.device, dt).contiguous()
    with device_guard(x):
        weighted_grad_sum_launch(grads, w, x, b, out)()
    return out


def weighted_grad_sum(
    grads: Tensor, weights: Tensor, x: Tensor, baseline: Optional[Tensor] = None, *,
    out_dtype: torch.dtype = torch.float32, backend: str = "auto",
) -> Tensor:
    """``[G, H]`` integrated-gradient scores: ``(x[g] - b[g]) ⊙ Σ_k weights[k] * grads[g*m + k]``.

    Args:
        grads: ``[G*m, H]`` gradients at the interpolated points, rows ordered as :func:`interpolate` makes them.
        weights: ``[m]`` quadrature weights.
        x, baseline: ``[G, H]`` each (``baseline=None`` is zero).
        out_dtype: float32 by default. Accumulation is fp32 (fp64 when any input is fp64).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    _check_groups("weighted_grad_sum", x, baseline)
    if weights.dim() != 1:
        raise ValueError(f"weighted_grad_sum: weights must be 1-D, got shape {tuple(weights.shape)}")
    if grads.shape != (x.shape[0] * weights.numel(), x.shape[1]):
        raise ValueError(
            f"weighted_grad_sum: grads has shape {tuple(grads.shape)}, expected "
            f"({x.shape[0] * weights.numel()}, {x.shape[1]}) for {x.shape[0]} groups of {weights.numel()} steps"
        )
    if resolve_backend(backend, x.device) == "triton":
        return _weighted_grad_sum_triton(grads, weights, x, baseline, out_dtype)
    return _weighted_grad_sum_torch(grads, weights, x, baseline, out_dtype)
