"""The K-FAC curvature edit (``loki_kernels.kfac.edit``) against the original (``reference.kfac_original``).

The pair selection must return exactly the heap loop's set (ties, zero eigenvalues, ρ at the loop's own
partial sums); the edited weight must equal its definition, written out independently in float64;
``apply_edit`` must change only the planned weights, keep the dtype, restore bit-exactly, cache by content
and refuse bad plans without touching the model.
"""

from __future__ import annotations

import math

import pytest
import torch

from loki_kernels.arch import find_mlps, is_transposed, row_view
from loki_kernels.kfac import Factors
from loki_kernels.kfac.edit import Edit, Eigen, apply_edit, edit, eigen, factor_rank, pair_mask, select_pairs
from loki_kernels.reference import kfac_original as original
from tests.conftest import TOL, rel_err
from tests.tiny_models import FFN, HIDDEN, LAYERS, tiny_model

RHOS = (0.0, 0.05, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99, 0.999, 1.0)


# --------------------------------------------------------------------------------------------- helpers
def heap_mask(lam, mu, rho):
    """The heap loop's kept set as a boolean [len(lam), len(mu)] mask (and the pair list)."""
    pairs = original.top_pairs_by_product(lam, mu, rho)
    mask = torch.zeros(len(lam), len(mu), dtype=torch.bool)
    for i, j in pairs:
        mask[i, j] = True
    assert len(set(pairs)) == len(pairs)
    return mask, pairs


def spectrum(n, kind, dtype=torch.float64):
    """A descending non-negative spectrum: ``rand``, ``ties`` (few distinct values, products collide), or
    ``zeros`` (random with a zero tail)."""
    if kind == "ties":
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 4.0], dtype=dtype)
        v = levels[torch.randint(0, len(levels), (n,))]
    elif kind == "zeros":
        v = torch.rand(n, dtype=dtype) * (torch.rand(n) < 0.6)
    else:
        v = torch.rand(n, dtype=dtype) ** 3
    return v.sort(descending=True).values


def spd(d, rank=None, dtype=torch.float32):
    """A random symmetric positive semi-definite factor, as collected (fp32 second moment)."""
    x = torch.randn(d, rank or d + 3, dtype=torch.float64)
    return (x @ x.T / x.shape[1]).to(dtype)


def explicit_edit(W, eG, eA, pairs):
    """``Σ_{(i,j)∈S} (u_iᵀ W v_j) u_i v_jᵀ`` in float64, one pair at a time."""
    W = W.double()
    out = torch.zeros_like(W)
    for i, j in pairs:
        u, v = eG.vectors[:, i], eA.vectors[:, j]
        out += (u @ W @ v) * torch.outer(u, v)
    return out


# -------------------------------------------------------------------------------------- pair selection
@pytest.mark.parametrize("kind", ["rand", "ties", "zeros"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (9, 13), (31, 26)])
def test_select_pairs_is_the_heap_loops_set(kind, shape):
    lam, mu = spectrum(shape[0], kind), spectrum(shape[1], kind)
    for rho in RHOS:
        mask, _ = heap_mask(lam, mu, rho)
        k = select_pairs(lam, mu, rho)
        assert k.dtype == torch.int64 and k.shape == (shape[0],)
        assert bool((k[:-1] >= k[1:]).all()), "not a staircase"
        assert torch.equal(pair_mask(k, shape[1]), mask), f"rho={rho}, {int(k.sum())} vs {int(mask.sum())} pairs"


def test_select_pairs_at_the_loops_own_partial_sums():
    """ρ placed exactly on (and one ulp around) the loop's running sums: the stop decision is the loop's."""
    for _ in range(4):
        m, n = torch.randint(2, 30, (2,)).tolist()
        lam, mu = spectrum(m, "rand"), spectrum(n, "ties" if m % 2 else "rand")
        total = (lam.sum() * mu.sum()).item()
        products = sorted((lam[:, None] * mu[None, :]).flatten().tolist(), reverse=True)
        sums, s = [], 0.0
        for p in products:
            s += p
            sums.append(s)
        for K in torch.randint(0, len(sums), (6,)).tolist():
            r0 = sums[K] / total
            for rho in (r0, math.nextafter(r0, 0.0), math.nextafter(r0, 2.0)):
                if 0.0 <= rho <= 1.0:
                    mask, _ = heap_mask(lam, mu, rho)
                    assert torch.equal(pair_mask(select_pairs(lam, mu, rho), n), mask), rho


