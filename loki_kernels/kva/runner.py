"""Running the model for KVA: its own forward with hooks on selected ``down_proj`` modules, and its KV cache.

The estimators (:mod:`.estimators`) only say what to swap in where; this module runs the model, reads the
last position's logits, and reuses a batch-1 prefix cache for many rows without copying it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from torch import Tensor, nn

from ..arch import text_config

__all__ = ["Runner", "expand_cache", "frozen", "default_rows", "target_prob"]


class Runner:
    """Runs the model's own forward for the last position's logits, with hooks on selected down_projs."""

    def __init__(self, model: nn.Module, modules: list[nn.Module]):
        self.model = model
        self.modules = modules
        self.params = inspect.signature(model.forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in self.params), "past_key_values")
        self.keep_last = "logits_to_keep" in self.params
        config = getattr(model, "config", None)
        self.attn_implementation = str(getattr(config, "_attn_implementation", None))
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def takes(self, *names: str) -> bool:
        return all(n in self.params for n in names)

    def run(self, ids: Tensor, cache=None, use_cache: bool = False, keep_last: bool = True, **kwargs):
        """``(logits, cache)``: logits ``[batch, V]`` at the last position, or ``[batch, seq, V]``."""
        kwargs["use_cache"] = use_cache
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if keep_last and self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, **kwargs)
        new_cache = getattr(out, self.cache_kw, None) if use_cache else None  # never touch the deprecated alias
        return (out.logits[:, -1] if keep_last else out.logits), new_cache

    @contextlib.contextmanager
    def hooks(self, make):
        """``make(i)`` returns a forward hook for the i-th selected down_proj, or None."""
        handles = []
        try:
            for i, module in enumerate(self.modules):
                hook = make(i)
                if hook is not None:
                    handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()


def target_prob(logits: Tensor, target: int) -> Tensor:
    """Sum over rows of softmax(logits)[target], in fp32."""
    return torch.softmax(logits.float(), dim=-1)[:, target].sum()


# ------------------------------------------------------------------------------------------------- cache
def expand_cache(cache, rows: int):
    """A fresh cache object whose per-layer K/V are the batch-1 ``cache``'s, expanded (not copied) to ``rows``.

    The model appends to the copy (``torch.cat`` makes new tensors), so ``cache`` itself is never changed.
    """
    if cache is None:
        return None
    new = copy.copy(cache)
    if hasattr(cache, "layers"):  # transformers >= 4.56: Cache.layers of DynamicLayer-like objects
        new.layers = [_expand_state(copy.copy(layer), rows) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):  # older DynamicCache
        new.key_cache = [_expand_tensor(t, rows) for t in cache.key_cache]
        new.value_cache = [_expand_tensor(t, rows) for t in cache.value_cache]
    else:
        raise TypeError(f"cannot reuse a {type(cache).__name__} for several rows")
    return new


def _expand_state(layer, rows: int):
    for name, value in vars(layer).items():
        if isinstance(value, Tensor):
            setattr(layer, name, _expand_tensor(value, rows))
    return layer


def _expand_tensor(t: Tensor, rows: int) -> Tensor:
    if t.dim() >= 2 and t.shape[0] == 1 and rows != 1:
        return t.expand(rows, *t.shape[1:])
    return t


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and ``requires_grad=False`` on every parameter, both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [(mod, mod.training) for mod in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for mod, flag in training:
            mod.training = flag


def default_rows(runner: Runner, seq: int, pass_kind: str, total: int) -> int:
    """How many rows one pass may hold: all on the CPU; on CUDA about half the free memory's worth.

    ``pass_kind``: ``"last_token"`` (rows on an expanded cache), ``"last_token_packed"`` or ``"captum"``.
    A rough upper estimate of what each row keeps alive for the backward.
    """
    p = next(runner.model.parameters(), None)
    if p is None or p.device.type != "cuda":
        return total
    config = text_config(runner.model)
    hidden = int(getattr(config, "hidden_size", 4096))
    layers = int(getattr(config, "num_hidden_layers", 32))
    heads = int(getattr(config, "num_attention_heads", 32))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    d_ff = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 32000))
    size = p.element_size()
    if pass_kind == "last_token":
        # Saved for backward per row: each layer's K and V over the whole prompt (GQA-repeated, worst case),
        # the single-token activations, and the fp32 logits/softmax.
        per_row = layers * (2 * seq * heads * head_dim + 12 * hidden + 4 * d_ff) * size + 12 * vocab
    elif pass_kind == "last_token_packed":
        # The single-token activations, one row of attention probabilities per head, the fp32 logits/softmax.
        per_row = layers * ((12 * hidden + 4 * d_ff) * size + 8 * heads * (seq + total)) + 12 * vocab
    else:
        # No-grad prefix pass: one layer's activations and the KV cache of every layer, for the whole prompt.
        per_row = seq * (4 * d_ff + 8 * hidden + 2 * layers * heads * head_dim) * size + 12 * vocab
    free, _ = torch.cuda.mem_get_info(p.device)
    return max(1, min(total, int(0.5 * free / max(per_row, 1))))
