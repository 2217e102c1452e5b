"""K-FAC curvature of the MLP projections (issue 13): factor collection, factor files, row scores, the edit.

* :mod:`.factors`: :class:`Factors`, the ``A``/``G`` factors and their key layout;
* :mod:`.collect`: :func:`collect_factors` (one pass over the data for every requested layer) and
  :func:`row_scores` (per-row curvature of ``down_proj``, usable as a LoKI selection through
  :func:`loki_kernels.selection.target_pos_from_scores`);
* :mod:`.storage`: :func:`save_factors` / :func:`load_factors` (safetensors) and :func:`load_original_factors`
  (the original's ``.pt`` files);
* :mod:`.edit`: the curvature edit: :func:`apply_edit` (a plan of ρ per layer and module, in place, undone by
  :meth:`Edit.restore`), :func:`edit` (one weight), :func:`select_pairs` (the kept eigenpairs), :func:`eigen`.
"""

from .collect import RowScores, collect_factors, row_scores
from .edit import Edit, Eigen, apply_edit, edit, eigen, factor_rank, pair_mask, select_pairs
from .factors import MODULES, Factors
from .storage import load_factors, load_original_factors, save_factors

__all__ = [
    "MODULES",
    "Factors",
    "RowScores",
    "collect_factors",
    "row_scores",
    "save_factors",
    "load_factors",
    "load_original_factors",
    "Edit",
    "Eigen",
    "apply_edit",
    "edit",
    "eigen",
    "factor_rank",
    "pair_mask",
    "select_pairs",
]