def test_select_pairs_float32_and_power_law():
    """fp32 spectra (products formed in fp32, as the loop forms them) and a larger decaying spectrum."""
    lam, mu = spectrum(19, "rand", torch.float32), spectrum(27, "zeros", torch.float32)
    for rho in RHOS:
        assert torch.equal(pair_mask(select_pairs(lam, mu, rho), 27), heap_mask(lam, mu, rho)[0]), rho
    lam = torch.arange(1, 121, dtype=torch.float64) ** -1.1 * (1 + 0.01 * torch.rand(120)).sort(
        descending=True).values
    mu = torch.arange(1, 301, dtype=torch.float64) ** -0.9
    for rho in (0.6, 0.8):
        mask, pairs = heap_mask(lam, mu, rho)
        assert len(pairs) > 500
        assert torch.equal(pair_mask(select_pairs(lam, mu, rho), 300), mask)


def test_select_pairs_edge_cases():
    lam, mu = spectrum(6, "rand"), spectrum(8, "rand")
    assert int(select_pairs(lam, mu, 0.0).sum()) == 0  # the loop stops before its first pop
    zeros = torch.zeros(5, dtype=torch.float64)
    for rho in (0.0, 0.5, 1.0):
        assert int(select_pairs(zeros, mu, rho).sum()) == 0
        assert int(select_pairs(lam, zeros, rho).sum()) == 0
        assert torch.equal(pair_mask(select_pairs(zeros, mu, rho), 8), heap_mask(zeros, mu, rho)[0])
    # Equal products everywhere: ties broken in (i, j) order, whole rows first.
    ones = torch.ones(4, dtype=torch.float64)
    k = select_pairs(ones, torch.ones(5, dtype=torch.float64), 0.5)
    assert k.tolist() == [5, 5, 0, 0]
    k = select_pairs(ones, torch.ones(5, dtype=torch.float64), 0.55)
    assert k.tolist() == [5, 5, 1, 0]


@pytest.mark.parametrize("lam, mu, rho, match", [
    (torch.tensor([1.0, 2.0]), torch.tensor([1.0]), 0.5, "descending"),
    (torch.tensor([1.0, -0.5]), torch.tensor([1.0]), 0.5, "negative"),
    (torch.tensor([float("nan"), 1.0]), torch.tensor([1.0]), 0.5, "non-finite"),
    (torch.ones(2, 2), torch.tensor([1.0]), 0.5, "1-D"),
    (torch.tensor([1.0]), torch.tensor([1.0]), 1.5, "rho"),
    (torch.tensor([1.0]), torch.tensor([1.0]), -0.1, "rho"),
    (torch.tensor([1.0]), torch.tensor([1.0]), float("nan"), "rho"),
])
def test_select_pairs_bad_input(lam, mu, rho, match):
    with pytest.raises(ValueError, match=match) as info:
        select_pairs(lam, mu, rho)
    assert "\n" not in str(info.value)


def test_pair_mask():
    k = torch.tensor([3, 1, 0])
    assert pair_mask(k, 4).tolist() == [[True, True, True, False], [True, False, False, False], [False] * 4]


# ----------------------------------------------------------------------------------------------- eigen
def test_eigen_symmetrises_clamps_and_sorts():
    F = spd(11, rank=4).double()
    F[0, 1] += 1e-3  # not symmetric, as fp32 accumulation leaves a factor
    e = eigen(F)
    assert e.values.dtype == torch.float64 and e.vectors.dtype == torch.float64
    assert bool((e.values[:-1] >= e.values[1:]).all()) and bool((e.values >= 0).all())
    sym = (F + F.T) / 2
    raw = torch.linalg.eigh(sym).eigenvalues
    assert raw.min() < 0  # rank 4 plus the asymmetry: some eigenvalues are negative before the clamp
    recon = e.vectors @ torch.diag(raw.flip(0)) @ e.vectors.T
    assert rel_err(recon, sym) < TOL[torch.float64]
    assert rel_err(e.vectors.T @ e.vectors, torch.eye(11, dtype=torch.float64)) < TOL[torch.float64]
    assert torch.equal(e.values, raw.flip(0).clamp(min=0))
    assert eigen(F, dtype=torch.float32).values.dtype == torch.float32


