"""Torch FastICA against scikit-learn's FastICA: same input and ``w_init`` → same fit, up to float error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from loki_kernels.ica.fastica import ConvergenceWarning, fastica, initial_unmixing, sym_decorrelation
from tests.conftest import TOL, rel_err

sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
sklearn_exceptions = pytest.importorskip("sklearn.exceptions")
SkFastICA = sklearn_decomposition.FastICA


def mixed_sources(n=400, f=9, dtype=torch.float64, with_mixing=False):
    """Laplacian and uniform sources, randomly mixed and shifted: ``[n, f]`` (and the mixing ``[f, f]``)."""
    s = torch.cat([torch.distributions.Laplace(0.0, 1.0).sample((n, f - f // 3)),
                   torch.rand(n, f // 3) * 2 - 1], dim=1)
    a = torch.randn(f, f)
    x = (s @ a.T + torch.randn(f)).to(dtype)
    return (x, a.to(dtype)) if with_mixing else x


def sk_fit(x, **kw):
    est = SkFastICA(**kw)
    sources = est.fit_transform(x.numpy())
    return est, sources


def close(ours, theirs, dtype=torch.float64, factor=1000.0):
    """Relative error within ``factor`` × the dtype's bound (the iterations amplify rounding a little)."""
    return rel_err(ours, torch.as_tensor(np.asarray(theirs))) < factor * TOL[dtype]


def converging_fit(**kw):
    """Data, ``w_init`` and sklearn's fit for a draw on which sklearn converges.

    Where the fixed-point iteration does not converge within ``max_iter`` (the ``cube`` contrast on ~2 % of
    these draws), its last iterate depends on rounding, so two correct implementations need not agree there.
    """
    k = kw["n_components"]
    for _ in range(20):
        x = mixed_sources()
        w_init = torch.randn(k, k, dtype=torch.float64)
        given = {} if "random_state" in kw else {"w_init": w_init.numpy()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", sklearn_exceptions.ConvergenceWarning)
            try:
                est, s = sk_fit(x, **given, **kw)
            except sklearn_exceptions.ConvergenceWarning:
                continue
        return x, w_init, est, s
    raise AssertionError("sklearn's FastICA converged on none of 20 draws")


@pytest.mark.parametrize("fun", ["logcosh", "exp", "cube"])
@pytest.mark.parametrize("whiten", ["unit-variance", "arbitrary-variance"])
@pytest.mark.parametrize("solver", ["svd", "eigh"])
def test_matches_sklearn_given_w_init(fun, whiten, solver):
    k = 5
    x, w_init, est, s = converging_fit(n_components=k, fun=fun, whiten=whiten, whiten_solver=solver, max_iter=200,
                                       tol=1e-4)
    ours = fastica(x, k, fun=fun, whiten=whiten, whiten_solver=solver, w_init=w_init, max_iter=200, tol=1e-4)
    assert ours.n_iter == est.n_iter_
    assert ours.converged
    assert close(ours.components, est.components_)
    assert close(ours.mixing, est.mixing_)
    assert close(ours.sources, s)
    assert close(ours.whitening, est.whitening_)
    assert close(ours.mean, est.mean_)
    assert close(ours.unmixing, est._unmixing)


def matched(ours: torch.Tensor, theirs) -> torch.Tensor:
    """``ours``'s rows reordered and sign-flipped onto ``theirs``'s (``[k, f]``), by absolute correlation."""
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float64)
    ours = ours.double()
    cos = (ours / ours.norm(dim=1, keepdim=True)) @ (theirs / theirs.norm(dim=1, keepdim=True)).T
    order = cos.abs().argmax(dim=0)
    assert sorted(order.tolist()) == list(range(theirs.shape[0]))
    return ours[order] * torch.sign(cos[order, torch.arange(theirs.shape[0])])[:, None]


def test_logcosh_alpha_and_float32():
    """float32 and alpha = 1.5 on well-separated Laplacian sources: the same components as sklearn's.

    In float32 the two iterations may part ways (a whitening sign decided by rounding, or the tolerance check
    passing one step apart) and reach the same fixed point in another order, so rows are matched first.
    """
    s = torch.distributions.Laplace(0.0, 1.0).sample((2000, 6))
    x = (s @ torch.randn(6, 6).T + torch.randn(6)).float()
    w_init = torch.randn(4, 4, dtype=torch.float64)
    est, _ = sk_fit(x, n_components=4, fun_args={"alpha": 1.5}, w_init=w_init.numpy(), tol=1e-4)
    ours = fastica(x, 4, alpha=1.5, w_init=w_init, tol=1e-4)
    assert ours.components.dtype == ours.sources.dtype == torch.float32
    assert ours.converged
    assert rel_err(matched(ours.components, est.components_), torch.from_numpy(est.components_)) < 1e-3


