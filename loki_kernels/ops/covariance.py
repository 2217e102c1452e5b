"""Covariance accumulation ``C += Xᵀ·diag(mask)·X`` for K-FAC factors (and any second-moment statistic).

``covariance_(out, x, mask)`` adds the (uncentred) second moment of the rows of ``x [tokens, d]`` to the
accumulator ``out [d, d]``; ``mask [tokens]`` (bool or 0/1) drops pad positions. Only the upper triangle
(diagonal included) of ``out`` is guaranteed to be updated: call ``symmetrize_(out)`` once after the last
update to mirror it into the lower triangle. Entries below the diagonal hold whatever a backend left there
until then (the PyTorch path fills both triangles; the Triton kernel leaves them alone outside the diagonal
tiles), so read ``out`` only after :func:`symmetrize_`.

Two implementations (:func:`choose_backend`):

* ``"torch"``: the masked rows are dropped (``x[mask]``), then one full-matrix GEMM ``out += xᵀx`` with fp32
  (or fp64) accumulation: on CUDA fp16/bf16 operands go straight into cuBLAS with an fp32 output
  (``torch.addmm(..., out_dtype=float32)``), elsewhere ``x`` is cast to ``out``'s dtype first.
* ``"triton"``: one kernel that computes only the tiles on and above the diagonal. ``C`` is symmetric, so the
  tiles below it are the transposes of those above: a grid over the tile pairs ``(i, j)`` with ``j ≥ i`` does
  ``n(n+1)/2`` of the ``n²`` tiles, about half the FLOPs (and half the accumulator traffic) of ``addmm_``.
  Each program reduces over the tokens in ``BLOCK_T`` steps: it loads the token tile's mask and turns masked
  rows off in the load predicates of both operand tiles, so a pad row contributes exactly nothing (its
  values are never read, so not even an ``inf`` or ``nan`` there leaks in), as in the PyTorch path.
  Products of fp16/bf16 operands are accumulated in fp32 registers (tensor cores), then added into the fp32
  ``out`` tile (read-modify-write). When ``d`` is small the tile pairs do not fill the GPU; the tokens are
  then split over a second grid axis and the partial tiles are added with fp32 atomics (the order of those
  additions varies from run to run: results agree to fp32 rounding, not bit for bit).

What the kernel takes (else PyTorch runs, whatever ``backend`` says): an fp32 ``out``; fp16/bf16 ``x`` whose
rows are contiguous and 16-byte aligned (:func:`~loki_kernels.ops.common.rows_aligned`: the loads are 16-byte
vectors); fp32 ``x`` only under Triton's interpreter (tests), not on a GPU: both operands of ``Xᵀ·X`` are
token-strided (the reduction runs over the rows of ``X``), which tf32 MMAs cannot take from shared memory as
they are; Triton then loads the tiles 4 bytes at a time (all of them on sm_90, half on sm_80: the
ahead-of-time check shows it). So fp32 inputs run PyTorch, with or without ``allow_tf32`` (cuBLAS follows
``torch.backends.cuda.matmul.allow_tf32`` there).

``backend="auto"`` runs PyTorch on CUDA until a committed GPU benchmark (``benchmarks/test_covariance.py``,
through :mod:`loki_kernels.backend_choices` as ``"covariance.update"``) says the kernel is faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..backend import interpreting, resolve_plan, triton_available
from .common import Launch, device_guard, rows_aligned, upcast_operands

__all__ = [
    "covariance_", "symmetrize_", "choose_backend", "triton_runs", "triton_takes", "Tile", "choose_tile",
    "choose_splits", "covariance_launch", "triton_covariance_", "torch_covariance_", "OPS",
]

# The op names ``backend="auto"`` looks up (``CHOICES["covariance.update"]``).
OPS = ("update",)

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.addmm(..., out_dtype=torch.float32): fp16/bf16 GEMM with an fp32 output (CUDA, torch >= 2.8).
_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def _check(out: Tensor, x: Tensor, mask: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"covariance_: x must be [tokens, d], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT:
        raise ValueError(f"covariance_: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    d = x.shape[1]
    if out.shape != (d, d):
        raise ValueError(f"covariance_: out must be [{d}, {d}] for x of shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if out.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"covariance_: out must be float32 or float64 (the accumulator), got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"covariance_: out is on {out.device} but x is on {x.device}")
    if mask is not None:
        if mask.shape != (x.shape[0],):
            raise ValueError(f"covariance_: mask must be [{x.shape[0]}] for x of shape {tuple(x.shape)}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"covariance_: mask is on {mask.device} but x is on {x.device}")
        if mask.is_complex():
            raise ValueError(f"covariance_: mask must be bool or 0/1 numbers, got {mask.dtype}")


def torch_covariance_(out: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The PyTorch path: drop the masked rows, then one GEMM into both triangles of ``out``."""
    if mask is not None:
        x = x[mask.to(torch.bool)]
    if _HAS_OUT_DTYPE and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and out.dtype == torch.float32:
        # fp16/bf16 tensor cores with an fp32 output: no fp32 copy of x, no fp32 GEMM.
        return torch.addmm(out, x.t(), x, out_dtype=torch.float32, out=out)
    x = x.to(out.dtype)
    return out.addmm_(x.t(), x)


