"""PCA of z-scored activations without holding them: streaming moments and a randomized range finder.

The data is a *source*: a callable that returns a fresh iterator of ``[tokens_b, features]`` blocks each time
it is called (one call = one pass; the template builder's source re-runs the model forward). Every pass must
yield the same rows in the same order (checked by count).

* :func:`feature_moments`: pass 1, per-feature mean and standard deviation, merged block by block in float64
  (Chan et al.'s pairwise update). The std is the population one, ``ddof = 0``, which is what
  FunctionalNetworksSFT's ``np.std(X, axis=0)`` computes; it is floored at ``1e-8`` as there.
* :func:`randomized_pca` (``mode="stream"``): with ``Xs = (X − mean) / std`` and ``l = n_pca + oversample``
  columns, ``Y = Xs·Ω`` (Ω Gaussian from ``seed``), ``Q = orth(Y)``; each power iteration is
  ``Z = orth(Xsᵀ·Q)``, ``Q = orth(Xs·Z)`` (two passes); finally ``B = Qᵀ·Xs`` (one pass) and the SVD of the
  small ``B = Ũ·Σ·Vᵀ`` gives the principal axes ``Vᵀ[:n_pca]`` and the scores ``Q·Ũ·Σ``.
  ``3 + 2·power_iterations`` passes in all; nothing of size ``tokens × features`` is ever formed.
  ``orth`` and the SVD of ``B`` go through float64 Gram matrices of the ``l`` columns
  (:func:`orthonormal_basis`, :func:`gram_svd`): GEMMs and an ``l × l`` eigendecomposition, several times
  faster than Householder QR and LAPACK's SVD of a wide matrix on the CPU. When ``l`` is at least 0.8 of
  ``min(T, F)`` (sklearn's own switch to its full solver) the exact PCA is computed instead, in 1–2 passes.
  Only the leading ``n_components`` axes reach the templates (FastICA whitens onto them), so
  ``max_pca_components`` sets the sketch's accuracy for those, not the result's size.
* :func:`exact_pca` (``mode="exact"``): the standardised matrix materialised and a full thin SVD (small
  problems and tests).

Both apply sklearn's ``svd_flip`` sign rule (``u_based_decision=False``: the largest-magnitude entry of each
principal axis is positive) and return a :class:`PCAResult`. All arithmetic is torch on the blocks' device
(float32 by default; the moments in float64), so it runs on the GPU when the model does.

Memory (:func:`stream_memory_bytes`, ``b`` bytes per element, ``T`` tokens, ``F`` features, ``l`` sketch
columns, ``t`` tokens per block): the largest phase of the stream mode holds about
``3·F·l·b + 4·T·l·b + 2·t·F·b`` (``Z`` and its orthonormalisation, ``Q``/``Y`` likewise, one block and its
standardised copy; float64 only for ``l × l`` Gram matrices and row chunks), i.e. ``O(T·l + l·F)``; exact
mode holds ``T·F`` (the matrix) plus its SVD, about ``3·T·F·b`` (:func:`exact_memory_bytes`). Llama-3-8B's
feature space (32 × 4096) over 100 × 512 tokens with the defaults (``l = 1010``, float32): about 3 GB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .linalg import one_cpu_thread, thin_svd

__all__ = [
    "Source",
    "Moments",
    "PCAResult",
    "feature_moments",
    "exact_pca",
    "randomized_pca",
    "pca_dimension",
    "stream_memory_bytes",
    "exact_memory_bytes",
    "gram_svd",
    "gram64",
    "orthonormal_basis",
]

Source = Callable[[], Iterable[Tensor]]
STD_FLOOR = 1e-8
# A sketch of at least this fraction of min(tokens, features) columns is no cheaper than the exact PCA (the
# threshold sklearn's PCA uses to pick its full solver): randomized_pca computes the exact one instead.
SPANNING = 0.8


@dataclass
class Moments:
    """Per-feature statistics of a source: ``n`` rows, float64 ``mean`` and floored population ``std``."""

    n: int
    mean: Tensor
    std: Tensor


@dataclass
class PCAResult:
    """PCA of the standardised data: ``components`` ``[n_pca, F]`` (orthonormal rows), ``scores`` ``[T, n_pca]``,
    ``singular_values`` ``[n_pca]`` (descending), and the ``moments`` the data was standardised with."""

    components: Tensor
    scores: Tensor
    singular_values: Tensor
    moments: Moments


def pca_dimension(max_pca_components: int, features: int, tokens: int) -> int:
    """FunctionalNetworksSFT's PCA size: ``min(max_pca_components, features, tokens − 1)``."""
    return min(int(max_pca_components), int(features), int(tokens) - 1)


