"""Ahead-of-time compile check: every Triton kernel of the package, compiled for real GPUs without one.

``python -m loki_kernels.ops.aot [--full] [--json FILE]`` builds each kernel's launch through the op's own
launcher (:class:`~loki_kernels.ops.common.Launch`) on meta tensors at real layer shapes, lets Triton's own
binder specialise the arguments as a real launch would (dtypes, 16-divisible integers and pointers,
unit strides), and compiles it with every autotune config the launcher may pick, for sm_80 (A100) and
sm_90 (H100). No driver or GPU is needed: Triton's wheel ships ``ptxas`` and ``cuobjdump``.

From the compiled kernel it reads registers, spills (local memory), shared memory, the MMA instruction
family, and, inside the main loop of GEMM kernels, how many 16-byte async copies and how many scalar
global loads each thread issues per step. A row of the table fails when the kernel does not compile, when it
spills, when its shared memory exceeds the target's, or when a GEMM's contiguous operands are not all fetched
by 16-byte copies (a sign that Triton lost their alignment, which makes the loads scalar and unpipelined).

Must run without ``TRITON_INTERPRET`` (the interpreter replaces the autotune configs), hence a process of
its own; ``tests/ops/test_aot.py`` runs it. Compiled kernels land in Triton's cache, so a rerun is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

# Shared memory one block may use (the opt-in maximum), bytes.
TARGETS = {80: 166912, 90: 232448}

# Real layer shapes (tokens M, out features N, in features K, active rows P): Llama-3.1-8B's and
# Qwen2.5-0.5B's down_proj at 4096 tokens and 10% active rows, and the Qwen shape at a token count that
# is no multiple of 16 (Triton specialises on it).
SHAPES = {"llama8b": (4096, 4096, 14336, 409), "qwen0.5b": (4096, 896, 4864, 89), "ragged": (1001, 896, 4864, 89)}


@dataclass
class Case:
    """One kernel launch to compile: which kernel, built how, and what its main loop must look like."""

    name: str  # e.g. "split_linear.forward/bf16/llama8b"
    build: Callable[[], "object"]  # -> Launch (built in the worker: launches are not picklable)
    contiguous_bytes: Optional[Callable[[dict], int]] = None  # per main-loop step, for GEMMs: bytes that must
    gathers: bool = False  # an operand (or a per-row mask) is loaded element by element (narrow loads expected)


@dataclass
class Row:
    kernel: str
    config: str
    target: int
    ok: bool = False
    problems: list = field(default_factory=list)
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    mma: str = ""
    wide_loads: int = 0  # per main-loop step, per thread: 16-byte loads (cp.async or vector ld.global)
    narrow_loads: int = 0  # per main-loop step, per thread: loads of up to 4 bytes
    expected_wide: int = 0  # the contiguous operand bytes of one step / (16 · threads)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL: " + "; ".join(self.problems)
        return (f"{self.kernel:<42} {self.config:<22} sm_{self.target} regs {self.registers:>3} "
                f"spill {self.spill_bytes:>5} smem {self.shared:>6} {self.mma:<6} "
                f"16B loads/step {self.wide_loads:>3} (need {self.expected_wide:>3}) "
                f"narrow/step {self.narrow_loads:>3}  {verdict}")


# ------------------------------------------------------------------------------------------------ cases
def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _split_linear_cases(dtypes, shapes) -> Iterator[Case]:
    from .split_linear import forward_launch, grad_input_launch, grad_weight_launch

    for dtype in dtypes:
        esize = torch.tensor([], dtype=dtype).element_size()
        for shape in shapes:
            m, n, k, p = SHAPES[shape]
            # Silenced rows (the SILENCE variant of each kernel): compiled at the Llama-8B shape.
            for silence in (False, True) if shape == "llama8b" else (False,):
                tag = f"{str(dtype).removeprefix('torch.')}/{shape}" + ("/silenced" if silence else "")

                def forward(m=m, n=n, k=k, p=p, dtype=dtype, silence=silence):
                    x, y = _meta(m, k, dtype=dtype), _meta(m, n, dtype=dtype)
                    w, wa = _meta(n, k, dtype=dtype), _meta(p, k, dtype=dtype)
                    return forward_launch(x, w, wa, _meta(n, dtype=torch.long), None, None, y, silence=silence)

                def grad_input(m=m, n=n, k=k, p=p, dtype=dtype, silence=silence):
                    dy, dx = _meta(m, n, dtype=dtype), _meta(m, k, dtype=dtype)
                    w, wa = _meta(n, k, dtype=dtype), _meta(p, k, dtype=dtype)
                    return grad_input_launch(dy, w, wa, _meta(n, dtype=torch.long), dx, silence=silence)

                def grad_weight(m=m, n=n, k=k, p=p, dtype=dtype, silence=silence):
                    dy, x, dw = _meta(m, n, dtype=dtype), _meta(m, k, dtype=dtype), _meta(p, k, dtype=dtype)
                    return grad_weight_launch(dy, x, _meta(p, dtype=torch.long), dw, silence=silence)

                # Contiguous operand bytes per main-loop step: forward X[BM, BK] and W[BN, BK]; grad_input
                # dY[BM, BN] and W[BN, BK]; grad_weight only X[BM, BK] (its dY columns are a gather).
                yield Case(f"split_linear.forward/{tag}", forward,
                           lambda c, e=esize: (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * e)
                if dtype == torch.float32:
                    continue  # fp32 gradients run PyTorch on a GPU (split_linear.triton_runs)
                yield Case(f"split_linear.grad_input/{tag}", grad_input,
                           lambda c, e=esize: (c["BLOCK_M"] + c["BLOCK_K"]) * c["BLOCK_N"] * e)
                yield Case(f"split_linear.grad_weight/{tag}", grad_weight,
                           lambda c, e=esize: c["BLOCK_M"] * c["BLOCK_K"] * e, gathers=True)


def _kva_cases(dtypes) -> Iterator[Case]:
    from .kva_quadrature import interpolate_launch, weighted_grad_sum_launch

    g, h, m = 32, 4096, 8  # 32 layers of a Llama-8B, 8 quadrature steps
    for dtype in dtypes:
        tag = str(dtype).removeprefix("torch.")

        def interpolate(dtype=dtype):
            x = _meta(g, h, dtype=dtype)
            return interpolate_launch(x, _meta(m, dtype=torch.float32), x, _meta(g * m, h, dtype=dtype))

        def weighted_grad_sum(dtype=dtype):
            x = _meta(g, h, dtype=dtype)
            return weighted_grad_sum_launch(_meta(g * m, h, dtype=dtype), _meta(m, dtype=torch.float32), x, x,
                                                _meta(g, h, dtype=torch.float32))

        yield Case(f"kva.interpolate/{tag}", interpolate)
        yield Case(f"kva.weighted_grad_sum/{tag}", weighted_grad_sum)


def _covariance_cases(dtypes, full: bool) -> Iterator[Case]:
    from .covariance import covariance_launch

    t = 16384  # tokens of one K-FAC batch; d: Llama hidden sizes and MLP widths (Llama-2-7B's d_ff 11008)
    for dtype in (d for d in dtypes if d != torch.float32):  # fp32 inputs run PyTorch on a GPU
        esize = torch.tensor([], dtype=dtype).element_size()
        for d in (2048, 4096, 8192, 11008) if full else (2048, 4096):  # 2048: token split (atomics)
            for masked in (True, False) if d == 4096 else (True,):

                def update(d=d, dtype=dtype, masked=masked):
                    mask = _meta(t, dtype=torch.bool) if masked else None
                    return covariance_launch(_meta(d, d, dtype=torch.float32), _meta(t, d, dtype=dtype), mask)

                tag = f"{str(dtype).removeprefix('torch.')}/d{d}" + ("" if masked else "-nomask")
                # Both operand tiles X[BT, BD] are contiguous; the mask is one byte per token (narrow).
                yield Case(f"covariance.update/{tag}", update,
                           lambda c, e=esize: 2 * c["BLOCK_T"] * c["BLOCK_D"] * e, gathers=masked)


def cases(full: bool = False) -> list[Case]:
    """The default set covers every kernel and every config for bf16 and fp32 (tf32) at the Llama-8B shape
    (the covariance update: bf16 at d = 2048 and 4096); ``full`` adds fp16, the Qwen-0.5B shape at 4096 and
    1001 tokens, and the covariance update at d = 8192 and 11008."""
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if full else [torch.bfloat16, torch.float32]
    shapes = ["llama8b", "qwen0.5b", "ragged"] if full else ["llama8b"]
    return [*_split_linear_cases(dtypes, shapes), *_kva_cases(dtypes[:1] if not full else dtypes),
            *_covariance_cases(dtypes, full)]


# ------------------------------------------------------------------------------------------- compiling
def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this triton wheel ships no {name}")
    return str(path)


def configs(launch, target: int) -> list:
    """The autotune configs the launcher may pick on ``target`` (after its pruning), or ``[None]``."""
    kernel = launch.kernel
    if not hasattr(kernel, "configs"):
        return [None]
    from .split_linear import fits

    operand = next(a for a in launch.args if isinstance(a, torch.Tensor))
    kept = [c for c in kernel.configs if fits(c, operand.element_size(), TARGETS[target], target // 10)]
    return kept or kernel.configs[-1:]


def _compile(launch, config, target: int):
    """Compile as ``launch`` would, with Triton's own argument specialisation, for ``sm_<target>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from triton.runtime.autotuner import Autotuner

    fn = launch.kernel.fn if isinstance(launch.kernel, Autotuner) else launch.kernel
    gpu = GPUTarget("cuda", target, 32)
    backend = make_backend(gpu)
    kwargs = {**launch.kwargs, **(config.all_kwargs() if config is not None else {})}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def main_loop(ptx: str) -> list[str]:
    """The instructions of the outermost loop that holds the MMAs (or of the largest loop, else)."""
    lines = ptx.splitlines()
    loops = []
    for i, line in enumerate(lines):
        found = re.match(r"^(\$L__BB\d+_\d+):", line)
        if not found:
            continue
        label = found.group(1)
        for j in range(i + 1, len(lines)):
            if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", lines[j]):
                loops.append(lines[i:j + 1])
                break
    if not loops:
        return []
    with_mma = [body for body in loops if any("mma" in x or "fma.rn.f32" in x for x in body)]
    return max(with_mma or loops, key=len)


