"""The original implementations, kept as oracles for tests and benchmarks. Never train or attribute with them.

One file per original:

* :mod:`.loki_linear`: LoKI's ``LoKILinear`` (two ``nn.Linear`` layers, ``cat``, ``gather``) and what its model
  classes do with it (:func:`~.loki_linear.apply_reference_loki`).
* :mod:`.kva_paper`: the paper-time KVA estimator (LoKI's first commit), one layer and one prompt at a time.
* :mod:`.kva_captum`: LoKI HEAD's KVA loop over Captum's ``LayerIntegratedGradients``.
* :mod:`.kfac_collect`: the K-FAC factor collection of ``memorization_kfac`` (hooks, mean loss, layer groups).
* :mod:`.fnsft_ica`: FunctionalNetworksSFT's global ICA templates (numpy + scikit-learn PCA and FastICA).
* :mod:`.kfac_original`: the K-FAC edit of ``memorization_kfac``: the heap-loop pair selection
  (:func:`~.kfac_original.top_pairs_by_product`), the product and per-factor projections, the fork's ablation.
* :mod:`.fnsft_anti_drift`: FunctionalNetworksSFT's training-time ``out * m`` masks and its anti-drift
  parametrisation ``W_eff = frozen + row_mask ⊙ delta`` (full fine-tuning mode).
"""

from .fnsft_anti_drift import apply_component_masks, apply_row_parametrizations, remove_row_parametrizations
from .fnsft_ica import fnsft_activations, fnsft_build_templates, fnsft_templates
from .kfac_collect import collect_factors_original
from .kfac_original import top_pairs_by_product
from .kva_captum import captum_loop
from .kva_paper import paper_estimator
from .loki_linear import LoKILinear, apply_reference_loki

__all__ = ["LoKILinear", "apply_reference_loki", "paper_estimator", "captum_loop", "collect_factors_original",
           "fnsft_activations", "fnsft_templates", "fnsft_build_templates", "top_pairs_by_product",
           "apply_component_masks", "apply_row_parametrizations", "remove_row_parametrizations"]
