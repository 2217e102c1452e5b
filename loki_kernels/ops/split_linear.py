"""Split linear: ``y = x Wᵀ + b`` where only the rows ``active_pos`` of ``W`` (and ``b``) are trained.

This is the op behind LoKI. ``W`` is a ``down_proj`` weight of shape ``[N, K]`` (N = hidden size,
K = d_ff); row ``n`` writes output channel ``n``. The ``k`` trainable rows live in their own tensor
``weight_active [k, K]`` (row ``i`` is row ``active_pos[i]`` of ``W``); the frozen rows live in ``weight``,
in one of two layouts:

* **full** ``[N, K]`` (:class:`~loki_kernels.modules.SplitLinear`): every row of the layer, as the original
  layer held it; the rows at ``active_pos`` are stale copies that each backend treats differently (below);
* **compact** ``[N - k, K]`` (the original ``LoKILinear``'s ``frozen.weight``): the frozen rows only, in order.

``index_map [N]`` (:func:`make_index_map`) says where each row lives: ``index_map[n] < k`` means row
``weight_active[index_map[n]]``, otherwise row ``weight[index_map[n] - k]``. For the compact layout this is
exactly the original ``LoKILinear.index_map``; for the full layout frozen row ``n`` maps to ``k + n``.

Each of the three ops (:data:`OPS`) runs one of two implementations (:func:`choose_plan`):

* ``"triton"``: three GEMM kernels read every weight row from wherever it lives, so ``weight`` is never
  written: forward ``Y = X Wᵀ``, input gradient ``dX = dY W``, and ``dW_active = dY[:, active_pos]ᵀ X``
  for the ``k`` active rows only (the column gather of ``dY`` is fused into the kernel's loads). They take
  fp16/bf16 (fp32 forward as tf32) and weights whose rows are K-contiguous and 16-byte aligned.
* ``"torch"``: full layout: :func:`write_back_` copies the ``k`` active rows into ``weight`` in place, then
  one dense ``F.linear``; compact layout: the whole weight is built for the call. ``dX = dY W``; the weight
  gradient from the gathered rows of ``dYᵀ``, for the active rows only.

``backend="auto"`` on CUDA takes each op's measured choice (:mod:`loki_kernels.backend_choices`); on an
H100 that is ``"torch"`` for all three (``benchmarks/results/h100-2026-11-25``).

Neither backend concatenates outputs or gathers them back, and neither ever forms a full-size weight
gradient. Frozen rows get no gradient at all.

**Silenced rows** (``silenced``, a ``bool[N]`` mask, FNSFT's training-time ``out * m`` without a hook): their
outputs are zero and their ``dY`` columns are dropped before both gradients. The kernels take the mask as
-1 entries of the map they already load (:func:`silenced_map`, a compile-time ``SILENCE`` switch, so no mask
costs nothing): the forward skips the silenced rows' weights and zeroes their outputs in the epilogue, the
dX kernel loads their weight rows as zeros, the dW kernel zeroes the silenced active rows it wrote. The
PyTorch path fills the output (and ``dY`` before ``dX``, and the gradient rows of silenced active rows) with
zeros.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import interpreting, resolve_plan, triton_available
from .common import Launch, device_guard, rows_aligned, shared_memory_limit, upcast_operands

__all__ = [
    "split_linear", "choose_plan", "make_index_map", "ordered_rows", "write_back_", "dense_weight",
    "silenced_map", "SplitLinearFunction", "OPS",
]

# The three ops of a training step, each with its own implementation choice (``backend="auto"``).
OPS = ("forward", "grad_input", "grad_weight")


def make_index_map(active_pos: Tensor, out_features: int, *, compact: bool = False) -> Tensor:
    """``int64[out_features]``: where each row lives (see the module docstring).

    ``active_pos`` must be sorted and unique. ``compact=False``: frozen row ``n`` maps to ``k + n`` (a full
    ``weight``); ``compact=True``: the ``j``-th frozen row maps to ``k + j`` (the original ``LoKILinear``).
    """
    k = active_pos.numel()
    device = active_pos.device
    index_map = torch.empty(out_features, dtype=torch.long, device=device)
    frozen = torch.ones(out_features, dtype=torch.bool, device=device)
    frozen[active_pos] = False
    if compact:
        index_map[frozen] = k + torch.arange(out_features - k, device=device)
    else:
        index_map[frozen] = k + frozen.nonzero().flatten()
    index_map[active_pos] = torch.arange(k, device=device)
    return index_map


def ordered_rows(active: Tensor, frozen: Tensor, index_map: Tensor) -> Tensor:
    """The layer's rows in order (``[N, ...]``), from ``active`` and ``frozen`` rows in either layout."""
    return torch.cat([active.to(frozen.dtype), frozen]).index_select(0, index_map)


