"""The original K-FAC factor collection, as an oracle for tests and benchmarks. Never collect factors with it.

From ``goodfire-ai/memorization_kfac`` ``data/collect_kfac_multilayer.py``, read through the forks
``RollingRo11/memorization`` (whose loss is the original's mean) and ``smarter/memorization_kfac`` (which
switched to a summed loss and seeds torch's global RNG); see ``shared/reference/kfac_ica.md`` §1.1.

What it keeps from the original (its ``KFAC`` collector class and main loop):

* per target block, ``gate``, ``up`` and ``down`` each get a ``forward_pre_hook`` that stores the input with the
  last position dropped (``[:, :-1]``), flattened, cast to the accumulation dtype, only when grad is enabled,
  and a ``register_full_backward_hook`` that takes ``grad_output[0]`` (last position dropped) and adds
  ``A += aᵀa``, ``G += gᵀg`` (``addmm_``), ``n += rows``;
* all parameters frozen except the target modules' weights, the input embeddings' output made to require grad
  (``enable_input_require_grads``), so the backward runs to the embeddings and computes the targets' ``dW``;
* loss: cross-entropy with ``reduction="mean"`` on ``logits[:, :-1]`` (fp32, or fp64 for an fp64 model); gold
  next tokens with ``ignore_index=-100`` at pads (empirical Fisher) or labels sampled from ``softmax(logits)``
  (``sample_labels``, MC Fisher);
* the targets in groups of ``layers_per_pass`` blocks, one pass over all the data per group;
* the factors are the plain averages ``A/n`` and ``G/n``, in the original's layout
  ``{"blk{b}.{gate|up|down}": {"A", "G", "n_tokens"}}`` (gate and up hold the same ``A``).

What differs, so that it can be compared with :func:`loki_kernels.kfac.collect_factors`:

* ``dtype``: the accumulation dtype (the original: fp32; tests: fp64 on an fp64 model); no TF32 switch, no
  gradient checkpointing (it changes no value), ``eval()`` instead of ``train()`` with every dropout ``p = 0``;
* modules through :func:`loki_kernels.arch.find_mlps` (the original reads ``model.model.layers[b].mlp``), so
  GPT-2 (``c_fc`` as up, ``c_proj`` as down) and Phi-3 (fused ``gate_up_proj`` as up) work; absent parts skipped;
* sampled labels come from one CPU ``torch.Generator`` seeded with ``seed`` at the start of every pass, one
  ``torch.multinomial`` per batch on the float32 CPU probabilities of the loss positions in row-major order
  (the original uses the global RNG): the same labels as ``collect_factors(fisher="mc", seed=seed)``;
* ``pad_aware=True`` (the default) masks pads the way ``collect_factors`` does: a position counts when it and
  its next token are real; the hooks keep those rows only, both losses ignore the others (so the mean divides
  by their number), sampled labels are drawn for them only, and the model gets ``position_ids`` from the
  mask. Without pads this is the original exactly. ``pad_aware=False`` is the original's own handling: the
  attention mask and the gold-label ``ignore_index`` at pad inputs only, pad rows kept in ``A``, ``G`` and
  ``n``, labels sampled (and trained on) at every position.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import find_mlps, linear_shape

__all__ = ["collect_factors_original"]


class _KFAC:
    """The original's collector of one linear layer: ``A = Σ aᵀa``, ``G = Σ gᵀg`` over the hooked rows."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, rows: dict):
        d_in, d_out = linear_shape(layer)
        device = layer.weight.device
        self.A = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.G = torch.zeros(d_out, d_out, dtype=dtype, device=device)
        self.n, self.dtype, self.rows, self._buf = 0, dtype, rows, None
        self._h_fwd = layer.register_forward_pre_hook(self._fwd)
        self._h_bwd = layer.register_full_backward_hook(self._bwd)

    def _select(self, t: Tensor) -> Tensor:
        t = t[:, :-1].detach().reshape(-1, t.size(-1)).to(self.dtype)
        keep = self.rows.get("keep")
        return t if keep is None else t[keep]

    def _fwd(self, _, inp):
        if torch.is_grad_enabled():
            self._buf = self._select(inp[0])

    def _bwd(self, _, __, go):
        if go[0] is None or self._buf is None:
            return
        g = self._select(go[0])
        self.A.addmm_(self._buf.t(), self._buf)
        self.G.addmm_(g.t(), g)
        self.n += g.size(0)
        self._buf = None

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.A / self.n, self.G / self.n

    def close(self) -> None:
        self._h_fwd.remove()
        self._h_bwd.remove()
        self._buf = None