def _blocks(source: Source, what: str, progress: bool, total: Optional[int] = None):
    for block in tqdm(source(), desc=what, unit="batch", total=total, disable=not progress, leave=False):
        if block.ndim != 2:
            raise ValueError(f"activation blocks must be 2-D [tokens, features], got shape {tuple(block.shape)}")
        if block.shape[0]:
            yield block


def feature_moments(source: Source, *, progress: bool = False) -> Moments:
    """Pass 1: per-feature mean and population std (ddof 0, floored at 1e-8), accumulated in float64."""
    n, mean, m2 = 0, None, None
    for block in _blocks(source, "ICA moments", progress):
        x = block.double()
        nb = x.shape[0]
        mb = x.mean(dim=0)
        m2b = ((x - mb) ** 2).sum(dim=0)
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        if x.shape[1] != mean.shape[0]:
            raise ValueError(f"activation blocks have {x.shape[1]} features, earlier ones {mean.shape[0]}")
        delta = mb - mean
        total = n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (n * nb / total)
        n = total
    if mean is None:
        raise ValueError("no activations: every batch was empty (all positions padded?)")
    std = (m2 / n).sqrt().clamp_min(STD_FLOOR)
    return Moments(n, mean, std)


def _standardised(block: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    return (block.to(dtype) - mean) / std


def _svd_flip(scores: Tensor, components: Tensor) -> tuple[Tensor, Tensor]:
    """sklearn's ``svd_flip(u, v, u_based_decision=False)``: each axis' largest-magnitude entry positive."""
    pick = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0], device=components.device), pick])
    signs[signs == 0] = 1
    return scores * signs, components * signs[:, None]


def exact_pca(source: Source, n_pca: int, moments: Moments, *, dtype=torch.float32,
              progress: bool = False) -> PCAResult:
    """PCA by a full thin SVD of the materialised standardised matrix (``T × F``: small problems only)."""
    mean, std = moments.mean.to(dtype), moments.std.to(dtype)
    x = torch.cat([_standardised(b, mean, std, dtype) for b in _blocks(source, "ICA activations", progress)])
    _check_rows(x.shape[0], moments.n)
    u, s, vt = thin_svd(x)
    del x
    scores, components = _svd_flip(u[:, :n_pca] * s[:n_pca], vt[:n_pca])
    return PCAResult(components, scores, s[:n_pca], moments)


GRAM_CHUNK = 8192  # rows of ``a`` converted to float64 at a time by :func:`gram64`


def gram64(a: Tensor) -> Tensor:
    """``aᵀ·a`` (``[n, n]``) accumulated in float64 over row chunks of ``a`` (no float64 copy of ``a``)."""
    out = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], GRAM_CHUNK):
        chunk = a[start:start + GRAM_CHUNK].double()
        out.addmm_(chunk.T, chunk)
    return out