@torch.no_grad()
def write_back_(weight: Tensor, weight_active: Tensor, active_pos: Tensor,
                bias: Optional[Tensor] = None, bias_active: Optional[Tensor] = None) -> None:
    """Copy the trained rows into a full-layout ``weight`` (and ``bias``) in place."""
    if active_pos.numel():
        weight.index_copy_(0, active_pos, weight_active.to(weight.dtype))
        if bias is not None:
            bias.index_copy_(0, active_pos, bias_active.to(bias.dtype))


# --------------------------------------------------------------------------------------------------
# Triton kernels
#
# Each kernel names its dimensions after the GEMM it computes:
#   forward      Y[M, N]         = X[M, K] · W[N, K]ᵀ            M tokens, N out features, K in features
#   grad_input   dX[M, K]        = dY[M, N] · W[N, K]
#   grad_weight  dW_active[P, K] = dY[M, active_pos]ᵀ · X[M, K]  P active rows
# A program computes one output tile (BLOCK_<rows> x BLOCK_<cols>) and reduces BLOCK_<reduced> at a time.
# --------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    from .common import autotune

    # (output rows, output columns, reduction) tile sizes, stages, warps
    _TILES = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    # grad_weight gathers dY's active columns element by element: one address register per element, so
    # large BLOCK_P x BLOCK_M tiles spill (the ahead-of-time check shows it); it gets tiles of its own.
    _GATHER_TILES = [
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 32, 4, 4),
        (32, 128, 64, 4, 4),
    ]

    def _tuned(rows: str, cols: str, reduced: str, key: list[str], tiles=None):
        """Autotune over the tiles that fit the GPU (:func:`fits`), with the kernel's own block names.

        Under the interpreter: one small tile.
        """
        names = (f"BLOCK_{rows}", f"BLOCK_{cols}", f"BLOCK_{reduced}")
        configs = [triton.Config({**dict(zip(names, tile[:3])), "GROUP": 8}, num_stages=tile[3], num_warps=tile[4])
                   for tile in tiles or _TILES]
        small = triton.Config({**dict.fromkeys(names, 16), "GROUP": 2})

        def prune(configs, nargs, **kwargs):
            operand = next(v for v in nargs.values() if isinstance(v, Tensor))
            major = torch.cuda.get_device_capability(operand.device)[0]
            limit = shared_memory_limit(operand.device)
            kept = [c for c in configs if fits(c, operand.element_size(), limit, major)]
            return kept or configs[-1:]  # the smallest tile; compiling it reports the real error, if any

        return autotune(configs, key, small, prune=prune)

    def block_sizes(config) -> tuple[int, int, int]:
        """``(rows, cols, reduced)`` block sizes of a config made by ``_tuned``, in that order."""
        rows, cols, reduced = (v for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
        return rows, cols, reduced

    def fits(config, element_size: int, shared_memory: int, capability_major: int) -> bool:
        """Whether ``config`` suits a GPU with ``shared_memory`` bytes per block and this compute capability.

        Shared memory: ``num_stages`` buffers of both operand tiles must fit (an estimate; the ahead-of-time
        check, :mod:`loki_kernels.ops.aot`, reads the real figure from the compiled kernel). Registers:
        before Hopper (``mma.sync``, operands in registers) a tile whose rows·cols·reduced bytes per thread
        exceed 8 KiB spills, as the ahead-of-time check shows for sm_80; Hopper's ``wgmma`` reads operands
        from shared memory and takes them all.
        """
        rows, cols, reduced = block_sizes(config)
        if config.num_stages * (rows + cols) * reduced * element_size > shared_memory:
            return False
        threads = 32 * config.num_warps
        return capability_major >= 9 or rows * cols * reduced * element_size // threads <= 8192

    @triton.jit
    def _tile(pid, ROWS, COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
        """Grouped tile order, so that consecutive programs reuse the same operand tiles from L2."""
        num_rows = tl.cdiv(ROWS, BLOCK_ROWS)
        num_cols = tl.cdiv(COLS, BLOCK_COLS)
        per_group = GROUP * num_cols
        first = (pid // per_group) * GROUP
        size = min(num_rows - first, GROUP)
        pid_rows = first + (pid % per_group) % size
        pid_cols = (pid % per_group) // size
        return pid_rows, pid_cols

    @triton.jit
    def _weight_tile(src, offs_k, num_active, w_ptr, wa_ptr, stride_wn, stride_an):
        """``[rows, len(offs_k)]`` pointers to ``W[n, offs_k]`` for the rows ``src = index_map[n]``.

        Each row starts in one of two tensors (active or frozen), so its start is a ``tl.where`` between two
        base pointers, which tells Triton nothing about alignment: without the hint, every element would
        be a 2-byte scalar load. The launchers run these kernels only on weights whose rows are K-contiguous,
        16-byte aligned and 16-byte strided (:func:`~loki_kernels.ops.common.rows_aligned`), which makes the
        hint true; then the tiles load as 16-byte vectors (the ahead-of-time check counts them).
        """
        src = src.to(tl.int64)
        start = tl.where(src < num_active, wa_ptr + src * stride_an, w_ptr + (src - num_active) * stride_wn)
        return tl.multiple_of(start, 16)[:, None] + offs_k[None, :]

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:  # the interpreter computes bf16 wrongly; it gets fp32 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @_tuned("M", "N", "K", key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _forward_kernel(
        x_ptr, w_ptr, wa_ptr, map_ptr, b_ptr, ba_ptr, y_ptr,
        M, N, K, M_BUCKET, NUM_ACTIVE,
        stride_xm, stride_xk, stride_wn, stride_an, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, SILENCE: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    ):
        """Y[m, n] = sum_k X[m, k] * W[n, k] (+ b[n]), each W row read from where index_map says.

        SILENCE: ``index_map[n] < 0`` marks a silenced row: its W row and bias are not read and Y[:, n] = 0.
        """
        pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        src = tl.load(map_ptr + offs_n, mask=mask_n, other=NUM_ACTIVE)
        rows_n = mask_n  # the rows whose weights are read
        if SILENCE:
            kept = src >= 0
            rows_n = mask_n & kept
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = _weight_tile(src, offs_k, NUM_ACTIVE, w_ptr, wa_ptr, stride_wn, stride_an)  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - kk * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=rows_n[:, None] & (offs_k[None, :] < k_left), other=0.0)
            acc = _dot(x, tl.trans(w), acc, UPCAST, PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K

        if HAS_BIAS:
            active = src < NUM_ACTIVE
            bias = tl.where(
                active,
                tl.load(ba_ptr + src, mask=rows_n & active, other=0.0),
                tl.load(b_ptr + (src - NUM_ACTIVE), mask=rows_n & ~active, other=0.0),
            )
            acc += bias.to(ACC)[None, :]
        if SILENCE:  # exact zeros, also where X holds inf or nan
            acc = tl.where(kept[None, :], acc, 0.0)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @_tuned("M", "K", "N", key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _grad_input_kernel(
        dy_ptr, w_ptr, wa_ptr, map_ptr, dx_ptr,
        M, N, K, M_BUCKET, NUM_ACTIVE,
        stride_dym, stride_dyn, stride_wn, stride_an, stride_dxm, stride_dxk,
        SILENCE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
    ):
        """dX[m, k] = sum_n dY[m, n] * W[n, k], each W row read from where index_map says.

        SILENCE: a silenced row (``index_map[n] < 0``) is loaded as zeros, which drops dY[:, n] from the sum
        (the predicate is per row, so the K-contiguous weight rows still load as 16-byte vectors; masking
        dY's columns instead would split its row-contiguous loads).
        """
        pid_m, pid_k = _tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        for nn in range(0, tl.cdiv(N, BLOCK_N)):
            offs_n = nn * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            src = tl.load(map_ptr + offs_n, mask=mask_n, other=NUM_ACTIVE)
            rows_n = mask_n & (src >= 0) if SILENCE else mask_n
            dy = tl.load(
                dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn,
                mask=mask_m[:, None] & mask_n[None, :], other=0.0,
            )
            w = tl.load(
                _weight_tile(src, offs_k, NUM_ACTIVE, w_ptr, wa_ptr, stride_wn, stride_an),
                mask=rows_n[:, None] & mask_k[None, :], other=0.0,
            )
            acc = _dot(dy, w, acc, UPCAST, PRECISION)
        dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])

    @_tuned("P", "K", "M", key=["M_BUCKET", "P", "K"], tiles=_GATHER_TILES)
    @triton.jit
    def _grad_weight_kernel(
        dy_ptr, x_ptr, pos_ptr, dw_ptr,
        M, P, K, M_BUCKET,
        stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwp, stride_dwk,
        SILENCE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
    ):
        """dW_active[p, k] = sum_m dY[m, active_pos[p]] * X[m, k]: only the active rows, gather fused.

        SILENCE: ``active_pos[p] < 0`` marks a silenced active row: dW_active[p] = 0, set after the loop, which
        runs exactly as without the mask (masking dY's column in the loop instead spills the 64x128 tile on
        sm_80 under triton 3.9, which already holds 244 registers there; the ahead-of-time check shows it).
        """
        pid_p, pid_k = _tile(tl.program_id(0), P, K, BLOCK_P, BLOCK_K, GROUP)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_p = offs_p < P
        mask_k = offs_k < K
        cols = tl.load(pos_ptr + offs_p, mask=mask_p, other=0)
        if SILENCE:  # a silenced row (-1) reads dY's column 0 and is zeroed after the loop
            cols = tl.maximum(cols, 0)
        offs_m = tl.arange(0, BLOCK_M)
        dyt_ptrs = dy_ptr + offs_m[None, :].to(tl.int64) * stride_dym + cols[:, None] * stride_dyn  # dYᵀ tile
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=ACC)
        for mm in range(0, tl.cdiv(M, BLOCK_M)):
            m_left = M - mm * BLOCK_M
            dyt = tl.load(dyt_ptrs, mask=mask_p[:, None] & (offs_m[None, :] < m_left), other=0.0)
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < m_left) & mask_k[None, :], other=0.0)
            acc = _dot(dyt, x, acc, UPCAST, PRECISION)
            dyt_ptrs += BLOCK_M * stride_dym
            x_ptrs += BLOCK_M * stride_xm
        dw = acc.to(dw_ptr.dtype.element_ty)
        if SILENCE:  # the predicate is reloaded, not kept live through the loop
            kept = tl.load(pos_ptr + offs_p, mask=mask_p, other=0) >= 0
            dw = tl.where(kept[:, None], dw, 0.0)
        dw_ptrs = dw_ptr + offs_p[:, None].to(tl.int64) * stride_dwp + offs_k[None, :] * stride_dwk
        tl.store(dw_ptrs, dw, mask=mask_p[:, None] & mask_k[None, :])


