"""The LoKI paper-time KVA estimator (first commit, ``forward_with_partitioning``), the oracle for
``loki_kernels.kva.attribute(..., semantics="last_token")``.

One layer at a time: repeat the prompt ``m`` times, overwrite *only the last position* of layer ``l``'s
``down_proj`` output with row ``k`` of ``alpha_k * x_l`` (a leaf), run the full model, sum the softmax
probabilities of the target at the last position, and take ``autograd.grad``. With ``riemann_left`` this is
the paper's arithmetic (``step = x/m``, rows ``k * step``, score ``step ⊙ Σ grads``); other methods use
Captum's nodes and weights.

One prompt at a time (padding, if any, is stripped with the attention mask first); returns
``float32 [batch, num_layers or len(layers), hidden]``. Costs ``L`` full-sequence batch-``m``
forward+backward passes per prompt.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..arch import find_down_projs
from ..ops.kva_quadrature import quadrature

__all__ = ["paper_estimator", "prompts", "target_token"]


def prompts(input_ids: Tensor, attention_mask: Optional[Tensor]):
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b] != 0]
        yield b, ids.unsqueeze(0)


def target_token(model: nn.Module, ids: Tensor, target, b: int) -> int:
    if isinstance(target, str):
        with torch.no_grad():
            return int(model(input_ids=ids).logits[0, -1].argmax())
    return int(torch.as_tensor(target).reshape(-1)[b])


def paper_estimator(
    model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, steps: int = 7,
    method: str = "riemann_left", target="argmax", layers: Optional[Sequence[int]] = None,
) -> Tensor:
    """The paper's KVA estimator (zero baseline, last position only), one layer and one prompt at a time."""
    projs = find_down_projs(model)
    layers = list(range(len(projs))) if layers is None else list(layers)
    alphas, weights = quadrature(method, steps)
    m = steps
    results = []
    for b, ids in prompts(input_ids, attention_mask):
        tgt = target_token(model, ids, target, b)
        # Capture pass: x_l = last position's down_proj output of every layer.
        xs = {}
        handles = [
            p.module.register_forward_hook(lambda mod, i, o, l=p.layer: xs.__setitem__(l, o[:, -1, :].detach()))
            for p in projs
        ]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        rows = []
        for layer in layers:
            x = xs[layer]  # [1, H]
            if method == "riemann_left":  # generate_partitioning: step = x/m, rows k*step
                step = x / m
                part = torch.cat([step * k for k in range(m)], dim=0)
            else:
                part = alphas.to(x.device, x.dtype)[:, None] * x
            part = part.detach().requires_grad_()

            def hook(mod, inputs, output, part=part):
                output = output.clone()
                output[:, -1, :] = part
                return output

            handle = projs[layer].module.register_forward_hook(hook)
            try:
                with torch.enable_grad():
                    logits = model(input_ids=ids.repeat(m, 1)).logits[:, -1, :]
                    prob = torch.softmax(logits.float(), dim=-1)[:, tgt]
                    (grad,) = torch.autograd.grad(prob.sum(), part)
            finally:
                handle.remove()
            if method == "riemann_left":
                score = step[0] * grad.sum(0)
            else:
                score = x[0] * (weights.to(grad.device, grad.dtype)[:, None] * grad).sum(0)
            rows.append(score.float())
        results.append(torch.stack(rows))
    return torch.stack(results)