def collect_factors_original(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layers: Iterable[int],
    layers_per_pass: int = 1,
    sample_labels: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pad_aware: bool = True,
) -> dict[str, dict[str, Any]]:
    """The original collection over ``batches`` (dicts with ``input_ids`` and optional ``attention_mask``).

    Returns ``{"blk{b}.{proj}": {"A": [d_in, d_in], "G": [d_out, d_out], "n_tokens": int}}`` on the model's
    device, mean-loss scaled as the original (``collect_factors(normalize="original")``). The model's
    ``requires_grad`` flags, gradients and training flags are restored afterwards.
    """
    batches = list(batches)
    blocks = list(layers)
    mlps = find_mlps(model)
    device = next(model.parameters()).device
    embeddings = model.get_input_embeddings()
    training = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    result: dict[str, dict[str, Any]] = {}
    collectors: dict[str, _KFAC] = {}
    hook = embeddings.register_forward_hook(lambda module, inp, out: out.requires_grad_(True))
    try:
        model.eval()
        for start in range(0, len(blocks), layers_per_pass):
            group = blocks[start:start + layers_per_pass]
            for p in model.parameters():
                p.requires_grad_(False)
            targets = []
            for b in group:
                for proj in ("gate", "up", "down"):
                    part = getattr(mlps[b], proj)
                    if part is not None:
                        targets.append((f"blk{b}.{proj}", part.module))
            for _, layer in targets:
                layer.weight.requires_grad_(True)
            rows: dict[str, Optional[Tensor]] = {}
            collectors = {name: _KFAC(layer, dtype, rows) for name, layer in targets}
            generator = torch.Generator().manual_seed(int(seed))
            for batch in batches:
                _step(model, batch, device, rows, sample_labels, generator, pad_aware)
            for name, c in collectors.items():
                a, g = c.factors()
                result[name] = {"A": a, "G": g, "n_tokens": c.n}
                c.close()
            collectors = {}
    finally:
        for c in collectors.values():
            c.close()
        hook.remove()
        for module, flag in training:
            module.training = flag
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
    return result


def _step(model, batch, device, rows, sample_labels, generator, pad_aware) -> None:
    x = torch.as_tensor(batch["input_ids"]).to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(device).bool()
    kwargs: dict[str, Any] = {"attention_mask": mask.long(), "use_cache": False}
    if pad_aware:
        valid = mask[:, :-1] & mask[:, 1:]  # position t counts when tokens t and t + 1 are real
        if not bool(valid.any()):
            return
        rows["keep"] = valid.reshape(-1)
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    else:
        valid = torch.ones_like(mask[:, :-1]) if sample_labels else mask[:, :-1]
        rows["keep"] = None
    labels = x.clone()
    labels[:, :-1] = x[:, 1:]
    labels[:, -1] = -100
    labels[:, :-1][~valid] = -100

    model.zero_grad(set_to_none=True)
    logits = model(x, **kwargs).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = logits.reshape(-1, logits.size(-1))
    if sample_labels:
        with torch.no_grad():
            keep = valid.reshape(-1)
            probs = torch.softmax(flat[keep].detach().float(), dim=-1).cpu()
            y = torch.full((flat.shape[0],), -100, dtype=torch.long)
            y[keep.cpu()] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        loss = F.cross_entropy(flat, y.to(device), ignore_index=-100)
    else:
        loss = F.cross_entropy(flat, labels[:, :-1].reshape(-1), ignore_index=-100)
    loss.backward()
