"""FastICA in PyTorch: scikit-learn's ``FastICA`` (parallel algorithm), so it runs where the data lives (GPU).

Same algorithm, defaults and conventions as ``sklearn.decomposition.FastICA`` (``_fastica.py``, sklearn ≥ 1.3):

* centring, then whitening by the SVD of the centred data (``whiten_solver="svd"``; ``"eigh"`` uses the
  covariance's eigendecomposition), with sklearn's sign convention ``u *= sign(u[0])`` (the first row of the
  left singular vectors is non-negative), ``K = (u / d)ᵀ[:k]`` and ``X1 = K·Xᵀ·√n``;
* the parallel fixed-point iteration ``W ← sym_decorrelate(E[g(WX)Xᵀ] − E[g'(WX)]·W)`` from
  ``sym_decorrelate(w_init)``, where ``sym_decorrelate(W) = (W Wᵀ)^{-1/2} W`` (eigenvalues clipped at the
  dtype's ``tiny``), stopping when ``max_i | |⟨w_i_new, w_i⟩| − 1 | < tol`` or after ``max_iter`` iterations;
* ``g``: ``logcosh`` (``tanh(αx)``, ``α(1 − tanh²)``, ``α ∈ [1, 2]``, default 1), ``exp`` or ``cube``;
* ``whiten="unit-variance"`` (the default) rescales the sources to unit variance (``np.std``, ddof 0) and
  the unmixing rows with them; ``"arbitrary-variance"`` does not; ``False`` takes the data as already white;
* ``components = W·K``, ``mixing = pinv(components)``, ``sources = components·(X − mean)ᵀ`` transposed.

The random initial unmixing matrix, when ``w_init`` is not given, is
``numpy.random.RandomState(seed).normal(size=(k, k))``: the very draw sklearn makes for ``random_state=seed``
(an int), so the same seed gives sklearn's initialisation too (a tiny ``k × k`` draw, made on the CPU).
``seed=None`` draws from fresh OS entropy, like sklearn's ``random_state=None``.

Not converging within ``max_iter`` emits :class:`ConvergenceWarning` (sklearn's message) and is recorded in
:attr:`FastICAResult.converged`. Deviations from sklearn: only the parallel algorithm (no ``"deflation"``);
``n_components`` larger than ``min(samples, features)`` raises instead of being reduced with a warning; a
zero entry in ``u[0]`` keeps its column's sign (sklearn's ``np.sign`` would zero the column).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .linalg import one_cpu_thread, thin_svd

__all__ = ["ConvergenceWarning", "FastICAResult", "fastica", "sym_decorrelation", "initial_unmixing"]

FUNCTIONS = ("logcosh", "exp", "cube")
WHITEN = ("unit-variance", "arbitrary-variance", False)


class ConvergenceWarning(UserWarning):
    """FastICA stopped at ``max_iter`` before reaching ``tol`` (sklearn's ``ConvergenceWarning`` counterpart)."""


@dataclass
class FastICAResult:
    """What sklearn's fitted ``FastICA`` holds, as tensors (``k`` components, ``f`` features, ``n`` samples).

    ``components``: ``[k, f]``, the unmixing of centred data (sklearn's ``components_``); ``mixing``: ``[f, k]``,
    its pseudo-inverse (``mixing_``); ``sources``: ``[n, k]`` (``fit_transform``'s result); ``mean``: ``[f]``
    (``mean_``, None without whitening); ``whitening``: ``[k, f]`` (``whitening_``, None without whitening);
    ``unmixing``: ``[k, k]``, ``W`` after the unit-variance rescaling (sklearn's ``_unmixing``); ``n_iter``:
    iterations run (``n_iter_``); ``converged``: whether ``tol`` was reached.
    """

    components: Tensor
    mixing: Tensor
    sources: Tensor
    mean: Optional[Tensor]
    whitening: Optional[Tensor]
    unmixing: Tensor
    n_iter: int
    converged: bool


def sym_decorrelation(w: Tensor) -> Tensor:
    """``(W Wᵀ)^{-1/2} W``: the rows of ``W`` made orthonormal, symmetrically (sklearn's ``_sym_decorrelation``)."""
    s, u = torch.linalg.eigh(w @ w.T)
    s = s.clamp_min(torch.finfo(w.dtype).tiny)  # rounding can make an eigenvalue slightly negative
    return (u * s.rsqrt()) @ u.T @ w


def initial_unmixing(k: int, seed: Optional[int]) -> np.ndarray:
    """sklearn's random ``w_init`` for ``random_state=seed``: ``RandomState(seed).normal(size=(k, k))``."""
    return np.random.RandomState(seed).normal(size=(k, k))


def _g(fun: str, x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(g(x), mean over samples of g'(x))`` for the contrast function ``fun``; ``x`` is ``[k, n]``."""
    if fun == "logcosh":
        gx = torch.tanh(x * alpha)
        return gx, (alpha * (1 - gx * gx)).mean(dim=1)
    if fun == "exp":
        e = torch.exp(-(x * x) / 2)
        return x * e, ((1 - x * x) * e).mean(dim=1)
    return x**3, (3 * x * x).mean(dim=1)


def _ica_par(x1: Tensor, w_init: Tensor, fun: str, alpha: float, tol: float, max_iter: int):
    """Parallel FastICA on white data ``x1`` (``[k, n]``): ``(W, n_iter, converged)`` (sklearn's ``_ica_par``)."""
    w = sym_decorrelation(w_init)
    n = float(x1.shape[1])
    for it in range(max_iter):
        gwtx, g_wtx = _g(fun, w @ x1, alpha)
        w1 = sym_decorrelation(gwtx @ x1.T / n - g_wtx[:, None] * w)
        lim = ((w1 * w).sum(dim=1).abs() - 1).abs().max().item()
        w = w1
        if lim < tol:
            return w, it + 1, True
    warnings.warn(
        "FastICA did not converge. Consider increasing tolerance or the maximum number of iterations.",
        ConvergenceWarning,
        stacklevel=3,
    )
    return w, max_iter, False


def _whitening(xt: Tensor, k: int, solver: str) -> Tensor:
    """sklearn's ``K`` (``[k, f]``) for centred ``xt`` (``[f, n]``): ``(u / d)ᵀ[:k]`` with ``u[0] ≥ 0``."""
    if solver == "svd":
        u, d, _ = thin_svd(xt)
    else:
        cov = xt @ xt.T
        with one_cpu_thread(cov):
            d, u = torch.linalg.eigh(cov)
        order = torch.argsort(d, descending=True)
        eps = torch.finfo(d.dtype).eps * 10  # sklearn >= 1.4
        if bool((d < eps).any()):
            warnings.warn("There are some small singular values, using whiten_solver = 'svd' might lead to more "
                          "accurate results.", stacklevel=3)
        d = d.clamp_min(eps).sqrt()[order]
        u = u[:, order]
    sign = torch.sign(u[0])
    sign[sign == 0] = 1
    u = u * sign
    return (u / d).T[:k]


def fastica(
    x: Union[Tensor, np.ndarray],
    n_components: Optional[int] = None,
    *,
    fun: str = "logcosh",
    alpha: float = 1.0,
    whiten: Union[str, bool] = "unit-variance",
    whiten_solver: str = "svd",
    max_iter: int = 200,
    tol: float = 1e-4,
    w_init: Union[Tensor, np.ndarray, None] = None,
    seed: Optional[int] = None,
    algorithm: str = "parallel",
    whitening: Union[Tensor, None] = None,
) -> FastICAResult:
    """Fit FastICA to ``x`` (``[samples, features]``, float32 or float64, any device) like sklearn's ``FastICA``.

    ``n_components`` defaults to ``min(samples, features)``; ``w_init`` (``[k, k]``) replaces the random
    initialisation drawn from ``seed`` (see the module docstring). ``whitening`` (``[k, features]``, ours)
    replaces the whitening matrix sklearn computes from the centred data, for data whose principal axes are
    known: for PCA scores with singular values ``s`` it is ``diag(±1 / s)[:k]``, which is what the SVD would
    return up to rounding, but with signs chosen by the caller rather than by rounding noise (the first row
    of a near-identity ``u``). Bad arguments raise ``ValueError``.
    """
    if algorithm != "parallel":
        raise ValueError(f"algorithm {algorithm!r} is not supported: only 'parallel' (sklearn's default)")
    if fun not in FUNCTIONS:
        raise ValueError(f"fun {fun!r} is not one of {', '.join(FUNCTIONS)}")
    if not 1 <= alpha <= 2:
        raise ValueError(f"alpha must be in [1, 2], got {alpha}")
    if whiten not in WHITEN or whiten is True:
        raise ValueError(f"whiten must be 'unit-variance', 'arbitrary-variance' or False, got {whiten!r}")
    if whiten_solver not in ("svd", "eigh"):
        raise ValueError(f"whiten_solver must be 'svd' or 'eigh', got {whiten_solver!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be a 2-D float32 or float64 array [samples, features], got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    n, f = x.shape
    if n < 2:
        raise ValueError(f"FastICA needs at least 2 samples, got {n}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or infinite values")
    if not whiten:
        k = f  # sklearn ignores n_components without whitening: W is [features, features]
    else:
        k = min(n, f) if n_components is None else int(n_components)
    if whiten and not 1 <= k <= min(n, f):
        raise ValueError(f"n_components must be in [1, min(samples, features) = {min(n, f)}], got {n_components}")

    xt = x.T
    if whiten:
        mean = xt.mean(dim=1)
        xt = xt - mean[:, None]
        if whitening is None:
            whitening = _whitening(xt, k, whiten_solver)
        else:
            whitening = torch.as_tensor(whitening).to(device=x.device, dtype=x.dtype)
            if tuple(whitening.shape) != (k, f):
                raise ValueError(f"whitening has shape {tuple(whitening.shape)}, expected ({k}, {f})")
        x1 = whitening @ xt * math.sqrt(n)
    else:
        mean = whitening = None
        x1 = xt

    if w_init is None:
        w_init = initial_unmixing(k, seed)
    w_init = torch.as_tensor(w_init).to(device=x.device, dtype=x.dtype)
    if tuple(w_init.shape) != (k, k):
        raise ValueError(f"w_init has shape {tuple(w_init.shape)}, expected ({k}, {k})")
    w, n_iter, converged = _ica_par(x1, w_init, fun, alpha, tol, max_iter)
    del x1

    unmixing_of_data = w @ whitening if whiten else w
    sources = (unmixing_of_data @ xt).T
    if whiten == "unit-variance":
        s_std = sources.std(dim=0, correction=0, keepdim=True)
        sources = sources / s_std
        w = w / s_std.T
        unmixing_of_data = w @ whitening
    components = unmixing_of_data
    mixing = torch.linalg.pinv(components)
    return FastICAResult(components, mixing, sources, mean, whitening, w, n_iter, converged)