# ------------------------------------------------------------------------------------------- the edit
@pytest.mark.parametrize("rho", [0.2, 0.6, 0.9])
def test_product_edit_is_its_definition(rho):
    d_out, d_in = 13, 7
    W, A, G = torch.randn(d_out, d_in), spd(d_in), spd(d_out, rank=9)  # G has zero eigenvalues (clamped)
    eA, eG = eigen(A), eigen(G)
    _, pairs = heap_mask(eG.values, eA.values, rho)
    ref = explicit_edit(W, eG, eA, pairs)
    out = edit(W.double(), A, G, rho)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < TOL[torch.float64]
    # The original's projection on the same eigenpairs, and the fork's ablation.
    orig = original.apply_kfac_by_product(W.double(), eG.values, eG.vectors, eA.values, eA.vectors, rho)
    assert rel_err(out, orig) < TOL[torch.float64]
    comp = edit(W.double(), A, G, rho, complement=True)
    assert rel_err(comp, W.double() - ref) < TOL[torch.float64]
    ablated = original.ablate_kfac_by_product(W.double(), eG.values, eG.vectors, eA.values, eA.vectors, rho)
    assert rel_err(comp, ablated) < TOL[torch.float64]
    # Precomputed decompositions give the same result.
    assert rel_err(edit(W.double(), eA, eG, rho), ref) < TOL[torch.float64]


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.6, 0.95])
def test_per_factor_edit_is_the_originals_apply_kfac(rho):
    d_out, d_in = 11, 17
    W, A, G = torch.randn(d_out, d_in, dtype=torch.float64), spd(d_in), spd(d_out)
    eA, eG = eigen(A), eigen(G)
    ref = original.apply_kfac(W, eG.values, eG.vectors, eA.values, eA.vectors, (rho, rho))
    out = edit(W, A, G, rho, method="per_factor")
    assert rel_err(out, ref) < TOL[torch.float64]
    r_g, r_a = factor_rank(eG.values, rho), factor_rank(eA.values, rho)
    assert (r_g, r_a) == (original.compute_rank_for_variance(eG.values, rho)[0],
                          original.compute_rank_for_variance(eA.values, rho)[0])
    assert torch.linalg.matrix_rank(out).item() <= min(r_g, r_a)
    assert rel_err(edit(W, A, G, rho, method="per_factor", complement=True), W - ref) < TOL[torch.float64]


@pytest.mark.parametrize("method", ["product", "per_factor"])
def test_rho_one_keeps_the_weight_and_rho_zero_removes_it(method):
    W = torch.randn(9, 14, dtype=torch.float64)
    A, G = spd(14, rank=6), spd(9)  # A has zero eigenvalues: at rho = 1 their pairs are kept too
    assert rel_err(edit(W, A, G, 1.0, method=method), W) < TOL[torch.float64]
    assert edit(W, A, G, 1.0, method=method, complement=True).abs().max() < 1e-12 * W.abs().max()
    assert torch.count_nonzero(edit(W, A, G, 0.0, method=method)) == 0
    assert torch.equal(edit(W, A, G, 0.0, method=method, complement=True), W)


def test_per_factor_rank_where_we_differ_from_the_original():
    values = eigen(spd(8)).values
    assert factor_rank(values, 0.0) == 0 and original.compute_rank_for_variance(values, 0.0)[0] == 1
    zeros = torch.zeros(5, dtype=torch.float64)
    assert factor_rank(zeros, 0.5) == 0 and original.compute_rank_for_variance(zeros, 0.5)[0] == 5
    assert factor_rank(values, 1.0) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_edit_keeps_the_weights_dtype(dtype):
    W, A, G = torch.randn(10, 6), spd(6), spd(10)
    out = edit(W.to(dtype), A, G, 0.6)
    ref = edit(W.to(dtype).double(), A, G, 0.6)
    assert out.dtype == dtype and out.device == W.device
    assert rel_err(out, ref) < TOL[dtype]


