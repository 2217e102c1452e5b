"""LoKI HEAD's KVA estimator: Captum ``LayerIntegratedGradients`` per layer, the oracle for
``loki_kernels.kva.attribute(..., semantics="captum")``.

One ``LayerIntegratedGradients`` per layer with an all-zeros token-id baseline, keeping the last position;
one prompt at a time (padding stripped with the attention mask). Returns
``float32 [batch, num_layers or len(layers), hidden]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..arch import find_down_projs
from .kva_paper import prompts, target_token

__all__ = ["captum_loop"]


def captum_loop(
    model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, steps: int = 7,
    method: str = "riemann_left", target="argmax", layers: Optional[Sequence[int]] = None,
) -> Tensor:
    """LoKI HEAD's estimator: Captum ``LayerIntegratedGradients`` per layer, last position kept.

    The default method matches :func:`loki_kernels.kva.attribute`'s; LoKI HEAD itself used ``riemann_trapezoid``.
    """
    from captum.attr import LayerIntegratedGradients

    projs = find_down_projs(model)
    layers = list(range(len(projs))) if layers is None else list(layers)
    results = []
    for b, ids in prompts(input_ids, attention_mask):
        mask = torch.ones_like(ids)
        tgt = target_token(model, ids, target, b)

        def forward_func(input_ids, attention_mask):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, :]
            return torch.softmax(logits.float(), dim=-1)[:, tgt]

        rows = []
        for layer in layers:
            lig = LayerIntegratedGradients(forward_func, layer=projs[layer].module)
            attr = lig.attribute(
                inputs=ids, baselines=torch.zeros_like(ids), additional_forward_args=(mask,), n_steps=steps,
                method=method, attribute_to_layer_input=False,
            )
            rows.append(attr[0, -1, :].detach().float())
        results.append(torch.stack(rows))
    return torch.stack(results)