def _eigh_desc(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric matrix (one CPU thread)."""
    with one_cpu_thread(gram):
        values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def _kept(values: Tensor, dtype: torch.dtype) -> int:
    """How many eigenvalues of a float64 Gram matrix of ``dtype`` data stand above the rounding floor.

    Relative to the largest: ``(n·eps)²`` for the data's own rounding (``eps`` of ``dtype``) and ``n·eps64``
    for the Gram product's.
    """
    n = values.numel()
    floor = values[0] * max((n * torch.finfo(dtype).eps) ** 2, n * torch.finfo(torch.float64).eps)
    return int((values > floor).sum().item()) if values[0] > 0 else 0


def orthonormal_basis(a: Tensor) -> Tensor:
    """Orthonormal columns spanning ``a`` (``[m, n]``, ``m ≥ n``), from its float64 Gram matrix ``aᵀa``.

    ``Q = a·V·Λ^{-1/2}`` with ``aᵀa = V·Λ·Vᵀ``: Gram products and an ``n × n`` eigendecomposition instead of a
    Householder QR (several times faster on the CPU for the ``features × l`` matrices of the power iterations).
    The product with ``a`` is taken in ``a``'s dtype; for float32 a second round on ``Q`` restores the
    orthonormality of the weak columns (CholeskyQR2's idea), so nothing of ``a``'s size is ever float64.
    Directions below the dtype's rounding floor are dropped: a rank-deficient ``a`` gives fewer columns.
    """
    values, vectors = _eigh_desc(gram64(a))
    r = max(_kept(values, a.dtype), 1)
    q = a @ (vectors[:, :r] / values[:r].sqrt().clamp_min(1e-300)).to(a.dtype)
    if a.dtype != torch.float64:
        values, vectors = _eigh_desc(gram64(q))
        q = q @ (vectors / values.sqrt().clamp_min(1e-300)).to(a.dtype)
    return q


def gram_svd(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``b = u·diag(s)·vt`` of a wide ``b`` (``[l, F]``, ``l ≤ F``) from the float64 Gram ``b·bᵀ``.

    ``s`` descending; ``vt = uᵀ·b / s`` in ``b``'s dtype; rows whose singular value is below the rounding
    floor are zero (their direction is not determined by ``b``). Accurate for the leading singular vectors,
    which are what the templates use; the small ones lose precision to the squared condition number.
    """
    values, u = _eigh_desc(gram64(b.T))
    r = _kept(values, b.dtype)
    s = values.sqrt().to(b.dtype)
    s[r:] = 0
    vt = u.T.to(b.dtype) @ b
    vt[:r] /= s[:r, None]
    vt[r:] = 0
    return u.to(b.dtype), s, vt


def _check_rows(rows: int, expected: int) -> None:
    if rows != expected:
        raise ValueError(f"a pass over the activations gave {rows} token rows, the first pass {expected}: "
                         "batches must yield the same data on every pass")


def randomized_pca(source: Source, n_pca: int, moments: Moments, *, oversample: int = 10,
                   power_iterations: int = 1, seed: int = 0, dtype=torch.float32,
                   progress: bool = False) -> PCAResult:
    """PCA by a randomized range finder over ``3 + 2·power_iterations`` passes (see the module docstring).

    When the sketch (``l = n_pca + oversample`` columns) would have at least ``SPANNING`` (0.8) of
    ``min(tokens, features)`` columns, the exact PCA is computed instead, in fewer passes
    (:func:`_spanning_pca`).

    Orthonormalisation (:func:`orthonormal_basis`) and the SVD of ``B`` (:func:`gram_svd`) go through float64
    Gram matrices of the ``l`` sketch columns. If the data's rank is below ``n_pca`` the trailing axes,
    scores and singular values are zero.
    """
    if oversample < 0 or power_iterations < 0:
        raise ValueError(f"oversample and power_iterations must be >= 0, got {oversample}, {power_iterations}")
    tokens, features = moments.n, moments.mean.shape[0]
    device = moments.mean.device
    width = min(n_pca + oversample, tokens, features)
    mean, std = moments.mean.to(dtype), moments.std.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(features, width, generator=generator, dtype=dtype).to(device)

    def times(right: Tensor) -> Tensor:  # Xs @ right, [tokens, width]
        out = torch.empty(tokens, right.shape[1], dtype=dtype, device=device)
        row = 0
        for b in _blocks(source, "ICA sketch", progress):
            if row + b.shape[0] > tokens:
                _check_rows(row + b.shape[0], tokens)
            torch.matmul(_standardised(b, mean, std, dtype), right, out=out[row:row + b.shape[0]])
            row += b.shape[0]
        _check_rows(row, tokens)
        return out

    def transposed_times(q: Tensor) -> Tensor:  # Xsᵀ @ q, [features, width]
        acc = torch.zeros(features, q.shape[1], dtype=dtype, device=device)
        row = 0
        for b in _blocks(source, "ICA projection", progress):
            acc.addmm_(_standardised(b, mean, std, dtype).T, q[row:row + b.shape[0]])
            row += b.shape[0]
        _check_rows(row, tokens)
        return acc

    if width >= SPANNING * min(tokens, features):
        del omega
        return _spanning_pca(source, n_pca, moments, dtype, progress, times)
    q = orthonormal_basis(times(omega))
    del omega
    for _ in range(power_iterations):
        z = orthonormal_basis(transposed_times(q))
        q = orthonormal_basis(times(z))
        del z
    u, s, vt = gram_svd(transposed_times(q).T)  # B = Qᵀ·Xs, [width, features]
    n = min(n_pca, s.numel())
    scores = q @ (u[:, :n] * s[:n])
    scores, components = _svd_flip(scores, vt[:n])
    if n < n_pca:  # the sketch lost rank: pad with zero axes
        pad = n_pca - n
        scores = torch.cat([scores, scores.new_zeros(tokens, pad)], dim=1)
        components = torch.cat([components, components.new_zeros(pad, features)])
        s = torch.cat([s[:n], s.new_zeros(pad)])
    return PCAResult(components, scores, s[:n_pca], moments)


def _spanning_pca(source: Source, n_pca: int, moments: Moments, dtype, progress: bool, times) -> PCAResult:
    """The sketch would (nearly) span every token or every feature: the exact PCA in one or two passes instead.

    ``tokens ≤ features``: ``Xs`` itself (``T × F``, at most 1.25× the sketch's ``B``) and its Gram SVD.
    ``features < tokens``: the float64 covariance ``Xsᵀ·Xs`` (``F × F``) in one pass, its eigenvectors as the
    axes, and the scores ``Xs·V`` in a second (sklearn's ``covariance_eigh`` solver).
    """
    tokens, features = moments.n, moments.mean.shape[0]
    mean, std = moments.mean.to(dtype), moments.std.to(dtype)
    if tokens <= features:
        x = torch.empty(tokens, features, dtype=dtype, device=mean.device)
        row = 0
        for b in _blocks(source, "ICA activations", progress):
            if row + b.shape[0] > tokens:
                _check_rows(row + b.shape[0], tokens)
            x[row:row + b.shape[0]] = _standardised(b, mean, std, dtype)
            row += b.shape[0]
        _check_rows(row, tokens)
        u, s, vt = gram_svd(x)
        del x
        n = min(n_pca, s.numel())
        scores, components = _svd_flip(u[:, :n] * s[:n], vt[:n])
        return PCAResult(components, scores, s[:n], moments)
    cov = torch.zeros(features, features, dtype=torch.float64, device=mean.device)
    rows = 0
    for b in _blocks(source, "ICA covariance", progress):
        x = _standardised(b, mean, std, dtype).double()
        cov.addmm_(x.T, x)
        rows += x.shape[0]
    _check_rows(rows, tokens)
    with one_cpu_thread(cov):
        values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    r = min(n_pca, _kept(values, dtype))
    axes = torch.zeros(features, n_pca, dtype=dtype, device=mean.device)
    axes[:, :r] = vectors[:, :r].to(dtype)
    s = torch.zeros(n_pca, dtype=dtype, device=mean.device)
    s[:r] = values[:r].sqrt().to(dtype)
    scores, components = _svd_flip(times(axes), axes.T)
    return PCAResult(components, scores, s, moments)


def stream_memory_bytes(tokens: int, features: int, *, n_pca: int = 1000, oversample: int = 10,
                        power_iterations: int = 1, batch_tokens: int = 512, n_components: int = 10,
                        dtype_bytes: int = 4) -> dict[str, int]:
    """Peak bytes of each stream-mode phase (model and its forward not included) and their maximum ``"peak"``.

    ``T = tokens``, ``F = features``, ``l = min(n_pca + oversample, T, F)``, ``t = batch_tokens``, ``b`` bytes
    per element of the compute dtype, ``n = min(n_pca, T − 1, F)``, ``k = n_components``:

    * ``moments``: one block, its float64 copy and squared deviations: ``t·F·(b + 16)``;
    * ``sketch`` (``Y = Xs·Ω`` and its orthonormalisation, two rounds): ``F·l·b + 3·T·l·b + 2·t·F·b``;
    * ``power`` (``Z = orth(Xsᵀ·Q)``, ``Q = orth(Xs·Z)``; only with power iterations):
      ``3·F·l·b + 4·T·l·b + 2·t·F·b``;
    * ``svd`` (``B = Qᵀ·Xs`` and ``Vᵀ = Ũᵀ·B / Σ``, the scores): ``2·F·l·b + T·l·b + T·n·b``;
    * ``ica`` (FastICA on the ``T × n`` scores and the maps): ``2·T·n·b + F·k·b``;

    each plus the moments (float64 and compute-dtype copies, ``F·(16 + 2b)``) and the float64 Gram chunks
    (``GRAM_CHUNK·l·8``). When ``l`` spans every token or feature the exact path holds no more than this.
    """
    t_, f_, b_ = int(tokens), int(features), int(dtype_bytes)
    n = pca_dimension(n_pca, f_, t_)
    width = min(n + oversample, t_, f_)
    block = min(int(batch_tokens), t_)
    phases = {
        "moments": block * f_ * (b_ + 16),
        "sketch": f_ * width * b_ + 3 * t_ * width * b_ + 2 * block * f_ * b_,
        "power": (3 * f_ * width * b_ + 4 * t_ * width * b_ + 2 * block * f_ * b_) if power_iterations else 0,
        "svd": 2 * f_ * width * b_ + t_ * width * b_ + t_ * n * b_,
        "ica": 2 * t_ * n * b_ + f_ * n_components * b_,
    }
    fixed = f_ * (16 + 2 * b_) + min(GRAM_CHUNK, max(t_, f_)) * width * 8
    phases = {k: v + fixed for k, v in phases.items()}
    phases["peak"] = max(phases.values())
    return phases


def exact_memory_bytes(tokens: int, features: int, *, dtype_bytes: int = 4) -> int:
    """Peak bytes of exact mode: the standardised ``T × F`` matrix and its thin SVD (``U``, ``Vᵀ``, workspace)."""
    r = min(int(tokens), int(features))
    return int(dtype_bytes) * (2 * tokens * features + tokens * r + r * features)

