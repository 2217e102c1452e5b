"""The original K-FAC curvature edit, for tests and benchmarks only. Do not edit models with it.

From github.com/goodfire-ai/memorization_kfac (``kfac_treatment_pairwise.py``, classes ``KFACTreatment`` and
``KFACTreatmentPairwise``; read here through the fork RollingRo11/memorization, whose file keeps the
original's methods unchanged and adds ``ablate_kfac_by_product``). The class methods are written out as
functions of the eigendecomposition, so a test can feed both implementations the same eigenpairs:

* :func:`prepare_eigen`: ``_prepare_layer_kfac_info``: ``eigh`` in fp32 on the factor as stored (not
  symmetrised, eigenvalues not clamped), then ``argsort(descending=True)``.
* :func:`top_pairs_by_product`: ``_top_pairs_by_product``, the paper's selection, verbatim: a k-way merge
  over the outer product with a Python ``heapq`` keyed by ``(-λ_i·μ_j, i, j)`` and one ``.item()`` per
  pushed pair, until the running Python-float sum reaches ``ratio·(Σλ)(Σμ)``. Equal products pop in
  ``(i, j)`` order (tuple comparison). Negative eigenvalues are used as they are.
* :func:`project_weight_pairs`: the projection of ``_project_weight_pairs`` (its diagnostics left out):
  ``W' = U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ``, ``M`` one on the selected pairs.
* :func:`apply_kfac_by_product` / :func:`ablate_kfac_by_product`: the two together, and the fork's
  ``W − W'``.
* :func:`compute_rank_for_variance`, :func:`project_weight`, :func:`apply_kfac`: the per-factor baseline
  ``apply_kfac((ρ_A, ρ_G))``: ranks from ``cumsum / total >= ρ``, ``W' = U_G,r U_G,rᵀ W U_A,r U_A,rᵀ``.

The originals run their matmuls in fp32 (``W.float()``); these functions compute in the dtype of the
eigenvectors they are given, so a float64 decomposition gives a float64 oracle.
"""

from __future__ import annotations

import heapq
from typing import List, Tuple

import torch
from torch import Tensor

__all__ = [
    "prepare_eigen",
    "top_pairs_by_product",
    "project_weight_pairs",
    "apply_kfac_by_product",
    "ablate_kfac_by_product",
    "compute_rank_for_variance",
    "project_weight",
    "apply_kfac",
]


def prepare_eigen(F: Tensor) -> tuple[Tensor, Tensor]:
    """``(eigenvalues, eigenvectors)`` of a factor as the original computes them: fp32 ``eigh``, descending."""
    eva, evc = torch.linalg.eigh(F.float())
    idx = eva.argsort(descending=True)
    return eva[idx], evc[:, idx]


def top_pairs_by_product(evals_G: Tensor, evals_A: Tensor, ratio: float) -> List[Tuple[int, int]]:
    """The original ``KFACTreatmentPairwise._top_pairs_by_product``, unchanged (comments shortened).

    k-way merge over the outer-product matrix to fetch the largest λ_i μ_j until cumulative ≥ ratio · total.
    """
    m, n = len(evals_G), len(evals_A)
    # make sure descending
    g = evals_G
    a = evals_A
    total_mass = (g.sum() * a.sum()).item()
    target_mass = ratio * total_mass

    # max-heap keyed by -product so we pop the largest each time
    heap = [(-(g[0] * a[0]).item(), 0, 0)]
    seen = {(0, 0)}
    cum_mass = 0.0
    selected = []

    while cum_mass < target_mass and heap:
        neg_prod, i, j = heapq.heappop(heap)
        prod = -neg_prod
        cum_mass += prod
        selected.append((i, j))

        # Push neighbours (i+1, j) and (i, j+1)
        if i + 1 < m and (i + 1, j) not in seen:
            heapq.heappush(heap, (-(g[i + 1] * a[j]).item(), i + 1, j))
            seen.add((i + 1, j))
        if j + 1 < n and (i, j + 1) not in seen:
            heapq.heappush(heap, (-(g[i] * a[j + 1]).item(), i, j + 1))
            seen.add((i, j + 1))

    return selected


