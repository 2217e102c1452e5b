"""ICA functional networks (Liu et al., ICML 2025, as FunctionalNetworksSFT builds them), streamed and in torch.

A template set is one ICA over the MLP outputs of all decoder layers at once: each independent component's
spatial map, thresholded at its top percentile, is a *functional network* of ``(layer, channel)`` pairs.
Channel ``j`` of a layer is row ``j`` of its ``down_proj``, so a network is directly a row selection:
:func:`positions` gives the rows to train (``target_pos``) and :func:`silenced` the rows FNSFT zeroes during
training, for its ``preserve`` and ``lesion`` modes.

Modules:

* :mod:`.activations`: the captured signal (forward hooks on ``arch.find_down_projs``; pads dropped);
* :mod:`.pca`: streaming moments, randomized range finder, exact SVD, and the memory model;
* :mod:`.fastica`: scikit-learn's FastICA (parallel) in torch;
* :mod:`.build`: :func:`build_templates`, the whole pipeline;
* :mod:`.templates`: :class:`Templates`, FNSFT's JSON file, matching by IoU, row selections.

``loki_kernels.reference.fnsft_ica`` is the original pipeline (numpy + scikit-learn), kept as the oracle.
"""

from .activations import activation_matrix, activation_source, select_layers
from .build import Decomposition, build_templates, decompose, percentile_threshold, templates_from_maps
from .fastica import ConvergenceWarning, FastICAResult, fastica
from .pca import PCAResult, exact_memory_bytes, stream_memory_bytes
from .templates import (
    Match,
    Templates,
    check_templates,
    load_templates,
    match_components,
    mean_iou,
    positions,
    save_templates,
    silenced,
    templates_from_dict,
)

__all__ = [
    "build_templates",
    "decompose",
    "Decomposition",
    "templates_from_maps",
    "percentile_threshold",
    "activation_source",
    "activation_matrix",
    "select_layers",
    "fastica",
    "FastICAResult",
    "ConvergenceWarning",
    "PCAResult",
    "stream_memory_bytes",
    "exact_memory_bytes",
    "Templates",
    "Match",
    "save_templates",
    "load_templates",
    "templates_from_dict",
    "check_templates",
    "match_components",
    "mean_iou",
    "positions",
    "silenced",
]
