"""split_linear on a GPU at real layer shapes: bf16 against a float64 reference on the same device.

Qwen2.5-0.5B's (896 x 4864) and Llama-3.1-8B's (4096 x 14336) ``down_proj``, 4096 tokens, 10% active rows, so
that tile edges, the grouped tile order and the configs autotune picks at these shapes are covered on
hardware. Skipped without CUDA (the interpreter tests in ``test_split_linear.py`` cover the logic).
"""

import pytest
import torch

from loki_kernels import split_linear
from loki_kernels.ops.split_linear import choose_plan
from tests.conftest import TOL, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = {"qwen2.5-0.5b": (896, 4864), "llama3.1-8b": (4096, 14336)}


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_real_shape_bf16_matches_float64(shape, backend):
    n, k = SHAPES[shape]
    tokens, dtype = 4096, torch.bfloat16
    pos = torch.randperm(n, device="cuda")[: n // 10].sort().values
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    wa = (torch.randn(len(pos), k, device="cuda") / k**0.5).to(dtype).requires_grad_()
    x = torch.randn(2, tokens // 2, k, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(2, tokens // 2, n, device="cuda", dtype=dtype)
    if backend == "triton":
        assert choose_plan(x, w, wa, backend) == ("triton",) * 3

    y = split_linear(x, w, wa, pos, backend=backend)
    y.backward(dy)

    merged = w.double()
    merged[pos] = wa.detach().double()
    x64, dy64 = x.detach().double().reshape(-1, k), dy.double().reshape(-1, n)
    ref_y, ref_dx, ref_dwa = x64 @ merged.t(), dy64 @ merged, dy64[:, pos].t() @ x64
    tol = TOL[dtype]
    assert rel_err(y.reshape(-1, n), ref_y) < tol
    assert rel_err(x.grad.reshape(-1, k), ref_dx) < tol
    assert rel_err(wa.grad, ref_dwa) < tol
