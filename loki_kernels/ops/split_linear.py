"""Split linear: ``y = x Wᵀ + b`` where only the rows ``active_pos`` of ``W`` (and ``b``) are trained.

This is the op behind LoKI. ``W`` is a ``down_proj`` weight of shape ``[N, K]`` (N = hidden size,
K = d_ff); row ``n`` writes output channel ``n``. The trainable rows live in their own tensor
``weight_active[k, K]`` (row ``i`` is row ``active_pos[i]`` of ``W``); ``weight`` keeps every row and is
never trained. Its rows at ``active_pos`` are stale copies that each backend treats differently:

* ``"triton"``: three kernels read every weight row from wherever it lives (``weight_active`` for active
  rows, ``weight`` for the rest), so ``weight`` is never written:
  forward ``Y = X Wᵀ``, input gradient ``dX = dY W``, and ``dW_active = dY[:, active_pos]ᵀ X`` for the
  ``k`` active rows only (the column gather of ``dY`` is fused into the kernel's loads).
* ``"torch"``: copies the ``k`` active rows into ``weight`` in place, then one dense ``F.linear``;
  ``dX = dY W``; the weight gradient again only for the active rows.

Neither backend materialises a merged weight per call, concatenates outputs or gathers them back,
and neither ever forms a full-size weight gradient. Frozen rows get no gradient at all.

``slot`` is the inverse map of ``active_pos``: ``slot[n] = i`` if ``active_pos[i] == n``, else ``-1``.
"""


import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import interpreting, resolve_backend, triton_available

__all__ = ["split_linear", "make_slot", "SplitLinearFunction"]