def triton_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernel takes inputs ``x`` of ``dtype`` on ``device`` (into an fp32 ``out``).

    On a GPU fp16/bf16 only: fp32 operands would be read 4 bytes at a time (module docstring; the
    ahead-of-time check shows it) and fp64 never runs Triton there. Under the interpreter (CPU tensors,
    tests) fp32 too, computed exactly (``input_precision="ieee"``).
    """
    if not triton_available():
        return False
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    return device.type == "cpu" and interpreting() and dtype in (torch.float16, torch.bfloat16, torch.float32)


def triton_takes(out: Tensor, x: Tensor) -> bool:
    """Whether the Triton kernel runs these operands; otherwise PyTorch does: an fp32 ``out``, ``x`` of a dtype
    :func:`triton_runs` takes, with :func:`rows_aligned` rows (the same rule under the interpreter, so what the
    tests run through :func:`covariance_` is what a GPU would)."""
    return out.dtype == torch.float32 and triton_runs(x.dtype, x.device) and rows_aligned(x)


def choose_backend(out: Tensor, x: Tensor, backend: str = "auto") -> str:
    """``"triton"`` or ``"torch"`` for this update: ``backend`` as :func:`loki_kernels.backend.resolve_plan`
    resolves it (``"auto"`` on CUDA: the measured choice for ``"covariance.update"``, PyTorch where none
    was measured), except that operands the kernel does not take (:func:`triton_takes`) run PyTorch."""
    (choice,) = resolve_plan(backend, x.device, OPS, family="covariance")
    return "triton" if choice == "triton" and triton_takes(out, x) else "torch"


# --------------------------------------------------------------------------------------------------
# Triton kernel
#
# The GEMM is C[D, D] += X[T, D]ᵀ · X[T, D]: D features (output rows and columns), T tokens (reduced).
# Tiles are square (BLOCK_D x BLOCK_D), so the upper triangle is a whole number of tiles; a program computes
# one tile pair (i, j), j >= i, over its share of the tokens, BLOCK_T tokens a step.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """A launch configuration: output tile ``block_d x block_d``, ``block_t`` tokens a step."""

    block_d: int
    block_t: int
    num_stages: int
    num_warps: int


# fp16/bf16 on a GPU: 128 x 128 output tiles, 64 tokens a step, 4 stages: at most (128 + 128) * 64 * 2 bytes
# * 4 = 128 KiB of shared memory (A100: 163 KiB, H100: 227 KiB; compiled, sm_90 takes 128 KiB, sm_80 64 KiB),
# and 128*128*64*2 / 256 threads = 8 KiB per thread, the most mma.sync (sm_80) holds without spilling
# (split_linear.fits). The ahead-of-time check compiles it at d = 2048 ... 11008 for both: no spills,
# tensor cores (wgmma on sm_90), both operand tiles by 16-byte async copies. Not tuned on a GPU yet.
_TILE_GPU = Tile(128, 64, 4, 8)
_TILE_INTERPRETER = Tile(16, 16, 1, 1)  # small, so that the tests cover many tile pairs and token steps
_SM_COUNT = 132  # an H100, for launches built without a GPU (meta tensors: the ahead-of-time check)


def choose_tile() -> Tile:
    """The launch's tile. Fixed, not autotuned: the kernel adds into ``out``, and Triton's autotuner would
    run it once per timed config (and the accumulator with it)."""
    return _TILE_INTERPRETER if interpreting() else _TILE_GPU


def choose_splits(pairs: int, token_steps: int, sm_count: int) -> int:
    """How many token chunks each tile pair is split into (1: no split, no atomics).

    Programs run about one per SM at these tile sizes; ``pairs`` programs fill ``ceil(pairs / sm_count)``
    waves, and a last wave that is mostly empty idles the GPU (d = 2048: 136 pairs on 132 SMs is two waves
    for 1.03 waves of work). Splitting the tokens ``s`` ways makes ``s`` times as many shorter programs: the
    smallest ``s`` whose waves are at least 85 % full is taken, up to 8, and only while every chunk keeps
    at least 16 token steps (a chunk's fp32 atomics must stay small next to its loads).
    """
    best, best_fill = 1, 0.0
    for s in range(1, 9):
        if s > 1 and token_steps < 16 * s:
            break
        programs = pairs * s
        fill = programs / (math.ceil(programs / sm_count) * sm_count)
        if fill >= 0.85:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_pair(pid):
        """The ``pid``-th tile pair ``(i, j)`` with ``i <= j``, numbered column by column: (0,0), (0,1),
        (1,1), (0,2), ... Programs that run together share the column strip ``j`` of X (L2 reuse)."""
        j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)  # float rounding, either way
        j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
        return pid - j * (j + 1) // 2, j

    @triton.jit
    def _covariance_kernel(
        x_ptr, mask_ptr, out_ptr,
        T, D, STEPS_PER_SPLIT,
        stride_xt, stride_xd, stride_mask, stride_om, stride_on,
        HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """out[i-tile, j-tile] += sum over valid tokens t of X[t, i-tile]ᵀ X[t, j-tile], for j >= i only."""
        pid_i, pid_j = _tile_pair(tl.program_id(0))
        offs_i = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_i = offs_i < D
        mask_j = offs_j < D
        first = tl.program_id(1) * STEPS_PER_SPLIT * BLOCK_T  # this program's token chunk
        offs_t = first + tl.arange(0, BLOCK_T)
        xi_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_i[None, :] * stride_xd
        xj_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_j[None, :] * stride_xd
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for _ in range(0, STEPS_PER_SPLIT):
            valid = offs_t < T
            if HAS_MASK:  # a pad row is switched off in the load predicates: its values are never read
                valid &= tl.load(mask_ptr + offs_t * stride_mask, mask=valid, other=0) != 0
            xi = tl.load(xi_ptrs, mask=valid[:, None] & mask_i[None, :], other=0.0)
            xj = tl.load(xj_ptrs, mask=valid[:, None] & mask_j[None, :], other=0.0)
            if UPCAST:  # the interpreter computes bf16 wrongly; it gets fp32 operands
                xi = xi.to(tl.float32)
                xj = xj.to(tl.float32)
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision=PRECISION)
            offs_t += BLOCK_T
            xi_ptrs += BLOCK_T * stride_xt
            xj_ptrs += BLOCK_T * stride_xt
        out_ptrs = out_ptr + offs_i[:, None].to(tl.int64) * stride_om + offs_j[None, :] * stride_on
        out_mask = mask_i[:, None] & mask_j[None, :]
        if ATOMIC:  # several token chunks add into this tile
            tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc, mask=out_mask)


def covariance_launch(out: Tensor, x: Tensor, mask: Optional[Tensor], *, tile: Optional[Tile] = None,
                      splits: Optional[int] = None) -> Launch:
    """The kernel launch for ``out += xᵀ·diag(mask)·x`` (upper-triangle tiles); tokens, d > 0.

    ``tile`` and ``splits`` default to :func:`choose_tile` and :func:`choose_splits` (tests and benchmarks
    may force them). ``x`` fp16/bf16 (any dtype under the interpreter); ``out`` fp32.
    """
    (t, d) = x.shape
    tile = tile or choose_tile()
    n = triton.cdiv(d, tile.block_d)
    pairs = n * (n + 1) // 2
    steps = triton.cdiv(t, tile.block_t)
    splits = splits or choose_splits(pairs, steps, _sm_count(x.device))
    per_split = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per_split)  # no empty chunk
    has_mask = mask is not None
    if has_mask:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    return Launch(
        "covariance.update", _covariance_kernel, lambda meta: (pairs, splits),
        (x, mask if has_mask else x, out,
         t, d, per_split,
         x.stride(0), x.stride(1), mask.stride(0) if has_mask else 0, out.stride(0), out.stride(1)),
        dict(HAS_MASK=has_mask, ATOMIC=splits > 1, UPCAST=upcast_operands(x.dtype),
             PRECISION="tf32" if x.dtype == torch.float32 and not interpreting() else "ieee",
             BLOCK_D=tile.block_d, BLOCK_T=tile.block_t, num_stages=tile.num_stages, num_warps=tile.num_warps),
    )


# A torch.library custom op (mutating ``out``), so that torch.compile sees one opaque call.
@torch.library.custom_op("loki_kernels::covariance_update", mutates_args={"out"})
def triton_covariance_(out: Tensor, x: Tensor, mask: Optional[Tensor]) -> None:
    """The Triton path: ``out += xᵀ·diag(mask)·x`` on the tiles on and above the diagonal."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return
    with device_guard(x):
        covariance_launch(out, x, mask)()


@triton_covariance_.register_fake
def _(out, x, mask):
    return None


def covariance_(out: Tensor, x: Tensor, mask: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """``out += xᵀ·diag(mask)·x`` in place (upper triangle at least) and return ``out``.

    Args:
        out: ``[d, d]`` float32/float64 accumulator. Products are summed in fp32 (fp64 for an fp64 ``out``
            on the PyTorch path), whatever ``x``'s dtype.
        x: ``[tokens, d]``, fp16/bf16/fp32/fp64, any strides (the kernel takes 16-byte aligned rows).
        mask: ``[tokens]``, bool or 0/1; rows where it is 0 contribute nothing (pad positions). ``None``: all.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (:func:`choose_backend`).

    Only the upper triangle (diagonal included) is guaranteed to hold the sum: call :func:`symmetrize_`
    after the last update. Bad shapes, dtypes or devices raise a ``ValueError`` before ``out`` is touched.
    """
    _check(out, x, mask)
    if choose_backend(out, x, backend) == "triton":
        triton_covariance_(out, x, mask)
        return out
    return torch_covariance_(out, x, mask)


def symmetrize_(out: Tensor) -> Tensor:
    """Copy the upper triangle of the square matrix ``out`` into its lower triangle, in place; return ``out``.

    Uses one temporary the size of ``out`` (its strict upper triangle).
    """
    if out.dim() != 2 or out.shape[0] != out.shape[1]:
        raise ValueError(f"symmetrize_: needs a square matrix, got shape {tuple(out.shape)}")
    upper = out.triu(1)
    return out.triu_().add_(upper.t())