def test_edit_bad_input():
    W, A, G = torch.randn(10, 6), spd(6), spd(10)
    cases = [((W, G, G, 0.5), "A has shape \\(10, 10\\) but weight \\[d_out, d_in\\] has shape \\(10, 6\\)"),
             ((W, A, A, 0.5), "G has shape \\(6, 6\\) but weight"),
             ((W, A, G, 1.2), "rho"), ((W, A, G, True), "rho"),
             ((W[0], A, G, 0.5), "2-D")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            edit(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="method"):
        edit(W, A, G, 0.5, method="rows")
    with pytest.raises(ValueError, match="non-finite"):
        edit(W, torch.full((6, 6), float("nan")), G, 0.5)


# --------------------------------------------------------------------------------------- apply_edit
def random_factors(model, layers=range(LAYERS)):
    """Random SPD factors for every MLP projection of ``layers``, in the :class:`Factors` key layout."""
    factors = Factors()
    for mlp in find_mlps(model):
        if mlp.layer not in layers:
            continue
        for module in ("gate", "up", "down"):
            proj = getattr(mlp, module)
            if proj is None:
                continue
            d_out, d_in = row_view(proj.module).shape
            key = "down" if module == "down" else "mlp"
            factors.A.setdefault(f"{mlp.layer}.{key}", spd(d_in, rank=d_in - 2))
            factors.G[f"{mlp.layer}.{module}"] = spd(d_out)
    return factors


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed}"


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                         ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_apply_edit_changes_only_the_plan_and_restores(arch, dtype):
    model = tiny_model(arch).to(dtype)
    factors = random_factors(model)
    mlps = find_mlps(model)
    rhos = {(1, "up"): 0.6, (1, "down"): 0.8, (2, "down"): 0.5}
    if mlps[0].gate is not None:
        rhos[1, "gate"] = 0.6
    plan = {"1": {m: r for (layer, m), r in rhos.items() if layer == 1}, 2: {"down": 0.5}}
    plan["1"]["gate" if mlps[0].gate is not None else "up"] = plan["1"].get("gate", 0.6)
    plan[0] = {"up": 1.0, "down": 0.99995}  # at or above SKIP_RHO: untouched
    before = snapshot(model)
    edited = apply_edit(model, factors, plan, progress=False)
    assert isinstance(edited, Edit) and set(edited.projections) == set(rhos)
    planned = {getattr(mlps[layer], module).name + ".weight": (layer, module) for layer, module in rhos}
    after = model.state_dict()
    decomposed = {}  # gate and up share A: decompose each factor once here too
    for key, value in before.items():
        assert after[key].dtype == value.dtype
        if key not in planned:
            assert torch.equal(after[key], value), key
            continue
        layer, module = planned[key]
        proj = getattr(mlps[layer], module).module
        rows = value.t() if is_transposed(proj) else value  # the original weight as [out, in]
        A, G = (decomposed.setdefault(id(F), eigen(F)) for F in (factors.a(layer, module), factors.g(layer, module)))
        ref = edit(rows.double(), A, G, rhos[layer, module])
        assert rel_err(row_view(proj), ref) < TOL[dtype]
        assert not torch.equal(after[key], value) and edited.kept[layer, module] > 0
    edited.restore()
    assert_same(model, before)
    with apply_edit(model, factors, {2: {"down": 0.5}}, progress=False) as again:
        assert again.projections == [(2, "down")]
        assert not torch.equal(mlps[2].down.module.weight, before[mlps[2].down.name + ".weight"])
    assert_same(model, before)