def test_seed_draws_sklearns_initialisation():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    assert np.array_equal(initial_unmixing(6, seed), np.random.RandomState(seed).normal(size=(6, 6)))
    x, _, est, s = converging_fit(n_components=6, random_state=seed)  # sklearn draws w_init from the seed
    ours = fastica(x, 6, seed=seed)
    assert ours.n_iter == est.n_iter_
    assert close(ours.components, est.components_)
    assert close(ours.sources, s)


def test_without_whitening_on_white_data():
    x = mixed_sources(500, 6)
    white = torch.as_tensor(SkFastICA(n_components=6, random_state=0).fit_transform(x.numpy()))
    w_init = torch.randn(6, 6, dtype=torch.float64)
    est, s = sk_fit(white, whiten=False, w_init=w_init.numpy())
    ours = fastica(white, whiten=False, w_init=w_init)
    assert ours.mean is None and ours.whitening is None
    assert ours.n_iter == est.n_iter_
    assert close(ours.components, est.components_)
    assert close(ours.mixing, est.mixing_)
    assert close(ours.sources, s)


def test_given_whitening_equals_computed_one():
    x = mixed_sources()
    w_init = torch.randn(4, 4, dtype=torch.float64)
    computed = fastica(x, 4, w_init=w_init)
    given = fastica(x, 4, w_init=w_init, whitening=computed.whitening)
    assert given.n_iter == computed.n_iter
    assert rel_err(given.components, computed.components) < TOL[torch.float64]


def test_recovers_planted_sources():
    x, a = mixed_sources(4000, 6, with_mixing=True)
    ours = fastica(x, 6, seed=0)
    # unmixing · true mixing is a scaled signed permutation: one dominant entry per row and per column
    product = ours.components @ a
    cosine = product.abs() / product.norm(dim=1, keepdim=True)
    assert (cosine.max(dim=1).values > 0.98).all()
    assert sorted(cosine.argmax(dim=1).tolist()) == list(range(6))
    assert ours.sources.std(dim=0, correction=0).sub(1).abs().max() < 1e-10  # unit variance


def test_non_convergence_warns_and_is_recorded():
    x = mixed_sources()
    w_init = torch.randn(5, 5, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        ours = fastica(x, 5, w_init=w_init, max_iter=2, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est, _ = sk_fit(x, n_components=5, w_init=w_init.numpy(), max_iter=2, tol=1e-12)
    assert not ours.converged
    assert ours.n_iter == est.n_iter_ == 2
    assert close(ours.components, est.components_, factor=1e4)  # two steps from an SVD by another LAPACK


def test_sym_decorrelation_orthonormalises():
    w = torch.randn(7, 7, dtype=torch.float64) + 4 * torch.eye(7, dtype=torch.float64)  # well conditioned
    d = sym_decorrelation(w)
    assert torch.allclose(d @ d.T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    # W = (W Wᵀ)^{1/2}·d: W·dᵀ is symmetric positive definite
    p = w @ d.T
    assert torch.allclose(p, p.T, atol=1e-10) and bool((torch.linalg.eigvalsh(p) > 0).all())


@pytest.mark.parametrize("kwargs, message", [
    ({"fun": "tanh"}, "fun"),
    ({"alpha": 3.0}, "alpha"),
    ({"whiten": True}, "whiten"),
    ({"whiten_solver": "qr"}, "whiten_solver"),
    ({"max_iter": 0}, "max_iter"),
    ({"tol": -1.0}, "tol"),
    ({"algorithm": "deflation"}, "deflation"),
    ({"n_components": 20}, "n_components"),
    ({"w_init": np.ones((2, 2))}, "w_init"),
    ({"whitening": torch.ones(2, 3, dtype=torch.float64)}, "whitening"),
])
def test_bad_arguments(kwargs, message):
    x = mixed_sources(50, 6)
    with pytest.raises(ValueError, match=message):
        fastica(x, **{"n_components": 3, **kwargs})


def test_bad_data():
    with pytest.raises(ValueError, match="2-D float32 or float64"):
        fastica(torch.randn(10))
    with pytest.raises(ValueError, match="2-D float32 or float64"):
        fastica(torch.randint(0, 3, (10, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fastica(torch.randn(1, 4))
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastica(bad)
