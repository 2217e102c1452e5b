"""KVA quadrature ops: the Triton kernels against the PyTorch path and a float64 reference, and the
quadrature table against Captum's.

Without a GPU the Triton kernels run under Triton's interpreter (see tests/conftest.py), so shapes are
small and odd (not multiples of the block size).
"""

import pytest
import torch

from loki_kernels.ops.kva_quadrature import METHODS, interpolate, quadrature, weighted_grad_sum
from tests.conftest import DEVICE, TOL, rel_err

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
G, H, M = 3, 37, 5  # groups (layers), hidden, steps


# --------------------------------------------------------------------------------------------------
# quadrature
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [2, 3, 7, 20])
def test_quadrature_equals_captum(method, steps):
    approximation_methods = pytest.importorskip("captum.attr._utils.approximation_methods")
    step_sizes, alphas = approximation_methods.approximation_parameters(method)
    a, w = quadrature(method, steps)
    assert a.dtype == w.dtype == torch.float64 and a.shape == w.shape == (steps,)
    assert a.tolist() == alphas(steps)
    assert w.tolist() == step_sizes(steps)


def test_quadrature_known_values():
    a, w = quadrature("riemann_left", 7)  # the paper: alpha_k = k/m, weight 1/m
    torch.testing.assert_close(a, torch.arange(7, dtype=torch.float64) / 7, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(w, torch.full((7,), 1 / 7, dtype=torch.float64))
    _, w = quadrature("riemann_trapezoid", 7)
    assert w.sum().item() == pytest.approx(6 / 7)  # Captum's trapezoid weights do not sum to 1
    a, w = quadrature("gausslegendre", 7)
    assert w.sum().item() == pytest.approx(1.0)
    assert 0 < a.min() < a.max() < 1


def test_quadrature_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown quadrature method"):
        quadrature("simpson", 7)
    with pytest.raises(ValueError, match="steps >= 2"):
        quadrature("riemann_left", 1)
    with pytest.raises(ValueError, match="steps >= 1"):
        quadrature("gausslegendre", 0)
    with pytest.raises(TypeError):
        quadrature("riemann_left", 7.0)
    assert quadrature("gausslegendre", 1)[0].tolist() == [0.5]


# --------------------------------------------------------------------------------------------------
# interpolate
# --------------------------------------------------------------------------------------------------
def _inputs(dtype, baseline, groups=G, hidden=H, noncontig=False):
    if noncontig:
        x = torch.randn(groups, 2 * hidden, dtype=torch.float64)[:, ::2]
    else:
        x = torch.randn(groups, hidden, dtype=torch.float64)
    b = torch.randn(groups, hidden, dtype=torch.float64) if baseline else None
    x = x.to(DEVICE, dtype)
    b = b.to(DEVICE, dtype) if baseline else None
    return x, b


def _interpolate_ref(x, alphas, b):
    x64 = x.double().cpu()
    b64 = b.double().cpu() if b is not None else torch.zeros_like(x64)
    a = alphas.double().cpu()
    return (b64[:, None, :] + a[None, :, None] * (x64 - b64)[:, None, :]).reshape(-1, x.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("baseline", [False, True], ids=["zero", "baseline"])
def test_interpolate(backend, dtype, baseline):
    x, b = _inputs(dtype, baseline)
    alphas, _ = quadrature("gausslegendre", M)
    out = interpolate(x, alphas, b, backend=backend)
    assert out.shape == (G * M, H) and out.dtype == dtype and out.device == x.device
    assert rel_err(out.cpu(), _interpolate_ref(x, alphas, b)) <= TOL[dtype]
    # Row g*m + k is step k of group g.
    ref = interpolate(x, alphas, b, backend="torch")
    assert rel_err(out.cpu(), ref.cpu()) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_interpolate_layout_and_options(backend):
    x, b = _inputs(torch.float32, True, noncontig=True)
    alphas = torch.tensor([0.0, 0.25, 1.0])
    out = interpolate(x, alphas, b, backend=backend)
    torch.testing.assert_close(out.view(G, 3, H)[:, 0], b)  # alpha 0: the baseline
    torch.testing.assert_close(out.view(G, 3, H)[:, 2], x)  # alpha 1: the input
    wide = interpolate(x, alphas, None, out_dtype=torch.float64, backend=backend)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide.view(G, 3, H)[:, 1], 0.25 * x.double())
    # One group spanning a whole flattened [T, H] sequence (what the Captum semantics uses).
    seq = torch.randn(1, 5 * H, device=DEVICE)
    out = interpolate(seq, alphas, torch.zeros_like(seq), backend=backend)
    assert out.shape == (3, 5 * H)


def test_interpolate_empty_and_errors():
    x = torch.randn(0, H, device=DEVICE)
    assert interpolate(x, torch.rand(3), backend="triton").shape == (0, H)
    with pytest.raises(ValueError, match="must be \\[G, H\\]"):
        interpolate(torch.randn(H), torch.rand(3))
    with pytest.raises(ValueError, match="baseline has shape"):
        interpolate(torch.randn(2, H), torch.rand(3), torch.randn(3, H))
    with pytest.raises(ValueError, match="alphas must be 1-D"):
        interpolate(torch.randn(2, H), torch.rand(3, 1))


# --------------------------------------------------------------------------------------------------
# weighted_grad_sum
# --------------------------------------------------------------------------------------------------
def _reduce_ref(g, w, x, b):
    g64, w64, x64 = g.double().cpu(), w.double().cpu(), x.double().cpu()
    d = x64 - (b.double().cpu() if b is not None else 0)
    return d * (g64.view(x.shape[0], -1, x.shape[1]) * w64[None, :, None]).sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("baseline", [False, True], ids=["zero", "baseline"])
def test_weighted_grad_sum(backend, dtype, baseline):
    x, b = _inputs(dtype, baseline)
    grads = torch.randn(G * M, H, dtype=torch.float64).to(DEVICE, dtype)
    _, weights = quadrature("riemann_trapezoid", M)
    out = weighted_grad_sum(grads, weights, x, b, backend=backend)
    assert out.shape == (G, H) and out.dtype == torch.float32
    # Accumulated in fp32 (fp64 for fp64 inputs) from the stored values: fp32 accuracy whatever the dtype.
    assert rel_err(out.cpu(), _reduce_ref(grads, weights, x, b)) <= 1e-6
    if dtype == torch.float64:
        out64 = weighted_grad_sum(grads, weights, x, b, out_dtype=torch.float64, backend=backend)
        assert rel_err(out64.cpu(), _reduce_ref(grads, weights, x, b)) <= TOL[torch.float64]
    ref = weighted_grad_sum(grads, weights, x, b, backend="torch")
    assert rel_err(out.cpu(), ref.cpu()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_grad_sum_noncontiguous(backend):
    x, b = _inputs(torch.float32, True, noncontig=True)
    grads = torch.randn(G * M, 3 * H, device=DEVICE)[:, ::3]
    weights = torch.rand(M, dtype=torch.float64)
    out = weighted_grad_sum(grads, weights, x, b, backend=backend)
    assert rel_err(out.cpu(), _reduce_ref(grads, weights, x, b)) <= 1e-6


def test_weighted_grad_sum_errors():
    x = torch.randn(2, H)
    with pytest.raises(ValueError, match="grads has shape"):
        weighted_grad_sum(torch.randn(5, H), torch.rand(3), x)
    with pytest.raises(ValueError, match="weights must be 1-D"):
        weighted_grad_sum(torch.randn(6, H), torch.rand(3, 1), x)


def test_backend_resolution():
    with pytest.raises(ValueError, match="unknown backend"):
        interpolate(torch.randn(2, H), torch.rand(3), backend="cuda")