def _count(body: list[str]) -> tuple[int, int]:
    """Per-thread global loads in ``body``: 16-byte ones (async copies to shared memory or vector loads to
    registers), and narrow ones (scalar loads or async copies of up to 4 bytes). 8-byte loads are the int64
    row indices, counted in neither."""
    wide = narrow = 0
    for x in body:
        copy = re.search(r"\bcp\.async\.c[ag]\.shared\.global\b.*,\s*(0x[0-9a-f]+|\d+)\s*[,;]", x)
        if copy:
            size = int(copy.group(1), 0)
            wide, narrow = wide + (size == 16), narrow + (size <= 4)
        elif re.search(r"\bld\.global(\.\w+)*\.(v4\.[bufs]32|v2\.[bufs]64|v8\.[bufs]16)\b", x):
            wide += 1
        elif re.search(r"\bld\.global(\.\w+)*\.[bufs](8|16|32)\b", x) and not re.search(r"\.v[248]\.", x):
            narrow += 1
    return wide, narrow


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spill = int(re.search(r"LOCAL:(\d+)", out).group(1)) + int(re.search(r"STACK:(\d+)", out).group(1))
    return regs, spill


def check(case: Case, config, target: int) -> Row:
    """Compile one (case, config, target) and judge it."""
    label = "-" if config is None else (
        "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
        + f" s{config.num_stages} w{config.num_warps}")
    row = Row(case.name, label, target)
    try:
        launch = case.build()
        if config is None and "num_warps" in launch.kwargs:  # not autotuned: the launcher chose the tile
            meta = launch.kwargs
            row.config = ("x".join(str(v) for k, v in meta.items() if k.startswith("BLOCK_"))
                          + f" s{meta.get('num_stages', 3)} w{meta['num_warps']}")
        kernel = _compile(launch, config, target)
    except Exception as error:  # noqa: BLE001: any compile failure is the finding
        row.problems.append(f"does not compile: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    row.registers, row.spill_bytes = _resources(kernel.asm["cubin"])
    row.shared = kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    row.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"
    body = main_loop(ptx)
    row.wide_loads, row.narrow_loads = _count(body)
    if row.spill_bytes:
        row.problems.append(f"spills {row.spill_bytes} bytes")
    if row.shared > TARGETS[target]:
        row.problems.append(f"shared memory {row.shared} > {TARGETS[target]}")
    meta = {**config.kwargs, "num_warps": config.num_warps} if config is not None else launch.kwargs
    if case.contiguous_bytes is not None and "num_warps" in meta:
        threads = 32 * meta["num_warps"]
        row.expected_wide = case.contiguous_bytes(meta) // (16 * threads)
        if row.wide_loads < row.expected_wide:
            row.problems.append(f"{row.wide_loads} 16-byte loads per step, need {row.expected_wide}")
        if row.narrow_loads and not case.gathers:
            row.problems.append(f"{row.narrow_loads} narrow loads per step")
    row.ok = not row.problems
    return row


def _run_chunk(job: tuple[bool, list[tuple[int, int, int]]]) -> list[dict]:
    full, items = job
    all_cases = cases(full)
    rows = []
    for case_index, config_index, target in items:
        case = all_cases[case_index]
        config = configs(case.build(), target)[config_index]
        rows.append(asdict(check(case, config, target)))
    return rows


def run(full: bool = False, workers: Optional[int] = None) -> list[Row]:
    """Compile every (case, config, target); ``workers`` processes (default: the CPU count, at most 8)."""
    all_cases = cases(full)
    items = [(ci, k, t) for ci, case in enumerate(all_cases) for t in TARGETS
             for k in range(len(configs(case.build(), t)))]
    workers = max(1, min(workers or os.cpu_count() or 1, 8, len(items)))
    chunks = [(full, items[i::workers]) for i in range(workers)]
    if workers == 1:
        results = [_run_chunk(chunks[0])]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_run_chunk, chunks))
    rows = [Row(**r) for chunk in results for r in chunk]
    return sorted(rows, key=lambda r: (r.kernel, r.target, r.config))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loki_kernels.ops.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also fp16 and the Qwen-0.5B shape (4096 and 1001 tokens)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPUs, at most 8)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the interpreter replaces the kernels' autotune configs", file=sys.stderr)
        return 2
    rows = run(args.full, args.workers)
    for row in rows:
        print(row.line())
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows)} compiles, {failed} failed")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
