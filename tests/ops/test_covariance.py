"""covariance_ / symmetrize_ against a float64 reference, on both backends.

Without a GPU the Triton backend runs under Triton's interpreter (tests/conftest.py) with 16 x 16 tiles and
16-token steps, so the odd sizes below span several tile pairs, a ragged last tile and a ragged last token
step. The kernel takes only 16-byte aligned rows (as on a GPU); odd ``d`` reaches it through
:func:`covariance_` as a column slice of a wider tensor, and contiguous odd ``d`` through the raw op.
"""

import pytest
import torch

from loki_kernels.backend import ENV_VAR, resolve_plan
from loki_kernels.ops import covariance_, symmetrize_
from loki_kernels.ops.covariance import (
    OPS, Tile, choose_backend, choose_splits, covariance_launch, triton_covariance_, triton_runs, triton_takes,
)
from tests.conftest import DEVICE, TOL, rel_err

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(41, 37), (35, 70), (21, 129)]  # (tokens, d): no multiples of 16


def _x(tokens: int, d: int, dtype, aligned: bool = True) -> torch.Tensor:
    """Random ``[tokens, d]``; ``aligned``: the first d columns of a wider tensor whose rows are 16-byte
    multiples (what the kernel takes), else contiguous."""
    width = -(-d * 2 // 16) * 8 if aligned else d  # 8 columns = 16 bytes of fp16 (32 of fp32)
    return torch.randn(tokens, width, dtype=torch.float64).to(DEVICE, dtype)[:, :d]


def _mask(tokens: int, kind: str):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(tokens, dtype=torch.bool, device=DEVICE)
    if kind == "empty":
        return torch.zeros(tokens, dtype=torch.bool, device=DEVICE)
    mask = torch.rand(tokens, device=DEVICE) < 0.6
    mask[torch.randint(tokens, (1,))] = True  # never empty
    return mask


def _ref(x: torch.Tensor, mask) -> torch.Tensor:
    """float64 ``xᵀ diag(mask) x`` from the values the op sees."""
    x64 = x.detach().double().cpu()
    if mask is not None:
        x64 = x64[mask.cpu().bool()]
    return x64.t() @ x64


def _upper(a: torch.Tensor) -> torch.Tensor:
    return a.detach().double().cpu().triu()


def _start(d: int) -> torch.Tensor:
    """A random symmetric fp32 accumulator (an update adds to what is there)."""
    a = torch.randn(d, d, dtype=torch.float64)
    return (a + a.t()).float().to(DEVICE)


CASES = [(shape, "random") for shape in SHAPES] + [((41, 37), "none"), ((41, 37), "all")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0][0]}-d{c[0][1]}-{c[1]}")
def test_matches_float64(backend, dtype, case):
    (tokens, d), mask = case
    x, m = _x(tokens, d, dtype), _mask(tokens, mask)
    out = _start(d)
    before = out.double().cpu()
    runs = backend if backend == "torch" or triton_runs(dtype, x.device) else "torch"  # GPU: fp32 runs PyTorch
    assert choose_backend(out, x, backend) == runs  # the kernel really runs for "triton"
    assert covariance_(out, x, m, backend=backend) is out
    assert rel_err(_upper(out) - _upper(before), _upper(_ref(x, m))) < TOL[dtype]
    symmetrize_(out)
    assert torch.equal(out, out.t())
    assert rel_err(out.double().cpu() - before, _ref(x, m)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_or_empty_input_leaves_out_unchanged(backend):
    x = _x(40, 24, torch.float32)
    out = _start(24)
    before = out.clone()
    covariance_(out, x, _mask(40, "empty"), backend=backend)
    assert torch.equal(out, before)
    covariance_(out, x[:0], None, backend=backend)
    assert torch.equal(out, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_are_never_read(backend):
    """Pad rows may hold anything (here inf and nan): they must not reach the sum."""
    x, m = _x(50, 40, torch.float16), _mask(50, "random")
    m[:3] = False
    x[0] = float("inf")
    x[1] = float("nan")
    x[2, 5] = float("-inf")
    out = torch.zeros(40, 40, device=DEVICE)
    covariance_(out, x, m, backend=backend)
    assert torch.isfinite(_upper(out)).all()
    assert rel_err(_upper(out), _upper(_ref(x, m))) < TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_as_numbers(backend):
    """A 0/1 float or int mask means the same as the bool one."""
    x, m = _x(60, 20, torch.float32), _mask(60, "random")
    want = covariance_(torch.zeros(20, 20, device=DEVICE), x, m, backend=backend)
    for as_numbers in (m.float(), m.to(torch.int64)):
        got = covariance_(torch.zeros(20, 20, device=DEVICE), x, as_numbers, backend=backend)
        assert rel_err(_upper(got), _upper(want)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulates_over_calls(backend, dtype=torch.float16):
    """Several batches into one accumulator equal one pass over all of them (tokens not multiples of 16)."""
    d, sizes = 45, (33, 17, 50)
    out = _start(d)
    before = out.double().cpu()
    xs = [_x(t, d, dtype) for t in sizes]
    masks = [_mask(t, "random") for t in sizes]
    for x, m in zip(xs, masks):
        covariance_(out, x, m, backend=backend)
    ref = sum(_ref(x, m) for x, m in zip(xs, masks))
    assert rel_err(_upper(out) - _upper(before), _upper(ref)) < TOL[dtype]


@pytest.mark.parametrize("dtype,splits", [(torch.float32, 2), (torch.float16, 3), (torch.bfloat16, 1)], ids=str)
def test_kernel_on_contiguous_odd_rows_and_token_splits(dtype, splits):
    """The raw launch (which covariance_ never sends unaligned rows): contiguous odd d, tokens split into
    chunks that add their partial tiles atomically."""
    if not triton_runs(dtype, torch.device(DEVICE)):
        pytest.skip(f"{dtype} runs PyTorch on {DEVICE}")
    tokens, d = 77, 37
    x, m = _x(tokens, d, dtype, aligned=False), _mask(tokens, "random")
    out = _start(d)
    before = out.double().cpu()
    covariance_launch(out, x, m, tile=Tile(16, 16, 1, 1), splits=splits)()
    assert rel_err(_upper(out) - _upper(before), _upper(_ref(x, m))) < TOL[dtype]
    lower = torch.ones(d, d, dtype=torch.bool).tril(-17)  # below the diagonal tiles: never written
    assert torch.equal(out.cpu()[lower], before.float()[lower])


def test_custom_op_is_registered_and_traceable():
    """torch.library.opcheck: schema (mutates out), fake tensor registration, dispatch."""
    x, m = _x(30, 24, torch.float16), _mask(30, "random")
    torch.library.opcheck(triton_covariance_, (torch.zeros(24, 24, device=DEVICE), x, m),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetrize(backend):
    x = _x(30, 33, torch.float32)
    out = covariance_(torch.zeros(33, 33, device=DEVICE), x, backend=backend)
    out.tril_(-1).add_(torch.randn(33, 33, device=DEVICE).triu())  # junk below the diagonal, kept above
    upper = out.triu()
    assert symmetrize_(out) is out
    assert torch.equal(out, out.t())
    assert torch.equal(out.triu(), upper)
    assert symmetrize_(torch.zeros(0, 0)).shape == (0, 0)
    assert torch.equal(symmetrize_(torch.tensor([[2.0]])), torch.tensor([[2.0]]))


def test_float64_accumulator_is_exact():
    x = torch.randn(50, 30, dtype=torch.float64, device=DEVICE)
    m = _mask(50, "random")
    out = covariance_(torch.zeros(30, 30, dtype=torch.float64, device=DEVICE), x, m, backend="triton")
    assert choose_backend(out, x, "triton") == "torch"  # fp64 runs PyTorch
    assert rel_err(symmetrize_(out), _ref(x, m)) < TOL[torch.float64]


def test_bad_inputs_are_named_and_change_nothing():
    x = _x(10, 8, torch.float32)
    out = _start(8)
    before = out.clone()
    bad = [
        (dict(x=x[0]), "x must be \\[tokens, d\\]"),
        (dict(x=x.to(torch.int32)), "x must be float16"),
        (dict(out=torch.zeros(8, 9, device=DEVICE)), "out must be \\[8, 8\\]"),
        (dict(out=torch.zeros(8, 8, dtype=torch.float16, device=DEVICE)), "out must be float32 or float64"),
        (dict(out=torch.zeros(8, 8, device="meta")), "out is on meta"),
        (dict(mask=torch.ones(9, dtype=torch.bool, device=DEVICE)), "mask must be \\[10\\]"),
        (dict(mask=torch.ones(10, dtype=torch.bool, device="meta")), "mask is on meta"),
        (dict(backend="fast"), "unknown backend 'fast'"),
    ]
    for change, message in bad:
        args = {**dict(out=out, x=x, mask=None, backend="auto"), **change}
        with pytest.raises(ValueError, match=message) as info:
            covariance_(args["out"], args["x"], args["mask"], backend=args["backend"])
        assert "\n" not in str(info.value)
        assert torch.equal(out, before)
    with pytest.raises(ValueError, match="needs a square matrix"):
        symmetrize_(torch.zeros(3, 4))


def test_which_operands_take_the_kernel():
    out = torch.zeros(37, 37, device=DEVICE)
    assert triton_takes(out, _x(5, 37, torch.float16))  # 16-byte rows
    assert not triton_takes(out, _x(5, 37, torch.float16, aligned=False))  # 74-byte rows: PyTorch
    assert not triton_takes(out, _x(5, 37, torch.float32).t().contiguous().t()[:, :37])  # column-strided
    assert not triton_takes(out.double(), _x(5, 37, torch.float16))  # fp64 accumulator: PyTorch
    assert not triton_takes(out, _x(5, 37, torch.float64))
    assert choose_backend(out, _x(5, 37, torch.float16, aligned=False), "triton") == "torch"
    assert choose_backend(out, _x(5, 37, torch.float16), "auto") == "torch"  # CPU: never; CUDA: not measured


def test_triton_runs_which_dtypes_on_a_gpu(monkeypatch):
    cuda = torch.device("cuda")  # only the rule is asked: no GPU needed
    assert triton_runs(torch.float16, cuda) and triton_runs(torch.bfloat16, cuda)
    for allow_tf32 in (True, False):  # fp32 operands would load 4 bytes at a time: PyTorch either way
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
        assert not triton_runs(torch.float32, cuda)
    assert not triton_runs(torch.float64, cuda)


def test_auto_on_cuda_is_torch_until_measured(monkeypatch):
    import loki_kernels.backend as backend

    cuda = torch.device("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert resolve_plan("auto", cuda, OPS, family="covariance") == ("torch",)  # nothing measured
    monkeypatch.setattr(backend, "CHOICES", {"covariance.update": "triton"})
    assert resolve_plan("auto", cuda, OPS, family="covariance") == ("triton",)
    assert resolve_plan("torch", cuda, OPS, family="covariance") == ("torch",)


def test_token_splits_fill_the_gpu():
    sms = 132
    assert choose_splits(528, 256, sms) == 1  # d = 4096, 128-wide tiles: four full waves
    s = choose_splits(136, 256, sms)  # d = 2048: 136 tile pairs would be 2 waves for 1.03 of work
    assert 1 < s <= 8
    programs = 136 * s
    assert programs / (-(-programs // sms) * sms) >= 0.85
    assert choose_splits(136, 20, sms) == 1  # too few token steps to split
    assert choose_splits(1, 10_000, sms) == 8  # one tile: as many chunks as allowed
