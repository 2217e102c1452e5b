"""The K-FAC curvature edit (Merullo et al. 2025): keep the weight's components in high-curvature directions.

For a projection ``W`` ``[d_out, d_in]`` the K-FAC Fisher block is ``G ⊗ A`` (:mod:`.factors`). With
``G = U_G diag(λ) U_Gᵀ`` and ``A = U_A diag(μ) U_Aᵀ`` (both descending), its eigenvalues are the products
``λ_i μ_j`` with eigenvectors ``u_i ⊗ v_j``, and ``W``'s coefficients in that basis are ``C = U_Gᵀ W U_A``.
``method="product"`` (the paper's) ranks all pairs ``(i, j)`` by ``λ_i μ_j`` and keeps the smallest top set
``S`` whose mass reaches ``ρ·Σλ·Σμ = ρ·tr(G ⊗ A)``: ``W' = U_G (C ⊙ M_S) U_Aᵀ = Σ_{(i,j)∈S} C_ij u_i v_jᵀ``.
Both spectra are sorted and non-negative, so ``S`` is a staircase: row ``i`` of ``C`` keeps its first ``k_i``
columns, ``k_i`` non-increasing (:func:`select_pairs` returns ``k``). ``method="per_factor"`` (the original's
baseline ``apply_kfac``) truncates each factor at its own ρ: ``W' = U_G,r U_G,rᵀ W U_A,r U_A,rᵀ``.
``complement=True`` returns ``W − W'`` (the fork's ``ablate_kfac_by_product``: remove the top-curvature pairs).
Memorisation sits in the low-curvature mass, so the paper keeps ρ = 0.6 of gate and up in layers 23-25.

Where we differ from the original (``loki_kernels.reference.kfac_original``):

* the factor is symmetrised, ``(F + Fᵀ)/2``, decomposed with ``eigh`` in float64 (the original: fp32, as
  stored), and negative eigenvalues are clamped to 0 (the original keeps them, and two negatives then make
  a positive product);
* the pair selection is vectorised (:func:`select_pairs`); on the clamped spectra it returns exactly the set
  the original's heap loop returns, ties included (tests/kfac/test_edit.py checks this against the loop);
* ρ = 1 keeps every pair (``W' = W``); the heap loop at ρ = 1 stops as soon as its running float sum
  reaches ``Σλ·Σμ``, which rounding can make it do before the last (tiny or zero) products;
* per_factor at ρ = 0, or on an all-zero spectrum, keeps rank 0 (the smallest k whose mass reaches
  ``ρ·total``); the original keeps rank 1 at ρ = 0 (``cumsum/total >= 0`` holds at index 0) and the full
  rank on an all-zero spectrum (``0/0`` is NaN, so no index qualifies);
* :func:`apply_edit` checks the whole plan before it changes a weight, returns an :class:`Edit` whose
  :meth:`~Edit.restore` puts the original weights back bit-exactly, decomposes a factor once per call (gate
  and up share ``A``), and caches edited weights by content hash (the original keys its cache files by model
  name, layer, projection, ρ and dtype, not by the factors).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..arch import find_mlps, row_view
from ..files import atomic_write
from .factors import MODULES, Factors

__all__ = [
    "SKIP_RHO",
    "METHODS",
    "Eigen",
    "eigen",
    "select_pairs",
    "pair_mask",
    "factor_rank",
    "edit",
    "Edit",
    "apply_edit",
]

SKIP_RHO = 0.9999  # plan entries at or above this ρ leave their projection untouched, like the original
METHODS = ("product", "per_factor")
_CACHE_VERSION = b"loki-kernels kfac edit v1"


class Eigen(NamedTuple):
    """A factor's eigendecomposition: ``values`` descending and ≥ 0, ``vectors[:, i]`` goes with ``values[i]``."""

    values: Tensor
    vectors: Tensor


def eigen(F: Tensor, *, dtype: torch.dtype = torch.float64) -> Eigen:
    """Decompose a K-FAC factor: symmetrise ``(F + Fᵀ)/2``, ``eigh`` in ``dtype``, clamp negatives to 0, descending.

    ``eigh`` returns ascending eigenvalues; clamping keeps that order, so flipping sorts them descending
    (eigenvectors of a repeated eigenvalue are any basis of its eigenspace, as in the original).
    """
    if F.dim() != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"a K-FAC factor must be a square matrix, got shape {tuple(F.shape)}")
    F = F.detach().to(dtype)
    if not bool(torch.isfinite(F).all()):
        raise ValueError(f"K-FAC factor of shape {tuple(F.shape)} has non-finite entries")
    values, vectors = torch.linalg.eigh((F + F.T) / 2)
    values = values.clamp_(min=0).add_(0.0)  # + 0.0 turns a clamped -0.0 into +0.0
    return Eigen(values.flip(0), vectors.flip(1))