def test_apply_edit_decomposes_once_and_caches(tmp_path, monkeypatch):
    model = tiny_model("llama")
    factors = random_factors(model, layers=[0])
    plan = {0: {"gate": 0.6, "up": 0.6, "down": 0.7}}
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda F, *a, **k: calls.append(F.shape) or eigh(F, *a, **k))
    before = snapshot(model)

    first = apply_edit(model, factors, plan, cache_dir=tmp_path, progress=False)
    assert sorted(calls) == sorted([(HIDDEN, HIDDEN), (FFN, FFN), (FFN, FFN), (FFN, FFN), (HIDDEN, HIDDEN)])
    # gate and up share A (decomposed once); G of gate, up, down; A of down: 5 decompositions, not 6.
    assert len(calls) == 5 and first.loaded == set()
    fresh = snapshot(model)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and not list(tmp_path.glob("*.tmp"))
    first.restore()
    assert_same(model, before)

    calls.clear()
    second = apply_edit(model, factors, plan, cache_dir=tmp_path, progress=False)
    assert calls == [] and second.loaded == set(second.projections) == {(0, "gate"), (0, "up"), (0, "down")}
    assert second.kept == first.kept
    assert_same(model, fresh)
    second.restore()

    # Another rho, method or complement is another cache entry.
    calls.clear()
    with apply_edit(model, factors, {0: {"up": 0.6}}, complement=True, cache_dir=tmp_path, progress=False) as e:
        assert e.loaded == set() and len(calls) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert_same(model, before)


def test_apply_edit_bad_plans_change_nothing():
    model = tiny_model("llama")
    factors = random_factors(model, layers=[0, 1])
    before = snapshot(model)
    cases = [
        ({5: {"up": 0.5}}, ValueError, "unknown layer 5"),
        ({"x": {"up": 0.5}}, ValueError, "not a layer number"),
        ({0: {"up": 0.5}, "0": {"down": 0.5}}, ValueError, "twice"),
        ({0: {"up": 0.5, "o_proj": 0.5}}, ValueError, "unknown module 'o_proj' in plan layer 0"),
        ({0: {"up": 0.5}, 1: {"down": 1.5}}, ValueError, "layer 1 down: rho must be a number in \\[0, 1\\], got 1.5"),
        ({0: {"up": 0.5}, 1: {"down": "0.5"}}, ValueError, "rho must be a number"),
        ({0: {"up": 0.5}, 2: {"down": 0.5}}, KeyError, "no A factor for layer 2 down"),
        ({0: 0.5}, ValueError, "expected \\{module: rho\\}"),
    ]
    for plan, error, match in cases:
        with pytest.raises(error, match=match) as info:
            apply_edit(model, factors, plan, progress=False)
        assert "\n" not in str(info.value)
        assert_same(model, before)
    wrong = Factors(A=dict(factors.A), G=dict(factors.G))
    wrong.G["1.up"] = spd(FFN + 1)
    with pytest.raises(ValueError, match=f"layer 1 up: G has shape \\({FFN + 1}, {FFN + 1}\\) but weight"):
        apply_edit(model, wrong, {0: {"gate": 0.5}, 1: {"up": 0.5}}, progress=False)
    assert_same(model, before)
    with pytest.raises(ValueError, match="method"):
        apply_edit(model, factors, {0: {"up": 0.5}}, method="rows", progress=False)
    # A skipped projection (rho >= 0.9999) needs no factors and changes nothing.
    assert apply_edit(model, Factors(), {2: {"up": 0.99995, "down": 1.0}}, progress=False).projections == []
    assert_same(model, before)


def test_apply_edit_gpt2_has_no_gate():
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer 0 of GPT2LMHeadModel has no gate projection"):
        apply_edit(model, random_factors(model), {0: {"gate": 0.5}}, progress=False)
    assert_same(model, before)


def test_eigen_is_a_public_input_to_edit():
    W = torch.randn(5, 4, dtype=torch.float64)
    e = Eigen(torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    g = Eigen(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64), torch.eye(5, dtype=torch.float64))
    # Identity bases: C = W, kept pairs are rows 0-1 (λ = 1) times the leading columns of μ.
    k = select_pairs(g.values, e.values, 0.8)
    out = edit(W, e, g, 0.8)
    assert torch.equal(out, W * pair_mask(k, 4))
