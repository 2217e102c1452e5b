"""FunctionalNetworksSFT's global ICA templates (``ICAMask.compute_global_networks``), as a test oracle.

Re-written from the description in kfac_ica.md §2.1 and FNSFT's code (``ica_mask.py``,
``build_ica_templates.py``), numpy + scikit-learn as there:

1. a forward hook on every decoder layer's ``mlp`` module (its output: the down projection's output), each
   output flattened and its pad rows dropped (``attention_mask > 0``), moved to the CPU in float32; per step
   the layers are concatenated in sorted layer order, steps stacked: ``X`` ``[tokens, layers · hidden]``;
2. ``Xz = (X − mean) / max(std, 1e-8)`` with ``np.mean`` / ``np.std`` (population std, ``ddof = 0``), float32;
3. if ``Xz`` has more than 2³¹ − 1 elements or more than ``max_pca_components`` columns,
   ``PCA(n_components=min(max_pca_components, features, tokens − 1), random_state=0)`` first;
4. ``FastICA(n_components=k, random_state=0, max_iter=200, tol=1e-3)`` (sklearn ≥ 1.3 defaults otherwise:
   parallel, logcosh, ``whiten='unit-variance'``);
5. spatial maps ``A = pca.components_ᵀ · ica.mixing_`` (or ``ica.mixing_`` without PCA);
6. per component ``w = |A[:, c]|``, keep ``w >= np.percentile(w, p)``, feature ``j`` → ``(captured[j // H], j % H)``.

The result is FNSFT's template dict (``build_templates_from_current_components``). Nothing here is used
outside tests and benchmarks; scikit-learn is imported only when a function runs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..arch import find_mlps

__all__ = ["fnsft_activations", "fnsft_templates", "fnsft_build_templates"]


def fnsft_activations(model: nn.Module, batches, layers: Optional[list[int]] = None):
    """FNSFT's design matrix: ``(X float32 [tokens, L·H], captured_layers_sorted, hidden_size)``."""
    model.eval()
    device = next(model.parameters()).device
    mlps = find_mlps(model)
    targets = list(range(len(mlps))) if layers is None else [i for i in layers if 0 <= i < len(mlps)]
    per_step: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    last_mask = {"tensor": None}
    step = {"id": -1}

    def capture(layer_idx):
        def hook(_module, _inputs, out):
            y = out.detach().cpu().to(torch.float32)
            if last_mask["tensor"] is not None:
                m = last_mask["tensor"].reshape(-1) > 0
                y = y.reshape(-1, y.shape[-1])[m]
            else:
                y = y.reshape(-1, y.shape[-1])
            per_step[step["id"]][layer_idx] = y

        return hook

    handles = [mlps[i].module.register_forward_hook(capture(i)) for i in targets]
    try:
        with torch.no_grad():
            for idx, sample in enumerate(batches() if callable(batches) else batches):
                ids = torch.as_tensor(sample["input_ids"])
                ids = ids[None] if ids.ndim == 1 else ids
                mask = sample.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
                step["id"] = idx
                last_mask["tensor"] = mask.detach().cpu()
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()

    captured = sorted(set().union(*[d.keys() for d in per_step.values()])) if per_step else []
    if not captured:
        raise ValueError("no MLP outputs were captured")
    hidden = next(iter(next(iter(per_step.values())).values())).shape[-1]
    rows = []
    for sid in sorted(per_step):
        outs = per_step[sid]
        if not all(i in outs for i in captured):
            continue
        ys = [outs[i] for i in captured]
        tmin = min(y.shape[0] for y in ys)
        if tmin == 0:
            continue
        rows.append(torch.cat([y[:tmin] for y in ys], dim=1))
    if not rows:
        raise ValueError("no usable steps after alignment")
    return torch.cat(rows, dim=0).numpy(), captured, int(hidden)


def fnsft_templates(x: np.ndarray, captured_layers_sorted: list[int], hidden_size: int, *, n_components: int = 10,
                    percentile: float = 98.0, max_pca_components: int = 1000, name: str = "global_templates_v1",
                    return_maps: bool = False):
    """Steps 2–6 on a design matrix ``x``: FNSFT's template dict (and the maps ``A`` if ``return_maps``)."""
    from sklearn.decomposition import PCA, FastICA

    x = np.asarray(x)
    x_mean = np.mean(x, axis=0)
    x_std = np.maximum(np.std(x, axis=0), 1e-8)
    xz = (x - x_mean) / x_std
    ica = FastICA(n_components=n_components, random_state=0, max_iter=200, tol=1e-3)
    if xz.size > 2**31 - 1 or xz.shape[1] > max_pca_components:
        n_pca = min(max_pca_components, xz.shape[1], xz.shape[0] - 1)
        pca = PCA(n_components=n_pca, random_state=0)
        x_pca = pca.fit_transform(xz)
        ica.fit_transform(x_pca)
        maps = pca.components_.T @ ica.mixing_
    else:
        ica.fit_transform(xz)
        maps = ica.mixing_

    components = {}
    for c in range(maps.shape[1]):
        w = np.abs(maps[:, c])
        thr = np.percentile(w, percentile)
        per_layer = defaultdict(list)
        for j in np.flatnonzero(w >= thr):
            per_layer[str(captured_layers_sorted[j // hidden_size])].append(int(j % hidden_size))
        components[c] = {k: sorted(v) for k, v in per_layer.items()}
    templates = {
        "name": name,
        "layout": {"captured_layers_sorted": list(captured_layers_sorted), "hidden_size": int(hidden_size)},
        "templates": {int(c): {str(k): list(map(int, v)) for k, v in comp.items()} for c, comp in components.items()},
    }
    return (templates, maps) if return_maps else templates


def fnsft_build_templates(model: nn.Module, batches, *, layers: Optional[list[int]] = None, **kwargs):
    """The whole pipeline on a model: ``fnsft_templates(*fnsft_activations(model, batches, layers), **kwargs)``."""
    return fnsft_templates(*fnsft_activations(model, batches, layers), **kwargs)
