"""The two KVA estimators, for one unpadded prompt: what to swap in where, and how to reduce the gradients.

See :mod:`loki_kernels.kva` for the maths of both. Each function takes a :class:`~.runner.Runner` over the
selected layers' ``down_proj`` modules and returns their ``[n, H]`` scores.

Where a model's code does not allow a shortcut (packed rows need an attention that honours a custom 4-D
mask; the captum prefix broadcast needs a residual add that broadcasts a batch-``m`` output into a batch-1
forward), the estimators fall back to the plain way by themselves, and remember that for the model object
(:func:`_learned`), so the check is not repeated on every prompt.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.kva_quadrature import interpolate, weighted_grad_sum
from .runner import Runner, default_rows, expand_cache, target_prob

__all__ = ["last_token", "captum"]

# What a model was found not to support: keys of _learned(model).
_NO_PACKING = "no packed rows with attention "
_NO_BROADCAST = "no batch-1 prefix broadcast"
_LEARNED: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def _learned(model: nn.Module) -> set[str]:
    """The shortcuts this model object was found not to support (kept as long as the model lives)."""
    return _LEARNED.setdefault(model, set())


# --------------------------------------------------------------------------------------------------
# last_token: the paper's estimator
# --------------------------------------------------------------------------------------------------
def last_token(runner: Runner, ids: Tensor, target: Optional[int], alphas: Tensor, weights: Tensor,
               max_rows: Optional[int], backend: str, pack_rows: bool = True) -> Tensor:
    """``[n, H]`` scores of the selected layers for one unpadded prompt ``ids [1, T]`` (module docstring)."""
    n = len(runner.modules)
    m = alphas.numel()
    last = ids[:, -1:]
    # (1) the prefix once, keeping its KV cache.
    with torch.no_grad():
        prefix = runner.run(ids[:, :-1], use_cache=True)[1] if ids.shape[1] > 1 else None
        # (2) the last token on that cache: x_l of every layer, and the target.
        captured: list[Optional[Tensor]] = [None] * n

        def capture(i):
            def hook(module, inputs, output):
                captured[i] = output.reshape(1, -1, output.shape[-1])[:, -1].detach().to(ids.device)
            return hook

        with runner.hooks(capture):
            clean_logits, _ = runner.run(last, cache=expand_cache(prefix, 1), use_cache=True)
    if target is None:
        target = int(clean_logits[0].argmax())
    x = torch.cat(captured)  # [n, H]

    # (3) one batched single-token pass over all (layer, step) rows, chunked; (4) one backward per chunk.
    z_all = interpolate(x, alphas, None, backend=backend)  # [n*m, H], row i*m + k = alpha_k x_i
    grads = torch.empty_like(z_all)
    total = n * m
    packed = pack_rows and _can_pack(runner, prefix)
    kind = "last_token_packed" if packed else "last_token"
    chunk = max_rows or default_rows(runner, ids.shape[1], kind, total) + 1  # +1: the packed check row
    start = 0
    while start < total:
        check = packed and start == 0  # the first packed chunk carries one untouched row, to check the mask
        stop = min(start + (chunk - 1 if check and chunk > 1 else chunk), total)
        z = z_all[start:stop].detach().requires_grad_()
        if packed:
            logits = _packed_rows(runner, last, prefix, z, start, m, check)
            if check:
                logits, clean_row = logits[:-1], logits[-1:]
                if not _same_logits(clean_row, clean_logits):
                    _learned(runner.model).add(_NO_PACKING + runner.attn_implementation)
                    warnings.warn(
                        f"KVA: {type(runner.model).__name__} ({runner.attn_implementation}) did not honour the "
                        "packed-rows attention mask; using one expanded KV cache per row instead (same result, "
                        "slower)", stacklevel=4
                    )
                    packed = False
                    chunk = max_rows or default_rows(runner, ids.shape[1], "last_token", total)
                    continue
        else:
            logits = _expanded_rows(runner, last, prefix, z, start, m)
        prob = target_prob(logits, target)
        (grads[start:stop],) = torch.autograd.grad(prob, z)
        del logits, prob
        start = stop
    return weighted_grad_sum(grads, weights, x, None, backend=backend)


def _swap_last(z: Tensor, start: int, m: int, rows: int):
    """Hook factory: for selected layer i, put ``z``'s rows of layer i at the last position of their rows."""
    stop = start + z.shape[0]

    def swap(i):
        lo, hi = max(i * m, start) - start, min((i + 1) * m, stop) - start
        if lo >= hi:
            return None

        def hook(module, inputs, output):
            out = output.reshape(rows, -1, output.shape[-1]).clone()
            out[lo:hi, -1] = z[lo:hi].to(out.device)  # (a model split over devices: the layer's own)
            return out.view(output.shape)
        return hook
    return swap


def _expanded_rows(runner: Runner, last: Tensor, prefix, z: Tensor, start: int, m: int) -> Tensor:
    """Logits ``[R, V]``: a batch of ``R`` copies of the last token, each on the prefix cache expanded to R rows."""
    rows = z.shape[0]
    with runner.hooks(_swap_last(z, start, m, rows)):
        logits, _ = runner.run(last.expand(rows, 1), cache=expand_cache(prefix, rows), use_cache=True)
    return logits