# ------------------------------------------------------------------------------------------ pair selection
def _check_rho(rho: Any) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    return float(rho)


def _spectrum(values: Tensor, name: str) -> Tensor:
    if not isinstance(values, Tensor) or values.dim() != 1:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a 1-D tensor of eigenvalues, got {shape}")
    v = values.detach()
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} has non-finite eigenvalues")
    if v.numel() and not bool((v >= 0).all()):
        raise ValueError(f"{name} has negative eigenvalues (min {v.min().item():.3g}); clamp them to 0 first")
    if v.numel() > 1 and not bool((v[:-1] >= v[1:]).all()):
        raise ValueError(f"{name} must be sorted in descending order")
    return v


def _row_counts(lam: np.ndarray, mu: np.ndarray, tau: float, strict: bool) -> np.ndarray:
    """Per row ``i``: ``#{j : λ_i·μ_j ≥ τ}`` (``> τ`` when ``strict``), from the products themselves.

    A binary search per row, all rows at once: row ``i``'s products fall with ``j``, so the predicate holds
    exactly on a prefix. The products are formed in the spectra's dtype, as the heap loop forms them.
    """
    m, n = len(lam), len(mu)
    lo = np.zeros(m, dtype=np.int64)
    hi = np.full(m, n, dtype=np.int64)
    for _ in range(n.bit_length()):
        mid = (lo + hi) // 2
        p = (lam * mu[np.minimum(mid, n - 1)]).astype(np.float64)
        active = lo < hi
        ok = ((p > tau) if strict else (p >= tau)) & active
        lo = np.where(ok, mid + 1, lo)
        hi = np.where(active & ~ok, mid, hi)
    return lo