def project_weight_pairs(W: Tensor, evc_G: Tensor, evc_A: Tensor, pairs: List[Tuple[int, int]]) -> Tensor:
    """``W' = Σ_{(i,j)∈S} (u_iᵀ W v_j) u_i v_jᵀ``, computed as the original does: ``U_G (C ⊙ M) U_Aᵀ``."""
    Ug, Ua = evc_G, evc_A
    W = W.to(Ug.dtype)
    C = Ug.T @ W @ Ua
    mask = torch.zeros_like(C, device=C.device)
    idx_i, idx_j = zip(*pairs) if pairs else ([], [])
    mask[list(idx_i), list(idx_j)] = 1.0
    return Ug @ (C * mask) @ Ua.T


def apply_kfac_by_product(W: Tensor, eva_G: Tensor, evc_G: Tensor, eva_A: Tensor, evc_A: Tensor,
                          rho: float) -> Tensor:
    """``apply_kfac_by_product(ρ)`` for one layer: the edited weight (in the eigenvectors' dtype)."""
    assert (eva_G[:-1] >= eva_G[1:]).all(), "eva_G must be sorted desc"
    assert (eva_A[:-1] >= eva_A[1:]).all(), "eva_A must be sorted desc"
    pairs = top_pairs_by_product(eva_G, eva_A, rho)
    return project_weight_pairs(W, evc_G, evc_A, pairs)


def ablate_kfac_by_product(W: Tensor, eva_G: Tensor, evc_G: Tensor, eva_A: Tensor, evc_A: Tensor,
                           rho: float) -> Tensor:
    """The fork's ``ablate_kfac_by_product(ρ)``: ``W − W'``, removing the top-curvature pairs."""
    W_proj = apply_kfac_by_product(W, eva_G, evc_G, eva_A, evc_A, rho)
    return W.to(W_proj.dtype) - W_proj


def compute_rank_for_variance(evals: Tensor, target_variance_ratio: float) -> Tuple[int, float]:
    """The original ``KFACTreatment._compute_rank_for_variance``: ``(k, retained fraction)``."""
    total_variance = evals.sum()
    cumsum_variance = torch.cumsum(evals, dim=0)
    variance_ratios = cumsum_variance / total_variance

    if target_variance_ratio >= 1.0:
        return len(evals), 1.0

    mask = variance_ratios >= target_variance_ratio
    if mask.any():
        rA = mask.nonzero()[0].item() + 1
        actual_variance = variance_ratios[rA - 1].item()
    else:
        rA = len(evals)
        actual_variance = 1.0
    return rA, actual_variance


def project_weight(W: Tensor, evc_G: Tensor, evc_A: Tensor, rG: int, rA: int) -> Tensor:
    """The original ``KFACTreatment._project_weight``: ``U_G,r (U_G,rᵀ W U_A,r) U_A,rᵀ``."""
    Ug = evc_G[:, :rG]
    Ua = evc_A[:, :rA]
    W = W.to(Ug.dtype)
    return Ug @ (Ug.T @ W @ Ua) @ Ua.T


def apply_kfac(W: Tensor, eva_G: Tensor, evc_G: Tensor, eva_A: Tensor, evc_A: Tensor,
               variance_ratios: Tuple[float, float]) -> Tensor:
    """``KFACTreatment.apply_kfac((ρ_A, ρ_G))`` for one layer (note the original's order: A first)."""
    var_A, var_G = variance_ratios
    rA, _ = compute_rank_for_variance(eva_A, var_A)
    rG, _ = compute_rank_for_variance(eva_G, var_G)
    return project_weight(W, evc_G, evc_A, rG, rA)
