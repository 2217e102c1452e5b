"""MLP-output activations of a model as blocks of ``[kept tokens, layers · hidden]`` rows, one block per batch.

The signal is what FunctionalNetworksSFT hooks: each decoder layer's MLP output, here read as the output of
its down projection (:func:`loki_kernels.arch.find_down_projs`; for every supported architecture the MLP
returns that output unchanged in eval mode — GPT-2's dropout after ``c_proj`` is the identity there).
Features are concatenated layer-major in sorted layer order: feature ``j`` is channel ``j % hidden`` of the
``j // hidden``-th selected layer. Positions whose ``attention_mask`` is 0 (padding) are dropped.

``batches`` is re-iterable, since streaming PCA runs the model several times: a list or tuple of batch
dicts, or a callable returning a fresh iterator of them. A batch dict holds ``input_ids`` (``[B, T]`` or
``[T]``) and optionally ``attention_mask`` (same shape). Each pass runs the model under ``torch.no_grad()``
with ``use_cache=False``, and stops the forward right after the last selected layer (nothing after it is
needed). :func:`cached` keeps the first pass's blocks instead, when memory allows (the model then runs once).

Deviation from FunctionalNetworksSFT: position ids are passed as ``cumsum(attention_mask) − 1``, as
``generate`` does, so a left-padded sequence gets the same positions (and, with absolute position
embeddings such as GPT-2's, the same activations) as the unpadded one. For right padding, or no padding,
this is exactly the default ``0, 1, 2, ...``.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..arch import Projection, find_down_projs

__all__ = ["Batches", "select_layers", "batch_passes", "activation_source", "activation_matrix", "cached"]

Batches = Union[list, tuple, Callable[[], Iterable[Mapping]]]


class _StopForward(Exception):
    """Raised by the last selected layer's hook: the rest of the forward is not needed."""


def select_layers(model: nn.Module, layers: Optional[Iterable[int]] = None) -> list[Projection]:
    """The down projections of ``layers`` (all decoder layers when None), in sorted layer order."""
    downs = find_down_projs(model)
    if layers is None:
        return downs
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a list of layer indices, not {type(layers).__name__}")
    chosen: set[int] = set()
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"layers: {value!r} is not a layer index")
        if not 0 <= int(value) < len(downs):
            raise ValueError(f"layers: layer {int(value)} is out of range: the model has {len(downs)} decoder layers")
        if int(value) in chosen:
            raise ValueError(f"layers: layer {int(value)} is listed twice")
        chosen.add(int(value))
    if not chosen:
        raise ValueError("layers is empty: select at least one decoder layer")
    return [downs[i] for i in sorted(chosen)]


def batch_passes(batches: Batches) -> Callable[[], Iterator[Mapping]]:
    """A callable giving a fresh iterator over ``batches`` on every call (one call per pass)."""
    if callable(batches):
        return lambda: iter(batches())
    if isinstance(batches, Mapping):
        raise ValueError("batches must be a list of batch dicts (or a callable returning an iterator of them), "
                         "not a single dict")
    if not isinstance(batches, Iterable) or iter(batches) is batches:
        raise ValueError("batches must be re-iterable (a list, or a callable returning a fresh iterator): "
                         "the streaming PCA runs the model over them several times")
    return lambda: iter(batches)


def _batch_tensors(batch: Mapping, device: torch.device) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"each batch must be a dict with 'input_ids', got {type(batch).__name__}"
                         + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
    ids = torch.as_tensor(batch["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"input_ids must be integer token ids of shape [batch, length], got {ids.dtype} "
                         f"of shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        mask = (mask > 0).to(ids.dtype)
    return ids.to(device), mask.to(device)


def activation_source(model: nn.Module, batches: Batches, downs: list[Projection], *,
                      dtype: torch.dtype = torch.float32) -> Callable[[], Iterator[Tensor]]:
    """A source for :mod:`.pca`: each call runs the model over ``batches`` once, yielding one block per batch.

    A block is ``[kept tokens, len(downs) · hidden]`` in ``dtype`` on the model's device; batches whose
    positions are all padded yield an empty block. The model runs in eval mode (its mode is restored after
    each pass).
    """
    passes = batch_passes(batches)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    accepts = inspect.signature(model.forward).parameters
    last = downs[-1].module

    def run() -> Iterator[Tensor]:
        store: dict[int, Tensor] = {}
        keep: dict[str, Tensor] = {}

        def hook_for(i: int, module: nn.Module):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                store[i] = out.detach().reshape(-1, out.shape[-1])[keep["rows"]].to(dtype)
                if module is last:
                    raise _StopForward

            return hook

        handles = [d.module.register_forward_hook(hook_for(i, d.module)) for i, d in enumerate(downs)]
        training = model.training
        model.eval()  # no dropout (FNSFT's model.eval()); the mode is restored after the pass
        try:
            for batch in passes():
                ids, mask = _batch_tensors(batch, device)
                keep["rows"] = mask.reshape(-1) > 0
                store.clear()
                kwargs = {"input_ids": ids, "attention_mask": mask}
                if "position_ids" in accepts:
                    kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)
                if "use_cache" in accepts:
                    kwargs["use_cache"] = False
                try:
                    with torch.no_grad():
                        model(**kwargs)
                except _StopForward:
                    pass
                missing = [downs[i].layer for i in range(len(downs)) if i not in store]
                if missing:
                    raise ValueError(f"the forward never reached the down projection of layer(s) {missing}")
                yield torch.cat([store[i] for i in range(len(downs))], dim=1)
                store.clear()
        finally:
            for h in handles:
                h.remove()
            model.train(training)

    return run


def cached(source: Callable[[], Iterator[Tensor]]) -> Callable[[], Iterator[Tensor]]:
    """``source`` run once: the first complete pass keeps its blocks, later passes replay them.

    Trades memory (every kept token's activations, ``tokens × features`` elements on the blocks' device) for
    the model forwards of the later passes. A pass that stops early keeps nothing.
    """
    kept: list = []
    done = {"value": False}

    def run() -> Iterator[Tensor]:
        if done["value"]:
            yield from kept
            return
        blocks = []
        for block in source():
            blocks.append(block)
            yield block
        kept[:] = blocks
        done["value"] = True

    return run


def activation_matrix(model: nn.Module, batches: Batches, layers: Optional[Iterable[int]] = None, *,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """All activations at once, ``[kept tokens, layers · hidden]`` (small problems, tests, inspection)."""
    downs = select_layers(model, layers)
    return torch.cat(list(activation_source(model, batches, downs, dtype=dtype)()))