def _staircase_products(lam: np.ndarray, mu: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The products ``λ_i·μ_j`` for ``j < k[i]`` as float64, each row's run ascending (``j`` from ``k[i] − 1``
    down), so a stable sort (timsort) finds the rows as ready runs. Short rows are gathered in one go, long
    ones sliced row by row (faster when the runs are long)."""
    rows = np.flatnonzero(k)
    total = int(k.sum())
    if total == 0:
        return np.zeros(0)
    if total < 64 * len(rows):
        i = np.repeat(rows, k[rows])
        start = np.cumsum(k[rows]) - k[rows]
        j = (k[i] - 1) - (np.arange(total) - np.repeat(start, k[rows]))
        return (lam[i] * mu[j]).astype(np.float64)
    return np.concatenate([lam[r] * mu[k[r] - 1::-1] for r in rows]).astype(np.float64)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def _threshold(lam: np.ndarray, mu: np.ndarray, goal: float) -> float:
    """About the largest ``τ`` whose staircase ``{λ_i μ_j ≥ τ}`` holds mass ≥ ``goal`` (0 if none does).

    Bisection over the bit patterns of non-negative doubles (their integer order is their order), with the
    mass ``Σ_i λ_i·(μ_1 + … + μ_{k_i})`` and ``k_i = #{j : μ_j ≥ τ/λ_i}``. Only a guess: the caller checks it.
    """
    lam64, mu64 = lam.astype(np.float64), mu.astype(np.float64)
    mu_asc = mu64[::-1].copy()
    prefix = np.concatenate([[0.0], np.cumsum(mu64)])
    with np.errstate(divide="ignore"):
        inverse = 1.0 / lam64  # inf where λ = 0: no column of that row reaches a τ > 0
    n = len(mu64)

    def mass(bits: int) -> tuple[float, int]:  # (mass, pairs) of the staircase at τ > 0
        k = n - np.searchsorted(mu_asc, _bits_float(bits) * inverse, side="left")
        return float(lam64 @ prefix[k]), int(k.sum())

    if float(lam64.sum() * prefix[n]) < goal:  # even τ = 0 (every pair) is short
        return 0.0
    lo, hi = 0, _float_bits(float(lam64[0] * mu64[0]))
    mass_hi, pairs_hi = mass(hi)
    if mass_hi >= goal:
        return _bits_float(hi)
    pairs_lo = len(lam64) * n
    # Invariant: mass(lo) >= goal > mass(hi). Stop once the band between them holds few pairs, or at a
    # relative width of ~2e-10.
    while hi - lo > 1 << 20 and pairs_lo - pairs_hi > max(32, pairs_hi >> 10):
        mid = (lo + hi) // 2
        mass_mid, pairs_mid = mass(mid)
        if mass_mid >= goal:
            lo, pairs_lo = mid, pairs_mid
        else:
            hi, pairs_hi = mid, pairs_mid
    return _bits_float(lo)


def select_pairs(lam: Tensor, mu: Tensor, rho: float) -> Tensor:
    """How many leading columns each row keeps: ``k[i]`` for ``i < len(lam)`` (int64, non-increasing).

    The kept set is the smallest set of pairs, taken by descending ``λ_i·μ_j``, whose mass reaches
    ``ρ·Σλ·Σμ``; ``lam`` and ``mu`` must be 1-D, descending and non-negative (``G``'s and ``A``'s spectra).

    It is exactly the set the original heap loop returns (:func:`~loki_kernels.reference.kfac_original.
    top_pairs_by_product`) on the same tensors. The loop pops pairs in the order of its heap key
    ``(−λ_i·μ_j, i, j)``: descending product, and **equal products in ``(i, j)`` order** (smaller ``G``
    index first, then smaller ``A`` index). On sorted non-negative spectra a pair's neighbours above and to
    the left have smaller keys, so the frontier heap pops the pairs in this global order; it adds each
    product as a Python float (a sequential float64 sum) and stops after the first ``K`` pops whose sum
    reaches ``ρ·(Σλ)(Σμ)`` (computed, like the loop, as ``(lam.sum() * mu.sum()).item()``), or when the
    pairs run out. Here:

    1. bisection on a threshold ``τ`` finds a staircase ``{λ_i μ_j ≥ τ}`` holding a little more than the
       target mass (exact per-row counts by binary search on the products, formed in the spectra's dtype);
    2. its products, sorted descending and summed sequentially in float64 (``numpy.cumsum``, the loop's sum
       term by term), give ``K``; every pair outside has a smaller product, so the loop's first ``K`` pops
       are inside (if the sum falls short, ``τ`` is lowered and the step repeated);
    3. the set is every pair with product above ``p = `` the ``K``-th product, plus the first pairs with
       product equal to ``p`` in ``(i, j)`` order: whole rows of ties first, then part of one row, which
       keeps the staircase.

    ``ρ = 0``, or an all-zero spectrum, keeps nothing (the loop's ``0.0 < 0.0`` is false before the first
    pop); ``ρ = 1`` keeps whatever the loop keeps (see :func:`edit`, which keeps everything at ρ = 1). The
    work is on the CPU and grows with the kept set: a few ms at ρ = 0.6 on 4096 × 11008 power-law spectra,
    ~0.1-0.2 s for a million pairs; a ρ within ~1e-6 of 1 sorts all products (seconds, ~1 GB at that size).
    The result is on the CPU.
    """
    rho = _check_rho(rho)
    lam, mu = _spectrum(lam, "lam"), _spectrum(mu, "mu")
    m, n = lam.numel(), mu.numel()
    if m == 0 or n == 0:
        return torch.zeros(m, dtype=torch.int64)
    total = (lam.sum() * mu.sum()).item()  # exactly as the heap loop computes it
    if not math.isfinite(total):
        raise ValueError(f"the spectra's total mass Σλ·Σμ overflows ({total})")
    target = rho * total
    if not target > 0:
        return torch.zeros(m, dtype=torch.int64)

    dtype = torch.promote_types(lam.dtype, mu.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    elif dtype == torch.bfloat16:  # numpy has no bfloat16; the loop's bf16 products would round further
        dtype = torch.float32
    lam_np = lam.to(device="cpu", dtype=dtype).numpy()
    mu_np = mu.to(device="cpu", dtype=dtype).numpy()

    # 1-2: a staircase holding the first K pops, found from a guess of tau, lowered until its sum suffices.
    tau = _threshold(lam_np, mu_np, target * (1.0 + 1e-6))
    for attempt in itertools.count():
        k = _row_counts(lam_np, mu_np, tau, strict=False)
        values = np.sort(_staircase_products(lam_np, mu_np, k), kind="stable")[::-1]
        sums = np.cumsum(values)  # sequential: the loop's cum_mass after each pop
        K = int(np.searchsorted(sums, target, side="left")) + 1  # first pop count whose sum reaches target
        if K <= len(values):
            break
        if tau == 0.0:  # every pair popped and the target not reached: the loop keeps everything
            return torch.full((m,), n, dtype=torch.int64)
        tau = tau / 2.0 if attempt < 4 else 0.0  # the guess was short by rounding: take more pairs
    del sums

    # 3: all pairs above the K-th product, then its ties in (i, j) order.
    p = float(values[K - 1])
    above = _row_counts(lam_np, mu_np, p, strict=True)
    ties = _row_counts(lam_np, mu_np, p, strict=False) - above
    before = np.cumsum(ties) - ties
    take = np.clip(K - int(above.sum()) - before, 0, ties)
    return torch.from_numpy(above + take)


def pair_mask(k: Tensor, n: int) -> Tensor:
    """The boolean ``[len(k), n]`` mask of a staircase: row ``i`` is true on its first ``k[i]`` columns."""
    k = torch.as_tensor(k)
    return torch.arange(n, device=k.device)[None, :] < k[:, None]


def factor_rank(values: Tensor, rho: float) -> int:
    """Per-factor truncation rank: the smallest ``r`` with ``Σ_{i<r} values[i] ≥ ρ·Σ values``.

    For 0 < ρ < 1 and a positive total it tests ``cumsum / total >= ρ`` like the original
    (``_compute_rank_for_variance``) and falls back to the full rank when rounding keeps every ratio
    below ρ; ρ = 1 keeps all. Unlike the original, ρ = 0 or an all-zero spectrum gives 0 (see the module
    docstring).
    """
    rho = _check_rho(rho)
    values = _spectrum(values, "values")
    n = values.numel()
    if rho >= 1.0:
        return n
    total = values.sum()
    if rho <= 0.0 or not total.item() > 0:
        return 0
    hits = torch.nonzero(torch.cumsum(values, 0) / total >= rho)
    return int(hits[0].item()) + 1 if hits.numel() else n


# ----------------------------------------------------------------------------------------------- the edit
def _as_eigen(F: Union[Tensor, Eigen], dtype: torch.dtype, device: torch.device) -> Eigen:
    e = F if isinstance(F, Eigen) else eigen(F.to(device), dtype=dtype)
    return Eigen(e.values.to(device=device, dtype=dtype), e.vectors.to(device=device, dtype=dtype))


def _factor_size(F: Union[Tensor, Eigen]) -> tuple[int, ...]:
    return tuple(F.vectors.shape) if isinstance(F, Eigen) else tuple(F.shape)


def _edit(weight: Tensor, A: Union[Tensor, Eigen], G: Union[Tensor, Eigen], rho: float, method: str,
          complement: bool, dtype: torch.dtype) -> tuple[Tensor, int]:
    """``(edited weight, number of kept coefficients)``; arguments already checked."""
    d_out, d_in = weight.shape
    device = weight.device
    eA, eG = _as_eigen(A, dtype, device), _as_eigen(G, dtype, device)
    W = weight.detach().to(dtype)
    if method == "product":
        if rho >= 1.0:
            k = torch.full((d_out,), d_in, dtype=torch.int64)
        else:
            k = select_pairs(eG.values, eA.values, rho)
        C = eG.vectors.T @ W @ eA.vectors
        C.masked_fill_(~pair_mask(k.to(device), d_in), 0.0)
        edited = eG.vectors @ C @ eA.vectors.T
        kept = int(k.sum())
    else:
        r_g, r_a = factor_rank(eG.values, rho), factor_rank(eA.values, rho)
        Ug, Ua = eG.vectors[:, :r_g], eA.vectors[:, :r_a]
        edited = Ug @ ((Ug.T @ W @ Ua) @ Ua.T)
        kept = r_g * r_a
    if complement:
        edited = W - edited
    return edited.to(weight.dtype), kept


def _check_edit_args(weight: Tensor, A, G, method: str, complement: Any, where: str = "") -> None:
    if method not in METHODS:
        raise ValueError(f"{where}unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(complement, bool):
        raise ValueError(f"{where}complement must be True or False, got {complement!r}")
    if weight.dim() != 2:
        raise ValueError(f"{where}weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    for name, F, d in (("A", A, d_in), ("G", G, d_out)):
        if not isinstance(F, (Tensor, Eigen)):
            raise ValueError(f"{where}{name} must be a tensor or an Eigen, got {type(F).__name__}")
        if _factor_size(F) != (d, d):
            raise ValueError(f"{where}{name} has shape {_factor_size(F)} but weight [d_out, d_in] has shape "
                             f"{tuple(weight.shape)}: {name} must be ({d}, {d})")


def edit(weight: Tensor, A: Union[Tensor, Eigen], G: Union[Tensor, Eigen], rho: float, *,
         method: str = "product", complement: bool = False, dtype: torch.dtype = torch.float64) -> Tensor:
    """The K-FAC edit of one weight ``[d_out, d_in]`` (module docstring), in the weight's dtype and device.

    ``A`` is the input factor ``[d_in, d_in]``, ``G`` the output-gradient factor ``[d_out, d_out]``; either may
    be an :class:`Eigen` already decomposed. ``dtype`` is the precision of the decomposition and the matmuls.
    """
    _check_edit_args(weight, A, G, method, complement)
    rho = _check_rho(rho)
    return _edit(weight, A, G, rho, method, complement, dtype)[0]


# ---------------------------------------------------------------------------------------- model editing
class Edit:
    """What :func:`apply_edit` changed: ``restore()`` (or leaving a ``with`` block) puts the weights back.

    ``projections``: the edited ``(layer, module)`` pairs, in order; ``kept[(layer, module)]``: how many
    coefficients of ``C`` were kept (``Σ k_i`` for product, ``r_G·r_A`` for per_factor); ``loaded``: the
    pairs whose edited weight came from the cache.
    """

    def __init__(self, modules: dict[tuple[int, str], nn.Module], originals: dict[tuple[int, str], Tensor],
                 kept: dict[tuple[int, str], int], loaded: set[tuple[int, str]]):
        self._modules = modules
        self._originals = originals
        self.projections = list(modules)
        self.kept = kept
        self.loaded = loaded

    def restore(self) -> None:
        """Copy the original weights back (bit-exact); calling it again copies them again."""
        with torch.no_grad():
            for key, module in self._modules.items():
                module.weight.copy_(self._originals[key])

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"Edit({', '.join(f'{layer}.{module}' for layer, module in self.projections) or 'nothing'})"


def _parse_plan(plan: Mapping, num_layers: int) -> list[tuple[int, str, float]]:
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must map layers to {{module: rho}}, got {type(plan).__name__}")
    items, seen = [], set()
    for key, modules in plan.items():
        layer = None
        if isinstance(key, int) and not isinstance(key, bool):
            layer = key
        elif isinstance(key, str) and re.fullmatch(r"\s*-?\d+\s*", key):
            layer = int(key)
        if layer is None:
            raise ValueError(f"plan key {key!r} is not a layer number")
        if not 0 <= layer < num_layers:
            raise ValueError(f"unknown layer {key!r} in plan: the model has layers 0-{num_layers - 1}")
        if layer in seen:
            raise ValueError(f"layer {layer} appears twice in plan")
        seen.add(layer)
        if not isinstance(modules, Mapping):
            raise ValueError(f"plan layer {layer}: expected {{module: rho}}, got {modules!r}")
        for module, rho in modules.items():
            if module not in MODULES:
                raise ValueError(f"unknown module {module!r} in plan layer {layer}; expected {', '.join(MODULES)}")
            if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0.0 <= float(rho) <= 1.0:
                raise ValueError(f"plan layer {layer} {module}: rho must be a number in [0, 1], got {rho!r}")
            items.append((layer, module, float(rho)))
    return sorted(items, key=lambda t: (t[0], MODULES.index(t[1])))


def _hash_tensor(h, t: Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _digest(t: Tensor) -> bytes:
    h = hashlib.sha256()
    _hash_tensor(h, t)
    return h.digest()


def _cache_key(weight: Tensor, a_digest: bytes, g_digest: bytes, rho: float, method: str, complement: bool,
               dtype: torch.dtype) -> str:
    h = hashlib.sha256(_CACHE_VERSION)
    _hash_tensor(h, weight)
    h.update(a_digest + g_digest)
    h.update(f"rho={rho!r} method={method} complement={complement} dtype={dtype}".encode())
    return h.hexdigest()


def _load_cached(path: Path, weight: Tensor) -> Optional[tuple[Tensor, int]]:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_tensor("weight")
            kept = int((f.metadata() or {}).get("kept", -1))
    except Exception:  # a damaged cache file is recomputed and replaced
        return None
    if stored.shape != weight.shape or stored.dtype != weight.dtype:
        return None
    return stored.to(weight.device), kept


def _save_cached(path: Path, edited: Tensor, kept: int) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({"weight": edited.detach().contiguous().cpu()}, tmp,
                                             metadata={"kept": str(kept)}))


def apply_edit(model: nn.Module, factors: Factors, plan: Mapping, *, method: str = "product",
               complement: bool = False, dtype: torch.dtype = torch.float64,
               cache_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = True) -> Edit:
    """Edit the MLP projections named in ``plan`` in place; return the :class:`Edit` that undoes it.

    ``plan`` has the original's format, ``{"23": {"gate": 0.6, "up": 0.6, "down": 1.0}}`` (str or int layer
    keys; a module left out, or at ρ ≥ :data:`SKIP_RHO`, is not touched). Everything is checked before
    any weight changes (layers, modules, ρ, that the factors exist and fit the weights), and every edited
    weight is computed before the first is written, so an error leaves the model as it was. Weights keep
    their dtype. With ``cache_dir``, each edited weight is stored as ``<sha256>.safetensors``, keyed by the
    weight's and the factors' bytes, ρ, method, complement and dtype, and loaded instead of recomputed.
    """
    from tqdm.auto import tqdm

    if not isinstance(factors, Factors):
        raise ValueError(f"factors must be a loki_kernels.kfac.Factors, got {type(factors).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(complement, bool):
        raise ValueError(f"complement must be True or False, got {complement!r}")
    mlps = find_mlps(model)
    items = [(layer, module, rho) for layer, module, rho in _parse_plan(plan, len(mlps)) if rho < SKIP_RHO]

    targets = []  # (layer, module, nn.Module, A, G, rho)
    for layer, module, rho in items:
        proj = getattr(mlps[layer], module)
        if proj is None:
            raise ValueError(f"layer {layer} of {type(model).__name__} has no {module} projection")
        try:
            A, G = factors.a(layer, module), factors.g(layer, module)
        except KeyError as e:
            raise KeyError(e.args[0]) from None
        _check_edit_args(row_view(proj.module), A, G, method, complement, where=f"layer {layer} {module}: ")
        targets.append((layer, module, proj.module, A, G, rho))

    cache = None
    if cache_dir is not None and targets:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)

    decomposed: dict[tuple[int, str], tuple[Tensor, Eigen]] = {}  # (id(factor), device) -> (factor, Eigen)
    digests: dict[int, tuple[Tensor, bytes]] = {}

    def decompose(F: Tensor, device: torch.device) -> Eigen:
        key = (id(F), str(device))
        if key not in decomposed:
            decomposed[key] = (F, eigen(F.to(device), dtype=dtype))
        return decomposed[key][1]

    def digest(F: Tensor) -> bytes:
        if id(F) not in digests:
            digests[id(F)] = (F, _digest(F))
        return digests[id(F)][1]

    new_weights, kept, loaded = {}, {}, set()
    for layer, module, linear, A, G, rho in tqdm(targets, desc="K-FAC edit", disable=not progress):
        weight = row_view(linear)
        path, hit = None, None
        if cache is not None:
            path = cache / f"{_cache_key(weight, digest(A), digest(G), rho, method, complement, dtype)}.safetensors"
            hit = _load_cached(path, weight)
        if hit is not None:
            new_weights[layer, module], kept[layer, module] = hit
            loaded.add((layer, module))
            continue
        edited, n_kept = _edit(weight, decompose(A, weight.device), decompose(G, weight.device), rho, method,
                               complement, dtype)
        new_weights[layer, module], kept[layer, module] = edited, n_kept
        if path is not None:
            _save_cached(path, edited, n_kept)
    decomposed.clear()

    modules, originals = {}, {}
    with torch.no_grad():
        for layer, module, linear, *_ in targets:
            modules[layer, module] = linear
            originals[layer, module] = linear.weight.detach().clone()
        for layer, module, linear, *_ in targets:
            row_view(linear).copy_(new_weights[layer, module])
    return Edit(modules, originals, kept, loaded)
