"""Perplexity: the corpus perplexity, and the original's mean of per-batch perplexities.

See :mod:`loki_kernels.metrics`; the original is ``metrics/perplexity.perplexity`` (``labels=input_ids``,
no attention mask, batch 128).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .common import check_batch_size, check_rows, evaluating, progress_bar

__all__ = ["perplexity", "mean_batch_perplexity"]

def _batch_nll(model: nn.Module, ids: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL (float64) and the number of predicted tokens. With ``mask`` (padding, either side)
    a token counts where it and the token before it are real, and position ids count real tokens only."""
    if mask is None:
        logits = model(input_ids=ids).logits[:, :-1]
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1]
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 logits: CE in float32
    nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.double().reshape(ids.shape[0], -1)
    if mask is None:
        return nll.sum(), torch.tensor(nll.numel())
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return nll[keep].sum(), keep.sum()


def perplexity(model: nn.Module, tokens: Tensor, attention_mask: Optional[Tensor] = None, batch_size: int = 8,
               progress: bool = True) -> float:
    """exp(mean next-token NLL over the whole corpus): every predicted token of every row weighs the same,
    whatever the batch size. ``attention_mask`` (1 = real token; padding on either side) leaves padding out.
    Runs in eval and inference mode on the model's device and dtype."""
    check_batch_size(batch_size)
    check_rows(tokens, "perplexity")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match tokens {tuple(tokens.shape)}")
    total, count = 0.0, 0
    with evaluating(model) as device, progress_bar(math.ceil(len(tokens) / batch_size), "perplexity", progress) as bar:
        for s in range(0, len(tokens), batch_size):
            mask = None if attention_mask is None else attention_mask[s:s + batch_size].to(device)
            nll, n = _batch_nll(model, tokens[s:s + batch_size].to(device), mask)
            total, count = total + nll.item(), count + int(n)
            bar.update(1)
    if count == 0:
        raise ValueError("perplexity: no predicted tokens (every row is padding)")
    return math.exp(total / count)


def mean_batch_perplexity(model: nn.Module, tokens: Tensor, batch_size: int = 128, progress: bool = True) -> float:
    """The original's ``metrics/perplexity.perplexity``: the mean over batches of exp(batch-mean CE), no
    attention mask. It is not the corpus perplexity: it depends on ``batch_size`` (128 in the original) and
    weighs a short last batch like a full one. Reported next to :func:`perplexity` for comparison with the
    paper's numbers."""
    check_batch_size(batch_size)
    check_rows(tokens, "perplexity")
    values = []
    with evaluating(model) as device, progress_bar(math.ceil(len(tokens) / batch_size), "perplexity", progress) as bar:
        for s in range(0, len(tokens), batch_size):
            nll, n = _batch_nll(model, tokens[s:s + batch_size].to(device), None)
            values.append(math.exp(nll.item() / int(n)))
            bar.update(1)
    return sum(values) / len(values)


