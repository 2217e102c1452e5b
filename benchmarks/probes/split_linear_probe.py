"""Diagnostics behind the split linear dispatch (CUDA only; prints a table, no pass/fail).

    python benchmarks/probes/split_linear_probe.py

1. Weight gradient of the active rows, three PyTorch formulations: ``dY[:, pos]ᵀ X`` with the gathered dY
   as a transposed view (leading dimension k, unaligned for most k), ``dYᵀ[pos] X`` (gathered rows, leading
   dimension T), and the Triton kernel with its fused gather; against the full ``dYᵀ X``.
2. The forward kernel against a plain Triton matmul with the same tiles and autotuning (no row gather) and
   against cuBLAS: how much of the gap to cuBLAS is the gather, how much is Triton.
"""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from loki_kernels.ops.split_linear import _forward_kernel, _tuned, make_index_map, triton_forward, triton_grad_weight


@_tuned("M", "N", "K", key=["M", "N", "K"])
@triton.jit
def plain_matmul(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Y = X Wᵀ, tutorial style (grouped order, pointer increments), both operands K-contiguous."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first = (pid // per_group) * GROUP
    size = min(num_m - first, GROUP)
    pid_m = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kk * BLOCK_K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & (offs_k[None, :] < k_left), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def ms(fn):
    return do_bench(fn, return_mode="median")


def main():
    dt, dev = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("\n1. weight gradient of the active rows (ms, do_bench median)")
    print(f"{'shape':<28} {'full dYᵀX':>10} {'dY[:,pos]ᵀX':>12} {'dYᵀ[pos]X':>10} {'triton':>8}")
    for n, k in ((4096, 14336), (896, 4864)):
        for t in (4096, 16384):
            for q in (0.1, 0.3):
                p = int(q * n)
                pos = torch.randperm(n, device=dev)[:p].sort().values
                x = torch.randn(t, k, device=dev, dtype=dt)
                dy = torch.randn(t, n, device=dev, dtype=dt)
                full = ms(lambda: dy.t() @ x)
                a = ms(lambda: dy.index_select(1, pos).t() @ x)
                b = ms(lambda: dy.t().index_select(0, pos) @ x)
                c = ms(lambda: triton_grad_weight(dy, x, pos))
                print(f"{n}x{k} T{t} q{q:<4} {full:>10.3f} {a:>12.3f} {b:>10.3f} {c:>8.3f}")

    print("\n2. forward Y = X Wᵀ (ms): cuBLAS, plain Triton matmul, split kernel (q = 10%)")
    for n, k in ((4096, 14336), (896, 4864)):
        for t in (4096, 16384):
            x = torch.randn(t, k, device=dev, dtype=dt)
            w = torch.randn(n, k, device=dev, dtype=dt)
            pos = torch.randperm(n, device=dev)[: n // 10].sort().values
            wa = w[pos].clone()
            index_map = make_index_map(pos, n)
            y = torch.empty(t, n, device=dev, dtype=dt)
            grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            cublas = ms(lambda: x @ w.t())
            plain = ms(lambda: plain_matmul[grid](x, w, y, t, n, k, x.stride(0), w.stride(0), y.stride(0)))
            split = ms(lambda: triton_forward(x, w, wa, index_map, None, None))
            tflop = 2 * t * n * k / 1e9
            print(f"{n}x{k} T{t}: cuBLAS {cublas:.3f} ({tflop / cublas:.0f} TFLOP/s), plain Triton {plain:.3f} "
                  f"({plain / cublas:.2f}x, {plain_matmul.best_config}), split {split:.3f} ({split / cublas:.2f}x, "
                  f"{_forward_kernel.best_config})")


if __name__ == "__main__":
    main()