def _bucket(m: int) -> int:
    """Autotune key for the token count: retune at most once per bucket, not per sequence length."""
    if m <= 256:
        return (m + 31) // 32 * 32
    if m <= 4096:
        return (m + 127) // 128 * 128
    return 8192


def triton_runs(op: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernel of ``op`` (one of :data:`OPS`) takes ``dtype`` on ``device``.

    fp16/bf16 always. fp32 only for the forward, as tf32, and only when
    ``torch.backends.cuda.matmul.allow_tf32`` allows it: Triton's exact fp32 product runs on plain FMAs,
    far below cuBLAS; and Hopper's tf32 ``wgmma`` needs both operands K-major in shared memory, so the
    gradient kernels (whose weight or input tile is reduction-major) would load it 4 bytes at a time (the
    ahead-of-time check shows it). Those run PyTorch, where cuBLAS follows the same tf32 flag. fp64 never
    runs Triton on a GPU. Under the interpreter (CPU tensors, tests) every op takes every dtype, exact.
    """
    if device.type != "cuda":
        return interpreting()
    if dtype == torch.float32:
        return op == "forward" and torch.backends.cuda.matmul.allow_tf32
    return dtype in (torch.float16, torch.bfloat16)


def _kernel_flags(dtype: torch.dtype) -> dict:
    return {
        "UPCAST": upcast_operands(dtype),
        "PRECISION": "ieee" if interpreting() or dtype != torch.float32 else "tf32",
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _grid(rows: int, cols: int, block_rows: str, block_cols: str):
    return lambda meta: (triton.cdiv(rows, meta[block_rows]) * triton.cdiv(cols, meta[block_cols]),)


def forward_launch(x: Tensor, weight: Tensor, weight_active: Tensor, index_map: Tensor,
                   bias: Optional[Tensor], bias_active: Optional[Tensor], y: Tensor, *,
                   silence: bool = False) -> Launch:
    """``y = x Wᵀ (+ b)`` for a 2-D ``x [M, K]`` into ``y [M, N]``; M, N, K > 0; weights :func:`rows_aligned`.

    ``silence``: ``index_map`` is a :func:`silenced_map` (negative entries: rows whose output is zero).
    """
    (m, k), n = x.shape, index_map.numel()
    has_bias = bias is not None
    b = bias if has_bias else weight  # never read when HAS_BIAS is False
    ba = bias_active if has_bias else weight
    return Launch(
        "split_linear.forward", _forward_kernel, _grid(m, n, "BLOCK_M", "BLOCK_N"),
        (x, weight, weight_active, index_map, b, ba, y,
         m, n, k, _bucket(m), weight_active.shape[0],
         x.stride(0), x.stride(1), weight.stride(0), weight_active.stride(0), y.stride(0), y.stride(1)),
        dict(HAS_BIAS=has_bias, SILENCE=silence, **_kernel_flags(x.dtype)),
    )


def grad_input_launch(grad_out: Tensor, weight: Tensor, weight_active: Tensor, index_map: Tensor,
                      dx: Tensor, *, silence: bool = False) -> Launch:
    """``dx = dY W`` for ``grad_out [M, N]`` into ``dx [M, K]``; M, N, K > 0; weights :func:`rows_aligned`.

    ``silence``: ``index_map`` is a :func:`silenced_map`; the silenced rows' columns of dY are left out.
    """
    (m, n), k = grad_out.shape, weight.shape[1]
    return Launch(
        "split_linear.grad_input", _grad_input_kernel, _grid(m, k, "BLOCK_M", "BLOCK_K"),
        (grad_out, weight, weight_active, index_map, dx,
         m, n, k, _bucket(m), weight_active.shape[0],
         grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight_active.stride(0),
         dx.stride(0), dx.stride(1)),
        dict(SILENCE=silence, **_kernel_flags(grad_out.dtype)),
    )


def grad_weight_launch(grad_out: Tensor, x: Tensor, active_pos: Tensor, dw: Tensor, *,
                       silence: bool = False) -> Launch:
    """``dw = dY[:, active_pos]ᵀ X`` into ``dw [P, K]``; M, P, K > 0.

    ``silence``: ``active_pos`` holds -1 for the silenced active rows, whose ``dw`` rows are zero.
    """
    (m, k), p = x.shape, active_pos.numel()
    return Launch(
        "split_linear.grad_weight", _grad_weight_kernel, _grid(p, k, "BLOCK_P", "BLOCK_K"),
        (grad_out, x, active_pos, dw,
         m, p, k, _bucket(m),
         grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1)),
        dict(SILENCE=silence, **_kernel_flags(x.dtype)),
    )


def silenced_map(index_map: Tensor, silenced: Tensor) -> Tensor:
    """``index_map`` with -1 at the silenced rows: the kernels' form of the mask (``SILENCE``).

    The kernels load ``index_map`` anyway (8-byte loads per weight row), so the mask costs them no load of
    its own; a row whose entry is negative is neither read nor written.
    """
    return index_map.masked_fill(silenced, -1)


# The launchers are torch.library custom ops, so torch.compile sees them as opaque calls.
@torch.library.custom_op("loki_kernels::split_linear_forward", mutates_args=())
def triton_forward(
    x: Tensor, weight: Tensor, weight_active: Tensor, index_map: Tensor,
    bias: Optional[Tensor], bias_active: Optional[Tensor], silenced: Optional[Tensor] = None,
) -> Tensor:
    """Triton forward on a 2-D ``x``: ``[M, K] -> [M, N]``; ``silenced`` (``bool[N]``) rows are zero."""
    (m, k), n = x.shape, index_map.numel()  # k: in features here (the reduced dimension)
    y = x.new_empty((m, n))
    if m == 0 or n == 0:
        return y
    if k == 0:
        y = y.zero_() if bias is None else y.copy_(ordered_rows(bias_active, bias, index_map).expand(m, n))
        return y if silenced is None else y.masked_fill_(silenced, 0)
    silence = silenced is not None
    rows = silenced_map(index_map, silenced) if silence else index_map
    with device_guard(x):
        forward_launch(x, weight, weight_active, rows, bias, bias_active, y, silence=silence)()
    return y


@triton_forward.register_fake
def _(x, weight, weight_active, index_map, bias, bias_active, silenced=None):
    return x.new_empty((x.shape[0], index_map.shape[0]))


@torch.library.custom_op("loki_kernels::split_linear_grad_input", mutates_args=())
def triton_grad_input(grad_out: Tensor, weight: Tensor, weight_active: Tensor, index_map: Tensor,
                      silenced: Optional[Tensor] = None) -> Tensor:
    """Triton ``dX = dY W`` on a 2-D ``grad_out``: ``[M, N] -> [M, K]``, without the ``silenced`` columns."""
    (m, n), k = grad_out.shape, weight.shape[1]
    dx = grad_out.new_empty((m, k))
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    silence = silenced is not None
    rows = silenced_map(index_map, silenced) if silence else index_map
    with device_guard(grad_out):
        grad_input_launch(grad_out, weight, weight_active, rows, dx, silence=silence)()
    return dx


@triton_grad_input.register_fake
def _(grad_out, weight, weight_active, index_map, silenced=None):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


@torch.library.custom_op("loki_kernels::split_linear_grad_weight", mutates_args=())
def triton_grad_weight(grad_out: Tensor, x: Tensor, active_pos: Tensor,
                       silenced: Optional[Tensor] = None) -> Tensor:
    """Triton ``dW_active = dY[:, active_pos]ᵀ X``: ``[P, K]`` in ``x``'s dtype; ``silenced`` rows' are zero."""
    (m, k), p = x.shape, active_pos.numel()
    dw = x.new_empty((p, k))
    if p == 0 or k == 0:
        return dw
    if m == 0:
        return dw.zero_()
    silence = silenced is not None
    cols = active_pos.masked_fill(silenced.index_select(0, active_pos), -1) if silence else active_pos
    with device_guard(x):
        grad_weight_launch(grad_out, x, cols, dw, silence=silence)()
    return dw


@triton_grad_weight.register_fake
def _(grad_out, x, active_pos, silenced=None):
    return x.new_empty((active_pos.numel(), x.shape[1]))


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
def dense_weight(weight: Tensor, weight_active: Tensor, active_pos: Tensor, index_map: Tensor,
                 bias: Optional[Tensor] = None, bias_active: Optional[Tensor] = None):
    """The layer's whole ``(weight, bias)`` for a dense GEMM: a full ``weight`` gets its active rows written
    back in place (no copy); a compact one is assembled for the call."""
    if weight.shape[0] == index_map.numel():
        write_back_(weight, weight_active, active_pos, bias, bias_active)
        return weight, bias
    return (ordered_rows(weight_active, weight, index_map),
            None if bias is None else ordered_rows(bias_active, bias, index_map))


class SplitLinearFunction(torch.autograd.Function):
    """``x [..., K] -> y [..., N]``. Gradients flow to ``x``, ``weight_active`` and ``bias_active`` only.

    ``plan`` names the implementation of each op: ``(forward, grad_input, grad_weight)``, each ``"triton"`` or
    ``"torch"`` (:func:`loki_kernels.backend.resolve_plan`). ``silenced`` (``bool[N]`` or None): rows whose
    output is zero and whose ``dY`` column is dropped before ``dX`` and ``dW_active`` (see :func:`split_linear`).
    """

    @staticmethod
    def forward(ctx, x, weight, weight_active, bias, bias_active, active_pos, index_map, silenced, plan):
        x2d = x.reshape(-1, x.shape[-1])
        dense = None
        if plan[0] == "triton":
            y = triton_forward(x2d, weight, weight_active, index_map, bias, bias_active, silenced)
        else:
            dense, dense_bias = dense_weight(weight, weight_active, active_pos, index_map, bias, bias_active)
            y = F.linear(x2d, dense, dense_bias)
            if silenced is not None:
                y.masked_fill_(silenced, 0)
        # The weights are held as attributes: the torch path rewrites the active rows of a full weight on
        # every call, which is harmless (same values) but would trip save_for_backward's version check.
        ctx.weight, ctx.dense, ctx.plan, ctx.x_shape = weight, dense, plan, x.shape
        ctx.save_for_backward(
            x2d if ctx.needs_input_grad[2] else None,
            weight_active if ctx.needs_input_grad[0] else None,
            active_pos,
            index_map,
            silenced,
        )
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight_active, active_pos, index_map, silenced = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        # Silenced rows: one masked_fill of dY before the PyTorch dX; on the weight-gradient side the
        # gathered rows are zeroed after the GEMM (k rows, not a pass over dY). The kernels mask on the load.
        silenced_active = None if silenced is None else silenced.index_select(0, active_pos)[:, None]
        grad_x = grad_wa = grad_ba = None
        if ctx.needs_input_grad[0]:
            if ctx.plan[1] == "triton":
                grad_x = triton_grad_input(dy, ctx.weight, weight_active, index_map, silenced)
            else:
                dense = ctx.dense
                if dense is None:  # the forward ran Triton and left the full weight's active rows stale
                    dense = dense_weight(ctx.weight, weight_active, active_pos, index_map)[0]
                grad_x = (dy if silenced is None else dy.masked_fill(silenced, 0)) @ dense
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            if ctx.plan[2] == "triton":
                grad_wa = triton_grad_weight(dy, x2d, active_pos, silenced)
            else:  # gathered rows of dYᵀ: a [k, M] operand with leading dimension M (dY[:, pos]ᵀ has k,
                # which for most k is not 16-byte aligned and slows cuBLAS several times)
                grad_wa = dy.t().index_select(0, active_pos) @ x2d
                if silenced is not None:
                    grad_wa.masked_fill_(silenced_active, 0)
        if ctx.needs_input_grad[4]:
            grad_ba = dy.index_select(1, active_pos).sum(0)
            if silenced is not None:
                grad_ba.masked_fill_(silenced_active[:, 0], 0)
        return grad_x, None, grad_wa, None, grad_ba, None, None, None, None


def choose_plan(x: Tensor, weight: Tensor, weight_active: Tensor, backend: str = "auto") -> tuple[str, str, str]:
    """``"triton"`` or ``"torch"`` for each of :data:`OPS`, for these operands.

    ``backend`` decides (:func:`loki_kernels.backend.resolve_plan`), except where a Triton kernel does not
    take the operands: a dtype it does not run (:func:`triton_runs`), or, for the forward and dX kernels,
    which read weight rows as 16-byte vectors, weights that are not :func:`rows_aligned` (a transposed view,
    an offset slice, K not a multiple of 8 fp16/bf16 or 4 fp32 elements). Those ops run PyTorch.
    """
    plan = resolve_plan(backend, x.device, OPS)
    if "triton" not in plan:
        return plan
    aligned = rows_aligned(weight, weight_active)
    return tuple(
        choice if triton_runs(op, x.dtype, x.device) and (aligned or op == "grad_weight") else "torch"
        for op, choice in zip(OPS, plan)
    )


def _check_inputs(x, weight, weight_active, active_pos, bias, bias_active, index_map, silenced):
    n, k_active = index_map.numel(), active_pos.numel()
    if index_map.dim() != 1:
        raise ValueError(f"split_linear: index_map must be 1-D, got shape {tuple(index_map.shape)}")
    if silenced is not None and (silenced.dtype != torch.bool or silenced.shape != (n,)):
        raise ValueError(
            f"split_linear: silenced must be a bool tensor of shape ({n},), got {silenced.dtype} "
            f"of shape {tuple(silenced.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] not in (n, n - k_active):
        raise ValueError(
            f"split_linear: weight has shape {tuple(weight.shape)}; expected ({n}, K) (all rows) or "
            f"({n - k_active}, K) (the frozen rows) for {n} rows of which {k_active} are active"
        )
    k = weight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"split_linear: x has {x.shape[-1]} features, weight expects {k}")
    if weight_active.shape != (k_active, k):
        raise ValueError(
            f"split_linear: weight_active has shape {tuple(weight_active.shape)}, "
            f"expected ({k_active}, {k}) for {k_active} active rows"
        )
    if (bias is None) != (bias_active is None):
        raise ValueError("split_linear: pass both bias and bias_active, or neither")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias_active.shape != (k_active,)):
        raise ValueError(
            f"split_linear: bias/bias_active have shapes {tuple(bias.shape)}/{tuple(bias_active.shape)}, "
            f"expected ({weight.shape[0]},)/({k_active},)"
        )
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
    index_map: Optional[Tensor] = None,
    silenced: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """``y = x Wᵀ + b`` where rows ``active_pos`` of ``W``/``b`` come from ``weight_active``/``bias_active``.

    Args:
        x: ``[..., K]``, any leading shape, contiguous or not.
        weight: the frozen rows, full ``[N, K]`` (its rows at ``active_pos`` are ignored by the Triton
            path and overwritten in place by the PyTorch path; may be a transposed view) or compact
            ``[N - k, K]``. Never receives a gradient.
        weight_active: ``[k, K]``; row ``i`` is row ``active_pos[i]`` of the layer.
        active_pos: ``int64[k]``, sorted, unique, in ``[0, N)``.
        bias, bias_active: ``[N]`` (``[N - k]`` compact) and ``[k]``, or both ``None``.
        index_map: ``make_index_map(active_pos, N, compact=...)``. Required for the compact layout; for the
            full layout it is computed when not given (modules cache it).
        silenced: ``bool[N]`` or None. ``True`` at row ``n`` silences it: ``y[..., n] = 0`` (bias included,
            exact zeros) and its ``dY`` column is dropped before ``dX`` and ``dW_active``, so a silenced row
            contributes nothing anywhere (an active silenced row gets a zero gradient). The weights are not
            touched. None (the default) costs nothing: the kernels compile without the mask.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`loki_kernels.backend`).

    Under autocast, inputs are cast to the autocast dtype like ``F.linear`` does.
    """
    if index_map is None:
        index_map = make_index_map(active_pos, weight.shape[0])
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, weight_active = x.to(dtype), weight.to(dtype), weight_active.to(dtype)
        if bias is not None:
            bias, bias_active = bias.to(dtype), bias_active.to(dtype)
    _check_inputs(x, weight, weight_active, active_pos, bias, bias_active, index_map, silenced)
    plan = choose_plan(x, weight, weight_active, backend)
    with torch.autocast(device_type, enabled=False):
        return SplitLinearFunction.apply(
            x, weight, weight_active, bias, bias_active, active_pos, index_map, silenced, plan)