def make_slot(active_pos: Tensor, out_features: int) -> Tensor:
    """``int32[out_features]``: position of each row in ``weight_active``, or -1 for frozen rows."""
    slot = torch.full((out_features,), -1, dtype=torch.int32, device=active_pos.device)
    slot[active_pos] = torch.arange(active_pos.numel(), dtype=torch.int32, device=active_pos.device)
    return slot


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    def _autotune(configs, key):
        # The interpreter cannot benchmark (it has no driver): it gets exactly one small config.
        if interpreting():
            configs = [triton.Config({"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_R": 16, "GROUP": 2})]
        return triton.autotune(configs=configs, key=key)

    def _cfg(a, b, r, stages, warps, group=8):
        return triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_R": r, "GROUP": group},
                             num_stages=stages, num_warps=warps)

    # Every kernel computes a [BLOCK_A, BLOCK_B] tile of an output and reduces over BLOCK_R at a time.
    _CONFIGS = [
        _cfg(128, 256, 64, 3, 8),
        _cfg(256, 128, 64, 3, 8),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 128, 32, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ]
    # Autotune keys: the token count enters only through its bucket, so new sequence lengths do not retune.
    _MATMUL_KEY = ["M_BUCKET", "B", "R"]  # forward and grad_input: A = tokens
    _GRAD_WEIGHT_KEY = ["M_BUCKET", "A", "B"]  # grad_weight: R = tokens

    @triton.jit
    def _tile(pid, A, B, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr):
        """Grouped tile order, so that consecutive programs reuse the same operand tiles from L2."""
        num_a = tl.cdiv(A, BLOCK_A)
        num_b = tl.cdiv(B, BLOCK_B)
        per_group = GROUP * num_b
        first_a = (pid // per_group) * GROUP
        size_a = min(num_a - first_a, GROUP)
        pid_a = first_a + (pid % per_group) % size_a
        pid_b = (pid % per_group) // size_a
        return pid_a, pid_b

    @triton.jit
    def _weight_rows(slot, rows, w_ptr, wa_ptr, stride_wn, stride_wk, stride_an, stride_ak):
        """Start pointer and K-stride of each weight row: ``weight_active`` if active, else ``weight``."""
        active = slot >= 0
        start = tl.where(active, wa_ptr + slot.to(tl.int64) * stride_an, w_ptr + rows.to(tl.int64) * stride_wn)
        kstride = tl.where(active, stride_ak, stride_wk)
        return start, kstride

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:  # the interpreter computes bf16 wrongly; it gets fp32 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @_autotune(_CONFIGS, _MATMUL_KEY)
    @triton.jit
    def _forward_kernel(
        x_ptr, w_ptr, wa_ptr, slot_ptr, b_ptr, ba_ptr, y_ptr,
        A, B, R, M_BUCKET,  # A = tokens, B = out features, R = in features
        stride_xm, stride_xk, stride_wn, stride_wk, stride_an, stride_ak, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
    ):
        """Y[m, n] = sum_k X[m, k] * W[n, k] (+ b[n]), each W row read from its own tensor."""
        pid_m, pid_n = _tile(tl.program_id(0), A, B, BLOCK_A, BLOCK_B, GROUP)
        offs_m = pid_m * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_n = pid_n * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_k = tl.arange(0, BLOCK_R)
        mask_m = offs_m < A
        mask_n = offs_n < B
        slot = tl.load(slot_ptr + offs_n, mask=mask_n, other=-1)
        w_start, w_kstride = _weight_rows(slot, offs_n, w_ptr, wa_ptr, stride_wn, stride_wk, stride_an, stride_ak)

        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_start[None, :] + offs_k[:, None] * w_kstride[None, :]  # [BLOCK_R, BLOCK_B] = Wᵀ tile
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        for r in range(0, tl.cdiv(R, BLOCK_R)):
            k_left = R - r * BLOCK_R
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc = _dot(x, w, acc, UPCAST, PRECISION)
            x_ptrs += BLOCK_R * stride_xk
            w_ptrs += BLOCK_R * w_kstride[None, :]

        if HAS_BIAS:
            active = slot >= 0
            bias = tl.where(
                active,
                tl.load(ba_ptr + slot, mask=mask_n & active, other=0.0),
                tl.load(b_ptr + offs_n, mask=mask_n & ~active, other=0.0),
            )
            acc += bias.to(ACC)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @_autotune(_CONFIGS, _MATMUL_KEY)
    @triton.jit
    def _grad_input_kernel(
        dy_ptr, w_ptr, wa_ptr, slot_ptr, dx_ptr,
        A, B, R, M_BUCKET,  # A = tokens, B = in features, R = out features
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_an, stride_ak, stride_dxm, stride_dxk,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
    ):
        """dX[m, k] = sum_n dY[m, n] * W[n, k], each W row read from its own tensor."""
        pid_m, pid_k = _tile(tl.program_id(0), A, B, BLOCK_A, BLOCK_B, GROUP)
        offs_m = pid_m * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_k = pid_k * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_m = offs_m < A
        mask_k = offs_k < B
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        for r in range(0, tl.cdiv(R, BLOCK_R)):
            offs_n = r * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_n = offs_n < R
            slot = tl.load(slot_ptr + offs_n, mask=mask_n, other=-1)
            w_start, w_kstride = _weight_rows(slot, offs_n, w_ptr, wa_ptr, stride_wn, stride_wk, stride_an, stride_ak)
            dy = tl.load(
                dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn,
                mask=mask_m[:, None] & mask_n[None, :], other=0.0,
            )
            w = tl.load(
                w_start[:, None] + offs_k[None, :] * w_kstride[:, None],
                mask=mask_n[:, None] & mask_k[None, :], other=0.0,
            )
            acc = _dot(dy, w, acc, UPCAST, PRECISION)
        dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])

    @_autotune(_CONFIGS, _GRAD_WEIGHT_KEY)
    @triton.jit
    def _grad_weight_kernel(
        dy_ptr, x_ptr, pos_ptr, dw_ptr,
        A, B, R, M_BUCKET,  # A = active rows, B = in features, R = tokens
        stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwp, stride_dwk,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
    ):
        """dW_active[i, k] = sum_m dY[m, active_pos[i]] * X[m, k]: only the active rows, gather fused."""
        pid_p, pid_k = _tile(tl.program_id(0), A, B, BLOCK_A, BLOCK_B, GROUP)
        offs_p = pid_p * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_k = pid_k * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_p = offs_p < A
        mask_k = offs_k < B
        cols = tl.load(pos_ptr + offs_p, mask=mask_p, other=0)
        offs_m = tl.arange(0, BLOCK_R)
        dyt_ptrs = dy_ptr + offs_m[None, :].to(tl.int64) * stride_dym + cols[:, None] * stride_dyn  # dYᵀ tile
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        for r in range(0, tl.cdiv(R, BLOCK_R)):
            m_left = R - r * BLOCK_R
            dyt = tl.load(dyt_ptrs, mask=mask_p[:, None] & (offs_m[None, :] < m_left), other=0.0)
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < m_left) & mask_k[None, :], other=0.0)
            acc = _dot(dyt, x, acc, UPCAST, PRECISION)
            dyt_ptrs += BLOCK_R * stride_dym
            x_ptrs += BLOCK_R * stride_xm
        dw_ptrs = dw_ptr + offs_p[:, None].to(tl.int64) * stride_dwp + offs_k[None, :] * stride_dwk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_k[None, :])


