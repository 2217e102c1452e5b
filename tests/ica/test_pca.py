"""Streaming moments, exact PCA against scikit-learn, and the randomized range finder against exact PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loki_kernels.ica.linalg import thin_svd
from loki_kernels.ica.pca import (
    exact_memory_bytes,
    exact_pca,
    feature_moments,
    gram_svd,
    orthonormal_basis,
    pca_dimension,
    randomized_pca,
    stream_memory_bytes,
)
from tests.conftest import TOL, rel_err


def blocks_of(x: torch.Tensor, sizes: list[int]):
    """A source over row blocks of ``x`` of the given sizes (0 = an empty block, which is skipped)."""
    cuts = np.cumsum([0, *sizes]).tolist()
    assert cuts[-1] == x.shape[0]
    return lambda: iter([x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])


def decaying(tokens: int, features: int, rank: int, decay: float = 0.8, noise: float = 1e-3):
    """Data with singular values ``decay**i`` (rank ``rank``) plus small noise and feature offsets/scales."""
    u = torch.linalg.qr(torch.randn(tokens, rank, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(features, rank, dtype=torch.float64)).Q
    s = decay ** torch.arange(rank, dtype=torch.float64) * tokens**0.5
    x = (u * s) @ v.T + noise * torch.randn(tokens, features, dtype=torch.float64)
    return x * (torch.rand(features, dtype=torch.float64) + 0.5) + torch.randn(features, dtype=torch.float64)


def test_moments_match_numpy():
    x = torch.randn(203, 17, dtype=torch.float64) * 3 + 5
    x[:, 4] = 2.5  # a constant feature: std floored at 1e-8
    moments = feature_moments(blocks_of(x, [50, 0, 1, 100, 52]))
    ref = x.numpy()
    assert moments.n == 203
    assert rel_err(moments.mean, torch.from_numpy(ref.mean(axis=0))) < TOL[torch.float64]
    assert rel_err(moments.std, torch.from_numpy(np.maximum(ref.std(axis=0), 1e-8))) < TOL[torch.float64]
    assert moments.std[4].item() == 1e-8


def test_moments_errors():
    with pytest.raises(ValueError, match="no activations"):
        feature_moments(lambda: iter([torch.zeros(0, 4)]))
    with pytest.raises(ValueError, match="features"):
        feature_moments(lambda: iter([torch.randn(3, 4), torch.randn(3, 5)]))
    with pytest.raises(ValueError, match="2-D"):
        feature_moments(lambda: iter([torch.randn(3)]))


def test_exact_pca_matches_sklearn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = decaying(120, 45, 30, noise=0.05)
    source = blocks_of(x, [60, 60])
    moments = feature_moments(source)
    ours = exact_pca(source, 20, moments, dtype=torch.float64)
    xz = ((x - moments.mean) / moments.std).numpy()
    sk = decomposition.PCA(n_components=20, svd_solver="full")
    scores = sk.fit_transform(xz)
    assert rel_err(ours.components, torch.from_numpy(sk.components_)) < 1e3 * TOL[torch.float64]
    assert rel_err(ours.scores, torch.from_numpy(scores)) < 1e3 * TOL[torch.float64]
    assert rel_err(ours.singular_values, torch.from_numpy(sk.singular_values_)) < TOL[torch.float64] * 10


@pytest.mark.parametrize("tokens, features", [(61, 23), (23, 61)])
def test_spanning_sketch_is_exact(tokens, features):
    """When ``n_pca + oversample`` columns span every feature (or token) the exact PCA is computed directly."""
    x = decaying(tokens, features, min(tokens, features), decay=0.9, noise=0.01)
    source = blocks_of(x, [7, tokens - 7])
    calls = []
    moments = feature_moments(source)
    n = pca_dimension(1000, features, tokens)
    exact = exact_pca(source, n, moments, dtype=torch.float64)

    def counted():
        calls.append(1)
        return source()

    sketched = randomized_pca(counted, n, moments, oversample=10, power_iterations=2, dtype=torch.float64)
    assert len(calls) == (2 if tokens > features else 1)  # covariance + scores, or the matrix itself
    k = n - 1 if tokens <= features else n  # the last axis of a T <= F problem has singular value ~0
    assert rel_err(sketched.singular_values[:k], exact.singular_values[:k]) < 1e3 * TOL[torch.float64]
    assert rel_err(sketched.components[:k], exact.components[:k]) < 1e-8
    assert rel_err(sketched.scores[:, :k], exact.scores[:, :k]) < 1e-8


@pytest.mark.parametrize("power_iterations", [0, 1, 2])
def test_truncated_sketch_finds_the_top_subspace(power_iterations):
    x = decaying(300, 157, 80, decay=0.8)
    source = blocks_of(x, [100, 77, 123])
    moments = feature_moments(source)
    exact = exact_pca(source, 10, moments, dtype=torch.float64)
    sketched = randomized_pca(source, 20, moments, oversample=10, power_iterations=power_iterations,
                              dtype=torch.float64, seed=int(torch.randint(0, 1000, ()).item()))
    top = sketched.components[:10]
    # projector distance on the top-10 principal subspace, and the leading axes themselves (signs fixed)
    distance = (top.T @ top - exact.components.T @ exact.components).norm() / 10**0.5
    # over 30 seeds the worst distances were 2.8e-3, 1.3e-7, 2.7e-11: the bounds leave a margin of ~10x
    bound = {0: 3e-2, 1: 2e-6, 2: 1e-9}[power_iterations]
    assert distance < bound
    assert rel_err(sketched.components[:5], exact.components[:5]) < bound
    assert rel_err(sketched.scores[:, :5], exact.scores[:, :5]) < bound


def test_float32_sketch_on_blocks_of_another_dtype():
    x = decaying(200, 64, 40).float()
    source = blocks_of(x, [64, 64, 72])
    moments = feature_moments(source)
    exact = exact_pca(source, 8, moments)
    sketched = randomized_pca(source, 30, moments, power_iterations=1)
    assert sketched.scores.dtype == torch.float32
    assert rel_err(sketched.components[:8], exact.components) < 1e-3


@pytest.mark.parametrize("shape", [(37, 90), (90, 37)])
def test_svd_helpers(shape):
    a = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    u, s, vt = thin_svd(a)
    ref = torch.linalg.svdvals(a)
    assert rel_err(s, ref) < 1e3 * TOL[torch.float64]
    assert rel_err((u * s) @ vt, a) < 1e3 * TOL[torch.float64]
    wide = a if shape[0] < shape[1] else a.T
    gu, gs, gvt = gram_svd(wide)
    assert rel_err(gs, ref) < 1e-10
    assert torch.allclose(gvt[:5] @ gvt[:5].T, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert rel_err((gu * gs) @ gvt, wide) < 1e-10
    tall = wide.T
    q = orthonormal_basis(tall)
    assert q.shape == tall.shape
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-10)
    assert rel_err(q @ (q.T @ tall), tall) < 1e-10  # same span


def test_rank_deficient_data():
    """Dependent features: the sketch drops the null directions and pads the PCA with zero axes."""
    base = torch.randn(200, 6, dtype=torch.float64)
    x = torch.cat([base, base @ torch.randn(6, 34, dtype=torch.float64) + 1], dim=1)  # rank 6 over 40 features
    source = blocks_of(x, [100, 100])
    moments = feature_moments(source)
    sketched = randomized_pca(source, 10, moments, oversample=2, dtype=torch.float64)  # 12 < 0.8 * 40 columns
    exact = exact_pca(source, 10, moments, dtype=torch.float64)
    assert sketched.components.shape == (10, 40) and sketched.scores.shape == (200, 10)
    assert (sketched.singular_values[6:] == 0).all() and (sketched.components[6:] == 0).all()
    assert rel_err(sketched.singular_values[:6], exact.singular_values[:6]) < 1e-10
    assert rel_err(sketched.scores[:, :6], exact.scores[:, :6]) < 1e-8


def test_changing_passes_raise():
    x = torch.randn(40, 6)
    calls = {"n": 0}

    def source():
        calls["n"] += 1
        return iter([x] if calls["n"] == 1 else [x[:30]])

    moments = feature_moments(source)
    with pytest.raises(ValueError, match="same data on every pass"):
        randomized_pca(source, 4, moments)
    with pytest.raises(ValueError, match="same data on every pass"):
        exact_pca(source, 4, moments)
    with pytest.raises(ValueError, match="oversample"):
        randomized_pca(lambda: iter([x]), 4, moments, oversample=-1)


def test_memory_model():
    # the stream mode never holds tokens x features: linear in each when the other is fixed
    small = stream_memory_bytes(10_000, 50_000)["peak"]
    assert stream_memory_bytes(20_000, 50_000)["peak"] < 2 * small
    assert stream_memory_bytes(10_000, 100_000)["peak"] < 2 * small
    assert stream_memory_bytes(50_000, 100_000)["peak"] < exact_memory_bytes(50_000, 100_000) / 10
    phases = stream_memory_bytes(5000, 3000, n_pca=100, oversample=10, batch_tokens=100)
    assert phases["peak"] == max(v for k, v in phases.items() if k != "peak")
    # Llama-3-8B's feature space (32 x 4096) over 100 x 512 tokens, in float32, fits in 24 GB
    llama = stream_memory_bytes(100 * 512, 32 * 4096)
    assert llama["peak"] < 24e9
    assert exact_memory_bytes(100 * 512, 32 * 4096) > 24e9