def _packed_rows(runner: Runner, last: Tensor, prefix, z: Tensor, start: int, m: int, check: bool) -> Tensor:
    """Logits ``[R (+1), V]``: the ``R`` rows as ``R`` query tokens of *one* sequence, all at the last position.

    Each attends to the (shared, batch-1) prefix cache and to its own key only, through a 4-D additive
    attention mask, so the prefix K/V are neither copied per row nor differentiated per row. ``check`` adds one
    row with no substitution at all, whose logits must equal the clean run's.
    """
    rows = z.shape[0] + int(check)
    past = prefix.get_seq_length()
    dtype = runner.dtype
    mask = torch.full((1, 1, rows, past + rows), torch.finfo(dtype).min, dtype=dtype, device=last.device)
    mask[..., :past] = 0
    mask[0, 0, :, past:].fill_diagonal_(0)
    position_ids = torch.full((1, rows), past, dtype=torch.long, device=last.device)
    with runner.hooks(_swap_last(z, start, m, rows)):
        logits, _ = runner.run(last.expand(1, rows), cache=expand_cache(prefix, 1), use_cache=True,
                               attention_mask=mask, position_ids=position_ids, keep_last=False)
    return logits[0]


def _can_pack(runner: Runner, prefix) -> bool:
    """Packed rows need a plain prefix cache (no sliding window cutting it) and an sdpa/eager attention."""
    if prefix is None or runner.attn_implementation not in ("sdpa", "eager"):
        return False
    if _NO_PACKING + runner.attn_implementation in _learned(runner.model):
        return False
    if not runner.takes("attention_mask", "position_ids") or not hasattr(prefix, "layers"):
        return False
    past = prefix.get_seq_length()
    for layer in prefix.layers:
        if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            return False
        window = getattr(layer, "sliding_window", None)
        if window is not None and (past + 1 >= window or layer.keys.shape[-2] != past):
            return False
    return True


def _same_logits(row: Tensor, clean: Tensor) -> bool:
    tol = 1e-3 if row.dtype in (torch.float32, torch.float64) else 5e-2
    row, clean = row.float(), clean.float()
    return bool(((row - clean).abs().max() <= tol * (1 + clean.abs().max())).item())


# --------------------------------------------------------------------------------------------------
# captum: LoKI HEAD's estimator
# --------------------------------------------------------------------------------------------------
def captum(runner: Runner, ids: Tensor, target: Optional[int], alphas: Tensor, weights: Tensor,
           max_rows: Optional[int], backend: str, broadcast_prefix: bool = True) -> Tensor:
    """``[n, H]`` scores of the selected layers for one unpadded prompt ``ids [1, T]`` (module docstring)."""
    n = len(runner.modules)
    m = alphas.numel()
    seq = ids.shape[1]
    # The real prompt and the all-zeros baseline prompt in one batch of 2: every layer's x and b.
    with torch.no_grad():
        captured: list[Optional[Tensor]] = [None] * n

        def capture(i):
            def hook(module, inputs, output):
                captured[i] = output.reshape(2, seq, output.shape[-1]).detach().to(ids.device)
            return hook

        with runner.hooks(capture):
            logits, _ = runner.run(torch.cat([ids, torch.zeros_like(ids)]))
    if target is None:
        target = int(logits[0].argmax())
    del logits

    chunk = min(max_rows or default_rows(runner, seq, "captum", m), m)
    grads = torch.empty(n * m, captured[0].shape[-1], dtype=captured[0].dtype, device=ids.device)
    for i in range(n):
        x, b = captured[i][0], captured[i][1]  # [T, H] each
        z_all = interpolate(x.reshape(1, -1), alphas, b.reshape(1, -1), backend=backend).view(m, seq, -1)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            step_grads = _captum_rows(runner, i, ids, z_all[start:stop], target, broadcast_prefix)
            grads[i * m + start:i * m + stop] = step_grads
        del z_all
    x_last = torch.stack([c[0, -1] for c in captured])
    b_last = torch.stack([c[1, -1] for c in captured])
    return weighted_grad_sum(grads, weights, x_last, b_last, backend=backend)


def _captum_rows(runner: Runner, layer: int, ids: Tensor, z: Tensor, target: int, broadcast_prefix: bool) -> Tensor:
    """∇_{z[:, -1]} p for the rows of ``z [R, T, H]`` swapped in as layer ``layer``'s whole down_proj output."""
    rows = z.shape[0]
    broadcast = broadcast_prefix and rows > 1 and _NO_BROADCAST not in _learned(runner.model)
    try:
        return _captum_pass(runner, layer, ids, z, target, broadcast)
    except torch.cuda.OutOfMemoryError:
        raise  # not a shape problem: the fallback would need more memory still
    except (RuntimeError, ValueError):
        if not broadcast:
            raise
    _learned(runner.model).add(_NO_BROADCAST)  # this model's code needs the batch from the start
    return _captum_pass(runner, layer, ids, z, target, False)


def _captum_pass(runner: Runner, layer: int, ids: Tensor, z: Tensor, target: int, broadcast: bool) -> Tensor:
    rows, seq = z.shape[0], z.shape[1]
    feed = ids if broadcast else ids.expand(rows, -1)

    def swap_with(values):  # values [R, T', H] replace layer `layer`'s whole down_proj output
        def swap(i):
            if i != layer:
                return None

            def hook(module, inputs, output):
                out = values.to(output.device)
                return out if output.dim() == 3 else out.reshape(-1, out.shape[-1])
            return hook
        return swap

    cache = None
    if seq > 1:  # the interpolated prefix, no gradient needed: its K/V feed the last token
        with torch.no_grad(), runner.hooks(swap_with(z[:, :-1])):
            cache = runner.run(feed[:, :-1], use_cache=True)[1]
    leaf = z[:, -1:].detach().requires_grad_()
    with runner.hooks(swap_with(leaf)):
        logits, _ = runner.run(feed[:, -1:], cache=cache, use_cache=seq > 1)
    if logits.shape[0] != rows:
        raise RuntimeError(f"expected {rows} rows of logits, got {logits.shape[0]}")
    (grad,) = torch.autograd.grad(target_prob(logits, target), leaf)
    return grad[:, 0]