def _bucket(m: int) -> int:
    """Autotune key for the token count: retune at most once per bucket, not per sequence length."""
    if m <= 256:
        return (m + 31) // 32 * 32
    if m <= 4096:
        return (m + 127) // 128 * 128
    return 8192


def _kernel_flags(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"
    else:
        precision = "ieee"
    return {
        "UPCAST": interpreting() and dtype == torch.bfloat16,
        "PRECISION": precision,
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _grid(a: int, b: int):
    return lambda meta: (triton.cdiv(a, meta["BLOCK_A"]) * triton.cdiv(b, meta["BLOCK_B"]),)


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The launchers are torch.library custom ops, so torch.compile sees them as opaque calls.
@torch.library.custom_op("loki_kernels::split_linear_forward", mutates_args=())
def triton_forward(
    x: Tensor, weight: Tensor, weight_active: Tensor, slot: Tensor,
    bias: Optional[Tensor], bias_active: Optional[Tensor],
) -> Tensor:
    """Triton forward on a 2-D ``x``: ``[M, K] -> [M, N]``."""
    (m, k), n = x.shape, weight.shape[0]
    y = x.new_empty((m, n))
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(_merged_bias(bias, bias_active, slot).expand(m, n))
    has_bias = bias is not None
    b = bias if has_bias else weight  # never read when HAS_BIAS is False
    ba = bias_active if has_bias else weight
    with _device_guard(x):
        _forward_kernel[_grid(m, n)](
            x, weight, weight_active, slot, b, ba, y,
            m, n, k, _bucket(m),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            weight_active.stride(0), weight_active.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=has_bias, **_kernel_flags(x.dtype),
        )
    return y


@triton_forward.register_fake
def _(x, weight, weight_active, slot, bias, bias_active):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("loki_kernels::split_linear_grad_input", mutates_args=())
def triton_grad_input(grad_out: Tensor, weight: Tensor, weight_active: Tensor, slot: Tensor) -> Tensor:
    """Triton ``dX = dY W`` on a 2-D ``grad_out``: ``[M, N] -> [M, K]``."""
    (m, n), k = grad_out.shape, weight.shape[1]
    dx = grad_out.new_empty((m, k))
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    with _device_guard(grad_out):
        _grad_input_kernel[_grid(m, k)](
            grad_out, weight, weight_active, slot, dx,
            m, k, n, _bucket(m),
            grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight.stride(1),
            weight_active.stride(0), weight_active.stride(1), dx.stride(0), dx.stride(1),
            **_kernel_flags(grad_out.dtype),
        )
    return dx


@triton_grad_input.register_fake
def _(grad_out, weight, weight_active, slot):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


@torch.library.custom_op("loki_kernels::split_linear_grad_weight", mutates_args=())
def triton_grad_weight(grad_out: Tensor, x: Tensor, active_pos: Tensor) -> Tensor:
    """Triton ``dW_active = dY[:, active_pos]ᵀ X``: ``[k, K]`` in ``x``'s dtype."""
    (m, k), p = x.shape, active_pos.numel()
    dw = x.new_empty((p, k))
    if p == 0 or k == 0:
        return dw
    if m == 0:
        return dw.zero_()
    with _device_guard(x):
        _grad_weight_kernel[_grid(p, k)](
            grad_out, x, active_pos, dw,
            p, k, m, _bucket(m),
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
            **_kernel_flags(x.dtype),
        )
    return dw


@triton_grad_weight.register_fake
def _(grad_out, x, active_pos):
    return x.new_empty((active_pos.numel(), x.shape[1]))


# --------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------
def _merged_bias(bias: Tensor, bias_active: Optional[Tensor], slot: Tensor) -> Tensor:
    active = slot >= 0
    return bias.masked_scatter(active, bias_active) if active.any() else bias


@torch.no_grad()
def merge_rows_(weight: Tensor, weight_active: Tensor, active_pos: Tensor,
                bias: Optional[Tensor] = None, bias_active: Optional[Tensor] = None) -> None:
    """Copy the active rows into the full ``weight`` (and ``bias``) in place."""
    if active_pos.numel():
        weight.index_copy_(0, active_pos, weight_active.to(weight.dtype))
        if bias is not None:
            bias.index_copy_(0, active_pos, bias_active.to(bias.dtype))


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
class SplitLinearFunction(torch.autograd.Function):
    """``x [..., K] -> y [..., N]``. Gradients flow to ``x``, ``weight_active`` and ``bias_active`` only."""

    @staticmethod
    def forward(ctx, x, weight, weight_active, bias, bias_active, active_pos, slot, backend):
        x2d = x.reshape(-1, x.shape[-1])
        if backend == "triton":
            y = triton_forward(x2d, weight, weight_active, slot, bias, bias_active)
        else:
            merge_rows_(weight, weight_active, active_pos, bias, bias_active)
            y = F.linear(x2d, weight, bias)
        # The frozen weight is held as an attribute: the torch path rewrites its active rows on every
        # call, which is harmless (same values) but would trip save_for_backward's version check.
        ctx.weight, ctx.backend, ctx.x_shape = weight, backend, x.shape
        ctx.save_for_backward(
            x2d if ctx.needs_input_grad[2] else None,
            weight_active if ctx.needs_input_grad[0] else None,
            active_pos,
            slot,
        )
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight_active, active_pos, slot = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_wa = grad_ba = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                grad_x = triton_grad_input(dy, ctx.weight, weight_active, slot)
            else:
                grad_x = dy @ ctx.weight
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            if ctx.backend == "triton":
                grad_wa = triton_grad_weight(dy, x2d, active_pos)
            else:
                grad_wa = dy.index_select(1, active_pos).t() @ x2d
        if ctx.needs_input_grad[4]:
            grad_ba = dy.index_select(1, active_pos).sum(0)
        return grad_x, None, grad_wa, None, grad_ba, None, None, None


def _check_inputs(x, weight, weight_active, active_pos, bias, bias_active, slot):
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"split_linear: x has {x.shape[-1]} features, weight expects {k}")
    if weight_active.shape != (active_pos.numel(), k):
        raise ValueError(
            f"split_linear: weight_active has shape {tuple(weight_active.shape)}, "
            f"expected ({active_pos.numel()}, {k}) for {active_pos.numel()} active rows"
        )
    if slot.shape != (n,):
        raise ValueError(f"split_linear: slot has shape {tuple(slot.shape)}, expected ({n},)")
    if (bias is None) != (bias_active is None):
        raise ValueError("split_linear: pass both bias and bias_active, or neither")
    dtypes = {t.dtype for t in (x, weight, weight_active, bias, bias_active) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"split_linear: inputs must share one dtype, got {sorted(map(str, dtypes))}")


def split_linear(
    x: Tensor,
    weight: Tensor,
    weight_active: Tensor,
    active_pos: Tensor,
    bias: Optional[Tensor] = None,
    bias_active: Optional[Tensor] = None,
    *,
    slot: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """``y = x Wᵀ + b`` where rows ``active_pos`` of ``W``/``b`` come from ``weight_active``/``bias_active``.

    Args:
        x: ``[..., K]``, any leading shape, contiguous or not.
        weight: ``[N, K]`` (may be a transposed view); its rows at ``active_pos`` are ignored by the
            Triton path and overwritten in place by the PyTorch path. Never receives a gradient.
        weight_active: ``[k, K]``; row ``i`` is row ``active_pos[i]`` of the layer.
        active_pos: ``int64[k]``, sorted, unique, in ``[0, N)``.
        bias, bias_active: ``[N]`` and ``[k]``, or both ``None``.
        slot: ``make_slot(active_pos, N)``; computed when not given (modules cache it).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`loki_kernels.backend`).

    Under autocast, inputs are cast to the autocast dtype like ``F.linear`` does.
    """
    if slot is None:
        slot = make_slot(active_pos, weight.shape[0])
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, weight_active = x.to(dtype), weight.to(dtype), weight_active.to(dtype)
        if bias is not None:
            bias, bias_active = bias.to(dtype), bias_active.to(dtype)
    _check_inputs(x, weight, weight_active, active_pos, bias, bias_active, slot)
    backend = resolve_backend(backend, x.device)
    with torch.autocast(device_type, enabled=False):
        return SplitLinearFunction.apply(x, weight, weight_active, bias, bias_active, active_pos, slot, backend)
