"""Split linear (LoKI ``down_proj``) benchmarks: ``pytest benchmarks --benchmark-only``.

Providers (each built, warmed up and measured for memory outside the timed region):

* ``fused``: ``SplitLinear(backend="triton")``, the Triton kernels (CUDA only).
* ``torch``: ``SplitLinear(backend="torch")``, in-place row write-back + one dense GEMM.
* ``reference``: ``loki_kernels.reference.LoKILinear``, the original cat+gather implementation.
* ``dense``: a plain ``nn.Linear`` whose weight trains, i.e. full fine-tuning: the physical limit.

Modes: ``forward`` (plain forward under ``torch.no_grad()``) and ``fwd_bwd`` (forward, then
``y.backward(dy)`` with a fixed random ``dy``; ``x`` requires grad; every gradient is set to ``None``
before each round, outside the timed region), and one mode per backward op, which ``backend="auto"``
chooses from (``benchmarks/choose_backends.py``): ``grad_input`` (``dX = dY W``: the Triton kernel vs
``dY @ W`` on the written-back weight; dense is the same product) and ``grad_weight`` (``dW`` of the active
rows: the Triton kernel with its fused column gather vs ``index_select`` + ``matmul``; dense is the full
``dYᵀ X``). The reference provider runs ``forward`` and ``fwd_bwd`` only.

On CUDA the layers are bf16 at Llama-3.1-8B and Qwen2.5-0.5B ``down_proj`` shapes; on a CPU-only machine
they are fp32 at the Qwen2.5-0.5B shape with 512 tokens plus one small shape, kept short enough for CI.
Each (shape, tokens, q, mode) is one benchmark group, so the providers are compared side by side.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

pytest.importorskip("pytest_benchmark")

from loki_kernels import SplitLinear  # noqa: E402
from loki_kernels.reference import LoKILinear  # noqa: E402

from benchmarks.device import CUDA, DEVICE, DEVICE_NAME, DTYPE  # noqa: E402
HAS_TRITON = importlib.util.find_spec("triton") is not None

# pedantic settings: a GPU round is a few ms; a CPU round at the Qwen shape is ~25-80 ms on 2 cores, and a
# shared CPU is noisy, so it gets more rounds than the minimum (the whole CPU run takes ~30 s).
ROUNDS, WARMUP_ROUNDS = (25, 5) if CUDA else (20, 3)
SEED = 0


@dataclass(frozen=True)
class Case:
    model: str
    hidden: int  # out features of down_proj (N)
    d_ff: int  # in features of down_proj (K)
    tokens: int  # T = batch * seq, fed as one [1, T, d_ff] sequence (LoKILinear needs 3-D input)
    q: float  # fraction of trainable rows

    @property
    def active(self) -> int:
        return int(self.q * self.hidden)

    @property
    def id(self) -> str:
        return f"{self.model}-T{self.tokens}-q{self.q:g}"


_CUDA_MODELS = [("llama3.1-8b", 4096, 14336), ("qwen2.5-0.5b", 896, 4864)]
CUDA_CASES = [Case(m, h, d, t, q) for m, h, d in _CUDA_MODELS for t in (4096, 16384) for q in (0.1, 0.3)]
CPU_CASES = [
    # The target shape for "torch path >= 1.3x faster than reference fwd+bwd" on CPU.
    Case("qwen2.5-0.5b", 896, 4864, 512, 0.1),
    Case("qwen2.5-0.5b", 896, 4864, 512, 0.3),
    Case("small", 256, 688, 256, 0.1),
]
CASES = CUDA_CASES if CUDA else CPU_CASES

MODES = ["forward", "fwd_bwd", "grad_input", "grad_weight"]
OP_MODES = ("grad_input", "grad_weight")
PROVIDERS = [
    pytest.param(
        "fused",
        marks=pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="the Triton provider needs CUDA and triton"),
    ),
    "torch",
    "reference",
    "dense",
]


# --------------------------------------------------------------------------------------------- building
def _build(case: Case, mode: str, provider: str) -> tuple[Callable[[], None], Callable[[], None], list]:
    """``(step, reset, grad_tensors)``: ``step`` runs the op once (no sync), ``reset`` drops all grads."""
    torch.manual_seed(SEED)  # same weight, rows and data for every provider of a group
    linear = nn.Linear(case.d_ff, case.hidden, bias=False, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        linear.weight.normal_(0.0, 1.0 / math.sqrt(case.d_ff))
    # Random sorted rows, drawn on the CPU (a plain list: no per-element device sync while building).
    active_pos = torch.randperm(case.hidden)[: case.active].sort().values.tolist()
    # Drawn before the module is built: LoKILinear's constructor consumes random numbers of its own.
    x = torch.randn(1, case.tokens, case.d_ff, device=DEVICE, dtype=DTYPE) / math.sqrt(case.d_ff)
    dy = torch.randn(1, case.tokens, case.hidden, device=DEVICE, dtype=DTYPE) / math.sqrt(case.hidden)

    if provider in ("fused", "torch"):
        module = SplitLinear.from_module(linear, active_pos, backend="triton" if provider == "fused" else "torch")
    elif provider == "reference":
        module = LoKILinear(linear, active_pos).to(DEVICE)
        del linear  # LoKILinear holds its own copies of the rows
    elif provider == "dense":
        module = linear  # weight requires grad: a full weight gradient, as in full fine-tuning
    else:
        raise ValueError(provider)

    params = [p for p in module.parameters() if p.requires_grad]

    if mode in OP_MODES:
        return _op_step(case, mode, provider, module, x, dy), lambda: None, []
    if mode == "forward":

        def step():
            with torch.no_grad():
                module(x)

        grads: list = []
    elif mode == "fwd_bwd":
        x.requires_grad_(True)

        def step():
            module(x).backward(dy)

        grads = [x, *params]
    else:
        raise ValueError(mode)

    def reset():
        for t in grads:  # set_to_none: a round never pays for accumulating into an old gradient
            t.grad = None

    return step, reset, grads


def _op_step(case: Case, mode: str, provider: str, module, x, dy) -> Callable[[], None]:
    """One backward op alone, as each backend computes it (no autograd)."""
    from loki_kernels.ops.split_linear import dense_weight, triton_grad_input, triton_grad_weight

    x2d, dy2d = x.reshape(-1, case.d_ff), dy.reshape(-1, case.hidden)
    if provider == "dense":
        weight = module.weight.detach()
        if mode == "grad_input":
            return lambda: dy2d @ weight
        return lambda: dy2d.t() @ x2d
    pos, index_map = module.active_pos, module.index_map
    weight_active = module.weight_active.detach()
    if mode == "grad_input":
        if provider == "fused":
            return lambda: triton_grad_input(dy2d, module.weight, weight_active, index_map)
        dense = dense_weight(module.weight, weight_active, pos, index_map)[0]  # as the forward left it
        return lambda: dy2d @ dense
    if provider == "fused":
        return lambda: triton_grad_weight(dy2d, x2d, pos)
    return lambda: dy2d.t().index_select(0, pos) @ x2d  # as SplitLinearFunction.backward


def _flops(case: Case, mode: str, provider: str) -> tuple[int, str]:
    t, h, d, k = case.tokens, case.hidden, case.d_ff, case.active
    if mode in ("forward", "grad_input"):
        return 2 * t * h * d, "2THD"
    if mode == "grad_weight":
        return (2 * t * h * d, "2THD (all rows)") if provider == "dense" else (2 * t * k * d, "2TkD")
    if provider == "dense":
        return 6 * t * h * d, "6THD"  # Y, dX and the full dW
    # "Useful" FLOPs of a split layer: Y (2THD) + dX (2THD) + dW for the k active rows only (2TkD), i.e.
    # 2THD(2 + q). Frozen rows need no weight gradient, so this is the work a LoKI step actually requires;
    # the dense provider's TFLOP/s counts its full 6THD and is not directly comparable.
    return 2 * t * d * (2 * h + k), "useful 2TD(2H+k)"


def _peak_mib(step: Callable[[], None], reset: Callable[[], None]) -> float:
    """Peak CUDA memory of one untimed call, above what was allocated before it (MiB)."""
    reset()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    reset()
    return peak / 2**20


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_split_linear(benchmark, case: Case, mode: str, provider: str):
    if provider == "reference" and mode in OP_MODES:
        pytest.skip("the reference is timed as a whole layer (forward, fwd_bwd)")
    step, reset, grads = _build(case, mode, provider)

    # Untimed: one call compiles/autotunes the Triton kernels and warms cuBLAS, a second measures memory.
    step()
    reset()
    peak_mib = _peak_mib(step, reset) if CUDA else None

    def setup():
        reset()
        if CUDA:
            torch.cuda.synchronize()

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()  # time the kernels, not their launch

    flops, flop_model = _flops(case, mode, provider)
    benchmark.group = f"{case.id}-{mode}"  # must be set before pedantic() creates the stats
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        model=case.model,
        hidden=case.hidden,
        d_ff=case.d_ff,
        tokens=case.tokens,
        q=case.q,
        active_rows=case.active,
        dtype=str(DTYPE).removeprefix("torch."),
        device=DEVICE_NAME,
        flops=flops,
        flop_model=flop_model,
    )
    if peak_mib is not None:
        benchmark.extra_info["peak_mem_mib"] = round(peak_mib, 1)

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = round(median * 1e3, 4)
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 3)
        if CUDA and HAS_TRITON:
            # A second figure from CUDA events with an L2 flush per rep; gradients dropped per rep too.
            from triton.testing import do_bench

            ms = do_bench(step, grad_to_none=grads or None, return_mode="median")
            benchmark.extra_info["do_bench_median_ms"] = round(ms, 4)
            benchmark.extra_info["do_bench_tflops"] = round(flops / (ms * 1e-3) / 1e12, 3)
        reset()
