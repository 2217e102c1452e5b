"""split_linear against a float64 dense computation and the original LoKILinear, on both backends.

Without a GPU the Triton backend runs under Triton's interpreter (see tests/conftest.py), so shapes are
small and odd (not multiples of any block size).
"""

import pytest
import torch
from torch import nn

from loki_kernels import SplitLinear, split_linear
from loki_kernels.backend import ENV_VAR, resolve_backend, resolve_plan
from loki_kernels.ops.split_linear import OPS, choose_plan, make_index_map, triton_runs
from loki_kernels.reference import LoKILinear
from tests.conftest import DEVICE, TOL, rel_err

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, K = 29, 56  # out (hidden) and in (d_ff) features: odd N; K-rows of 16-byte multiples (the kernels need them)


def _rows(kind: str, n: int = N) -> torch.Tensor:
    if kind == "none":
        return torch.empty(0, dtype=torch.long)
    if kind == "all":
        return torch.arange(n)
    return torch.randperm(n)[: n // 3].sort().values


def _case(dtype, rows, bias, lead=(37,), noncontig=False):
    """Random float64 problem and its low-precision copies on DEVICE."""
    w = torch.randn(N, K, dtype=torch.float64) / K**0.5
    wa = torch.randn(len(rows), K, dtype=torch.float64) / K**0.5  # trained rows differ from w's
    b = torch.randn(N, dtype=torch.float64) if bias else None
    ba = torch.randn(len(rows), dtype=torch.float64) if bias else None
    if noncontig:  # a strided view: every other column of a wider tensor
        x = torch.randn(*lead, 2 * K, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(*lead, K, dtype=torch.float64)
    dy = torch.randn(*lead, N, dtype=torch.float64)
    merged_w, merged_b = w.clone(), (b.clone() if bias else None)
    merged_w[rows] = wa
    if bias:
        merged_b[rows] = ba

    def low(t, grad=False):
        if t is None:
            return None
        t = t.to(DEVICE, dtype)
        return t.requires_grad_() if grad else t

    inputs = dict(
        x=low(x, grad=True), weight=low(w), weight_active=low(wa, grad=True), active_pos=rows.to(DEVICE),
        bias=low(b), bias_active=low(ba, grad=True),
    )
    # The reference starts from the same rounded values the kernels see.
    x64, w64 = inputs["x"].detach().double().cpu(), merged_w.to(dtype).double()
    b64 = merged_b.to(dtype).double() if bias else None
    dy = dy.to(dtype).double()
    ref = dict(
        y=x64 @ w64.t() + (b64 if bias else 0),
        dx=dy @ w64,
        dwa=(dy.reshape(-1, N).t() @ x64.reshape(-1, K))[rows],
        dba=dy.reshape(-1, N).sum(0)[rows] if bias else None,
    )
    return inputs, low(dy), ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["none", "some", "all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
def test_matches_float64(backend, dtype, rows, bias, layout):
    lead = {"2d": (37,), "3d": (3, 13), "noncontig": (2, 19)}[layout]
    inputs, dy, ref = _case(dtype, _rows(rows), bias, lead=lead, noncontig=layout == "noncontig")
    frozen_before = inputs["weight"].clone()

    y = split_linear(**inputs, backend=backend)
    y.backward(dy)

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel_err(y, ref["y"]) < tol
    assert rel_err(inputs["x"].grad, ref["dx"]) < tol
    if rows != "none":
        assert rel_err(inputs["weight_active"].grad, ref["dwa"]) < tol
        if bias:
            assert rel_err(inputs["bias_active"].grad, ref["dba"]) < tol
    else:
        assert inputs["weight_active"].grad.shape == (0, K)
    # Frozen rows never change; the torch path may only rewrite the active rows (with their own values).
    frozen = make_index_map(inputs["active_pos"], N) >= len(inputs["active_pos"])
    assert torch.equal(inputs["weight"][frozen], frozen_before[frozen])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", ["none", "some", "all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_compact_layout_matches_float64(backend, dtype, rows, bias):
    """``weight`` holding only the frozen rows (the original LoKILinear's layout) computes the same."""
    rows = _rows(rows)
    inputs, dy, ref = _case(dtype, rows, bias, lead=(3, 13))
    frozen = make_index_map(rows.to(DEVICE), N) >= len(rows)
    inputs["weight"] = inputs["weight"][frozen].contiguous()
    if bias:
        inputs["bias"] = inputs["bias"][frozen].contiguous()
    index_map = make_index_map(inputs["active_pos"], N, compact=True)
    y = split_linear(**inputs, index_map=index_map, backend=backend)
    y.backward(dy)
    tol = TOL[dtype]
    assert rel_err(y, ref["y"]) < tol
    assert rel_err(inputs["x"].grad, ref["dx"]) < tol
    if len(rows):
        assert rel_err(inputs["weight_active"].grad, ref["dwa"]) < tol
        if bias:
            assert rel_err(inputs["bias_active"].grad, ref["dba"]) < tol


def test_index_map_layouts():
    active = torch.tensor([1, 3, 4])
    assert make_index_map(active, 6).tolist() == [3, 0, 5, 1, 2, 8]  # frozen row n -> k + n
    assert make_index_map(active, 6, compact=True).tolist() == [3, 0, 4, 1, 2, 5]  # the original index_map
    assert make_index_map(torch.tensor([], dtype=torch.long), 3, compact=True).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="weight has shape"):
        split_linear(torch.randn(2, 4), torch.randn(4, 4), torch.randn(3, 4), active,
                     index_map=make_index_map(active, 6))  # 6 rows, 3 active: weight must have 6 or 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient(backend):
    inputs, dy, _ = _case(torch.float32, _rows("some"), bias=True)
    inputs["weight"].requires_grad_()
    inputs["bias"].requires_grad_()
    split_linear(**inputs, backend=backend).backward(dy)
    assert inputs["weight"].grad is None and inputs["bias"].grad is None
    assert inputs["weight_active"].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_original_loki_linear(backend, bias):
    """Same outputs and gradients as the original two-matmul + cat + gather implementation."""
    linear = nn.Linear(K, N, bias=bias).to(DEVICE)
    rows = _rows("some").tolist()
    original = LoKILinear(linear, rows)
    ours = SplitLinear.from_module(nn.Linear(K, N, bias=bias).to(DEVICE), rows, backend=backend)
    ours.load_state_dict(linear.state_dict())  # a standard state dict fills the split rows too
    x = torch.randn(2, 11, K, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(2, 11, N, device=DEVICE)

    y_ref = original(x1)
    y = ours(x2)
    y_ref.backward(dy)
    y.backward(dy)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(x2.grad, x1.grad) < TOL[torch.float32]
    assert rel_err(ours.weight_active.grad, original.active.weight.grad) < TOL[torch.float32]
    if bias:
        assert rel_err(ours.bias_active.grad, original.active_bias.grad) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_weight_view(backend):
    """A [in, out] weight (GPT-2 Conv1D layout) passed as a transposed view works like a [out, in] one."""
    inputs, dy, ref = _case(torch.float32, _rows("some"), bias=True)
    inputs["weight"] = inputs["weight"].t().contiguous().t()
    assert not inputs["weight"].is_contiguous()
    y = split_linear(**inputs, backend=backend)
    y.backward(dy)
    assert rel_err(y, ref["y"]) < TOL[torch.float32]
    assert rel_err(inputs["x"].grad, ref["dx"]) < TOL[torch.float32]
    assert rel_err(inputs["weight_active"].grad, ref["dwa"]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    rows = torch.tensor([0, 4, 5, 11], device=DEVICE)
    w = torch.randn(13, 6, dtype=torch.float64, device=DEVICE)
    b = torch.randn(13, dtype=torch.float64, device=DEVICE)
    x = torch.randn(5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    wa = torch.randn(4, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ba = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(x, wa, ba):
        return split_linear(x, w, wa, rows, b, ba, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, wa, ba))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs, _, _ = _case(torch.float32, _rows("some"), bias=False, lead=(0,))
    y = split_linear(**inputs, backend=backend)
    assert y.shape == (0, N)
    y.sum().backward()
    assert inputs["x"].grad.shape == (0, K)
    assert torch.count_nonzero(inputs["weight_active"].grad) == 0


def test_autocast_casts_like_linear():
    device_type = torch.device(DEVICE).type
    inputs, dy, ref = _case(torch.float32, _rows("some"), bias=True)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = split_linear(**inputs, backend="torch")
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(torch.bfloat16))
    assert inputs["weight_active"].grad.dtype == torch.float32
    assert rel_err(y, ref["y"]) < TOL[torch.bfloat16]
    assert rel_err(inputs["weight_active"].grad, ref["dwa"]) < TOL[torch.bfloat16]


def test_bad_inputs_are_named():
    inputs, _, _ = _case(torch.float32, _rows("some"), bias=True)
    with pytest.raises(ValueError, match="x has 55 features"):
        split_linear(**{**inputs, "x": inputs["x"][..., :-1]})
    with pytest.raises(ValueError, match="weight_active has shape"):
        split_linear(**{**inputs, "weight_active": inputs["weight_active"][:-1]})
    with pytest.raises(TypeError, match="one dtype"):
        split_linear(**{**inputs, "x": inputs["x"].half()})
    with pytest.raises(ValueError, match="both bias and bias_active"):
        split_linear(**{**inputs, "bias_active": None})
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        split_linear(**inputs, backend="cuda")


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cuda) == "torch"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", cuda) == "torch"  # the environment replaces "auto"
    monkeypatch.setenv(ENV_VAR, "TRITON")
    assert resolve_backend("torch", cpu) == "torch"  # an explicit argument wins
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"unknown backend 'fast' \\(\\${ENV_VAR}\\)"):
        resolve_backend("auto", cpu)
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu)


def test_plan_follows_the_operands():
    """Forward and dX kernels take only 16-byte-aligned, K-contiguous weight rows; other layouts run PyTorch."""
    inputs, dy, ref = _case(torch.float16, _rows("some"), bias=False)
    x, w, wa = inputs["x"], inputs["weight"], inputs["weight_active"]
    triton = "triton"  # on CUDA, or on the CPU under the interpreter (tests/conftest.py)
    assert choose_plan(x, w, wa, "triton") == (triton,) * 3
    assert choose_plan(x, w, wa, "torch") == ("torch",) * 3
    offset = torch.empty(N, K + 1, dtype=w.dtype, device=w.device)[:, 1:]  # rows start 2 bytes in
    offset.copy_(w)
    transposed = w.t().contiguous().t()
    for weight in (offset, transposed):
        assert choose_plan(x, weight, wa, "triton") == ("torch", "torch", triton)
        y = split_linear(**{**inputs, "weight": weight}, backend="triton")
        y.backward(dy)
        assert rel_err(y, ref["y"]) < TOL[torch.float16]
        assert rel_err(inputs["weight_active"].grad, ref["dwa"]) < TOL[torch.float16]
        inputs["weight_active"].grad = None


def test_triton_runs_which_dtypes_on_a_gpu(monkeypatch):
    cuda = torch.device("cuda")  # only the rule is asked: no GPU needed
    for dtype in (torch.float16, torch.bfloat16):
        assert all(triton_runs(op, dtype, cuda) for op in OPS)
    assert not any(triton_runs(op, torch.float64, cuda) for op in OPS)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert [triton_runs(op, torch.float32, cuda) for op in OPS] == [True, False, False]  # tf32 forward only
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert not any(triton_runs(op, torch.float32, cuda) for op in OPS)


def test_auto_takes_each_ops_measured_choice(monkeypatch):
    import loki_kernels.backend as backend

    cuda = torch.device("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "CHOICES", {"split_linear.forward": "torch", "split_linear.grad_weight": "triton"})
    assert resolve_plan("auto", cuda, OPS) == ("torch", "torch", "triton")  # grad_input: unmeasured -> torch
    assert resolve_plan("triton", cuda, OPS) == ("triton",) * 3  # named explicitly: every op
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_plan("auto", cuda, OPS) == ("triton",) * 3  # the environment replaces "auto" likewise


# ------------------------------------------------------------------------------------- silenced rows
def _silenced(kind: str, active: torch.Tensor, n: int = N) -> torch.Tensor:
    """A ``bool[n]`` mask: "none" (the mask path with no row set), "some" (a random third), "all", or
    "overlap" (some active and some frozen rows, so that silenced ∩ active and silenced ∩ frozen are non-empty)."""
    silenced = torch.zeros(n, dtype=torch.bool)
    if kind == "some":
        silenced[torch.randperm(n)[: n // 3]] = True
    elif kind == "all":
        silenced[:] = True
    elif kind == "overlap":
        frozen = make_index_map(active, n) >= len(active)
        silenced[active[torch.randperm(len(active))[:2]]] = True
        silenced[frozen.nonzero().flatten()[torch.randperm(int(frozen.sum()))[:3]]] = True
    return silenced.to(DEVICE)


def _masked_ref(inputs, dy, silenced, index_map=None):
    """float64 reference from the operands the op sees: the dense layer, outputs and dY zeroed at ``silenced``."""
    rows = inputs["active_pos"].cpu()
    weight = inputs["weight"].detach().double().cpu()
    if index_map is not None:  # compact layout: the frozen rows only
        full = torch.empty(N, K, dtype=torch.float64)
        frozen = make_index_map(rows, N) >= len(rows)
        full[frozen] = weight
        weight = full
    w = weight.clone()
    w[rows] = inputs["weight_active"].detach().double().cpu()
    keep = (~silenced.cpu()).double()
    x = inputs["x"].detach().double().cpu().reshape(-1, K)
    dym = dy.detach().double().cpu().reshape(-1, N) * keep
    y = x @ w.t()
    if inputs["bias"] is not None:
        b = torch.empty(N, dtype=torch.float64)
        bias = inputs["bias"].double().cpu()
        if index_map is not None:
            b[make_index_map(rows, N) >= len(rows)] = bias
        else:
            b = bias.clone()
        b[rows] = inputs["bias_active"].detach().double().cpu()
        y = y + b
    return dict(y=y * keep, dx=dym @ w, dwa=(dym.t() @ x)[rows], dba=dym.sum(0)[rows])


# (active rows, silenced rows, dtype): every mask with some active rows in both dtypes; no and all active rows
# with a partial and a full mask.
SILENCE_CASES = [
    *[("some", silence, dtype) for silence in ("none", "some", "all", "overlap")
      for dtype in (torch.float32, torch.float16)],
    *[(rows, silence, torch.float32) for rows in ("none", "all") for silence in ("some", "all")],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, silence, dtype", SILENCE_CASES, ids=[f"{r}-{s}-{d}" for r, s, d in SILENCE_CASES])
def test_silenced_rows_match_float64(backend, rows, silence, dtype):
    """y[:, n] = 0 (bias too) and dY[:, n] dropped before dX and dW for silenced rows n, both backends."""
    rows = _rows(rows)
    inputs, dy, _ = _case(dtype, rows, bias=True, lead=(3, 13))
    silenced = _silenced(silence, rows)
    frozen_before = inputs["weight"].clone()
    ref = _masked_ref(inputs, dy, silenced)

    y = split_linear(**inputs, silenced=silenced, backend=backend)
    y.backward(dy)

    tol = TOL[dtype]
    assert rel_err(y.reshape(-1, N), ref["y"]) <= tol
    assert rel_err(inputs["x"].grad.reshape(-1, K), ref["dx"]) <= tol
    assert torch.count_nonzero(y[..., silenced]) == 0  # exact zeros, bias included
    if len(rows):
        assert rel_err(inputs["weight_active"].grad, ref["dwa"]) <= tol
        assert rel_err(inputs["bias_active"].grad, ref["dba"]) <= tol
        silenced_active = silenced[inputs["active_pos"]]
        assert torch.count_nonzero(inputs["weight_active"].grad[silenced_active]) == 0
        assert torch.count_nonzero(inputs["bias_active"].grad[silenced_active]) == 0
    if silence == "all":
        assert torch.count_nonzero(inputs["x"].grad) == 0
    frozen = make_index_map(inputs["active_pos"], N) >= len(rows)
    assert torch.equal(inputs["weight"][frozen], frozen_before[frozen])  # the mask never edits weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_silenced_rows_compact_layout_and_3d(backend, bias):
    rows = _rows("some")
    inputs, dy, _ = _case(torch.float32, rows, bias, lead=(2, 3, 7))
    frozen = make_index_map(rows.to(DEVICE), N) >= len(rows)
    inputs["weight"] = inputs["weight"][frozen].contiguous()
    if bias:
        inputs["bias"] = inputs["bias"][frozen].contiguous()
    index_map = make_index_map(inputs["active_pos"], N, compact=True)
    silenced = _silenced("overlap", rows)
    ref = _masked_ref(inputs, dy, silenced, index_map=index_map)
    y = split_linear(**inputs, index_map=index_map, silenced=silenced, backend=backend)
    y.backward(dy)
    tol = TOL[torch.float32]
    assert rel_err(y.reshape(-1, N), ref["y"]) <= tol
    assert rel_err(inputs["x"].grad.reshape(-1, K), ref["dx"]) <= tol
    assert rel_err(inputs["weight_active"].grad, ref["dwa"]) <= tol
    if bias:
        assert rel_err(inputs["bias_active"].grad, ref["dba"]) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_silenced_gradcheck_float64(backend):
    rows = torch.tensor([1, 4, 6], device=DEVICE)
    silenced = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    silenced[[4, 7, 8]] = True  # one active row, two frozen ones
    w = torch.randn(9, 4, dtype=torch.float64, device=DEVICE)
    b = torch.randn(9, dtype=torch.float64, device=DEVICE)
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    wa = torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ba = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(x, wa, ba):
        return split_linear(x, w, wa, rows, b, ba, silenced=silenced, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, wa, ba))


@pytest.mark.parametrize("backend", BACKENDS)
def test_silenced_outputs_are_exact_zeros_with_nonfinite_inputs(backend):
    """Silencing is a select, not FNSFT's ``out * m``: inf or nan in x still gives 0 on silenced rows."""
    rows = _rows("some")
    inputs, _, _ = _case(torch.float32, rows, bias=True)
    with torch.no_grad():
        inputs["x"][0, 3] = float("inf")
        inputs["x"][1, 5] = float("nan")
    silenced = _silenced("overlap", rows)
    y = split_linear(**inputs, silenced=silenced, backend=backend)
    assert torch.count_nonzero(y[..., silenced]) == 0 and not torch.isnan(y[..., silenced]).any()
    assert torch.isfinite(y[2:]).all()


def test_silenced_mask_is_checked():
    inputs, _, _ = _case(torch.float32, _rows("some"), bias=True)
    with pytest.raises(ValueError, match=r"silenced must be a bool tensor of shape \(29,\), got torch.float32"):
        split_linear(**inputs, silenced=torch.zeros(N, device=DEVICE))
    with pytest.raises(ValueError, match=r"of shape \(28,\)"):
        split_linear(**inputs, silenced=torch.zeros(N - 1, dtype=torch.bool, device=DEVICE))
