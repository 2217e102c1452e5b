"""Covariance update (K-FAC factor accumulation ``C += Xᵀ·diag(mask)·X``): ``pytest benchmarks/test_covariance.py
--benchmark-only``.

Providers (inputs and accumulator built outside the timed region; every round adds into the same fp32 ``C``):

* ``fused``: ``covariance_(backend="triton")``, the upper-triangle kernel with the mask fused (CUDA only).
* ``torch``: ``covariance_(backend="torch")``, the full-matrix PyTorch path: masked rows dropped
  (``x[mask]``), then one GEMM into both triangles (on CUDA bf16 operands with an fp32 output,
  ``torch.addmm(..., out_dtype=float32)``; on the CPU ``x`` cast to fp32 first).
* ``addmm``: the bare full-matrix GEMM a K-FAC code would call, ``C.addmm_(xᵀ, x)`` with fp32 accumulation
  (on CUDA ``torch.addmm(C, xᵀ, x, out_dtype=float32, out=C)`` on the bf16 operands: cuBLAS, no mask, no
  copy; on the CPU fp32 ``addmm_``). Unmasked groups only: it is the reference the kernel's target is set
  against (>= 1.7x faster than ``addmm`` on the GPU: the kernel does a little over half its FLOPs).

Groups ``d<d>-T<tokens>-<mask>``: on CUDA bf16 ``x`` at d = 2048, 4096 (Llama hidden sizes; 2048 is the
token-split launch) and 11008 (Llama-2-7B's d_ff), 16384 tokens, without a mask and with 10 % pad rows; on a
CPU-only machine fp32 at d = 512, 2048 tokens (the PyTorch providers only; a few seconds).

``extra_info``: provider, mode (``"update"``: the op ``backend="auto"`` chooses for, as
``"covariance.update"``, once ``benchmarks/choose_backends.py`` reads this file too), d, tokens, mask, dtype,
device, ``flops`` = ``2·T·d²`` (the full-matrix work, for every provider, so ``tflops`` compares speed: the
kernel's own FLOPs are ``(n+1)/(2n)`` of that for ``n`` tiles a side), ``median_ms``, ``tflops``; on CUDA
``peak_mem_mib`` (one untimed call, above what was allocated before it) and ``do_bench_median_ms``
(``triton.testing.do_bench``: CUDA events, L2 flushed per rep).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from loki_kernels.ops import covariance_  # noqa: E402
from loki_kernels.ops.covariance import triton_takes  # noqa: E402

from benchmarks.device import CUDA, DEVICE, DEVICE_NAME, DTYPE  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROUNDS, WARMUP_ROUNDS = (25, 5) if CUDA else (10, 2)
SEED = 0
PAD = 0.1  # fraction of pad rows in the masked groups


@dataclass(frozen=True)
class Case:
    d: int
    tokens: int
    masked: bool

    @property
    def id(self) -> str:
        return f"d{self.d}-T{self.tokens}-{'pad' if self.masked else 'nomask'}"


CASES = ([Case(d, 16384, m) for d in (2048, 4096, 11008) for m in (False, True)] if CUDA
         else [Case(512, 2048, m) for m in (False, True)])
PROVIDERS = [
    pytest.param(
        "fused",
        marks=pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="the Triton provider needs CUDA and triton"),
    ),
    "torch",
    "addmm",
]


def _build(case: Case, provider: str) -> tuple[Callable[[], None], torch.Tensor]:
    """``(step, out)``: ``step`` adds one update into ``out`` (no sync)."""
    torch.manual_seed(SEED)  # same data for every provider of a group
    x = torch.randn(case.tokens, case.d, device=DEVICE, dtype=DTYPE) / math.sqrt(case.d)
    mask = (torch.rand(case.tokens, device=DEVICE) >= PAD) if case.masked else None
    out = torch.zeros(case.d, case.d, device=DEVICE, dtype=torch.float32)
    if provider == "fused":
        if not triton_takes(out, x):
            raise AssertionError("the kernel does not take these operands: the benchmark would time PyTorch")
        return (lambda: covariance_(out, x, mask, backend="triton")), out
    if provider == "torch":
        return (lambda: covariance_(out, x, mask, backend="torch")), out
    if provider == "addmm":
        if CUDA:
            return (lambda: torch.addmm(out, x.t(), x, out_dtype=torch.float32, out=out)), out
        return (lambda: out.addmm_(x.t(), x)), out
    raise ValueError(provider)


def _peak_mib(step: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_covariance(benchmark, case: Case, provider: str):
    if provider == "addmm" and case.masked:
        pytest.skip("addmm has no mask: it is timed on the unmasked groups")
    step, out = _build(case, provider)
    step()  # untimed: compiles the kernel, warms cuBLAS
    peak_mib = _peak_mib(step) if CUDA else None

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()  # time the kernels, not their launch

    flops = 2 * case.tokens * case.d**2
    benchmark.group = case.id  # must be set before pedantic() creates the stats
    benchmark.extra_info.update(
        provider=provider, mode="update", d=case.d, tokens=case.tokens, mask=f"pad{PAD:g}" if case.masked else "none",
        dtype=str(DTYPE).removeprefix("torch."), device=DEVICE_NAME, flops=flops, flop_model="2Td^2 (full matrix)",
    )
    if peak_mib is not None:
        benchmark.extra_info["peak_mem_mib"] = round(peak_mib, 1)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = round(median * 1e3, 4)
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 3)
        if CUDA and HAS_TRITON:
            from triton.testing import do_bench

            ms = do_bench(step, return_mode="median")
            benchmark.extra_info["do_bench_median_ms"] = round(ms, 4)
            benchmark.extra_info["do_bench_tflops"] = round(flops / (ms * 1e-3) / 1e12, 3)
    assert torch.isfinite(out.triu()).all()
