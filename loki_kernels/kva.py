"""KVA (Knowledge Vector Attribution): integrated gradients of the model's next-token probability with
respect to each decoder layer's MLP ``down_proj`` output at the last prompt position (LoKI, §1 of the
report). One signed ``[hidden]`` vector per layer and prompt.

:func:`attribute` computes the two estimators the original code used, exactly, but far faster:

``semantics="last_token"`` (the paper's estimator, LoKI's first commit)
    Zero baseline. For layer ``l`` only the *last* position's ``down_proj`` output ``x_l`` is replaced by
    ``alpha_k * x_l``; every other position and every other layer computes normally. With
    ``method="riemann_left"`` this is the paper code (``alpha_k = k/m``, weight ``1/m``, ``k = 0..m-1``)::

        attr_l = x_l ⊙ Σ_k w_k ∇_z p(z)|_{z = alpha_k x_l}

    Attention is causal, so every position before the last is the same for all ``L*m`` (layer, step)
    evaluations. The engine therefore runs

    1. the prompt minus its last token once, keeping its KV cache;
    2. the last token once on that cache, capturing every ``x_l`` and the argmax target;
    3. *one* pass of the last token for all ``L*m`` (layer, step) rows at once. A forward hook on layer
       ``l``'s ``down_proj`` swaps in, for the rows of layer ``l`` only, the interpolated activations (one leaf
       tensor built by the :func:`~loki_kernels.ops.kva_quadrature.interpolate` kernel); other rows pass
       through. The rows are *packed* as ``L*m`` query tokens of one sequence, all at the last position
       (``position_ids``), with a 4-D attention mask that lets each see the prefix cache and its own key only:
       the prefix K/V are shared, neither copied per row nor differentiated per row. This needs an
       ``sdpa``/``eager`` attention that honours custom masks and a prefix no sliding window cuts; the pass
       carries one untouched row whose logits must equal step 2's, and when they do not (or packing does not
       apply) the rows run as a batch of ``L*m`` instead, on the prefix cache expanded (``Tensor.expand``)
       to ``L*m`` rows -- the same result, with more memory traffic;
    4. one backward of the summed target probabilities to that leaf (no parameter gradients), and the
       :func:`~loki_kernels.ops.kva_quadrature.weighted_grad_sum` kernel reduces the ``L*m`` gradient rows
       with the quadrature weights, times ``x``, straight into ``[L, H]``.

    Steps 3-4 are chunked by ``max_batch_rows``. The paper code instead runs ``L`` full-sequence
    forward+backward passes of batch ``m``.

``semantics="captum"`` (LoKI's HEAD: Captum ``LayerIntegratedGradients`` per layer)
    The baseline is layer ``l``'s ``down_proj`` output for an all-zeros token-id input; the *whole* sequence
    of that output is interpolated, ``b + alpha_k (x - b)``, and only the last position is kept::

        attr_l = (x - b)[last] ⊙ Σ_k w_k ∇_{z[last]} p

    The engine runs the real and the all-zeros prompt once, as one batch of 2, capturing every layer's
    ``x`` and ``b``. Then, per layer ``l``, (a) the prompt minus its last token under ``no_grad`` with the
    interpolated outputs swapped in at layer ``l``, keeping the KV cache, and (b) the last token on that
    cache with a leaf for the last position's interpolated output, then one single-token backward
    (``∇_{z[last]} p`` only flows through the last position, since attention is causal). The layers below
    ``l`` run at batch 1: the hook returns ``m`` rows from a batch-1 layer and the residual add broadcasts
    them, so only layers ``>= l`` run ``m`` times (when a model's code does not broadcast, the engine falls
    back to running the whole prompt at batch ``m``). Captum instead runs, per layer, two batch-1 forwards and
    a full-sequence batch-``m`` forward+backward. Steps (a)-(b) are chunked by ``max_batch_rows``.

Prompts of one batch are attributed one at a time, with their padding (left or right) stripped by the
attention mask, so each result equals the prompt run alone (the HEAD script's right-padding bug, which
put the target on pad positions, cannot happen).

Every architecture :func:`~loki_kernels.patching.find_down_projs` supports works: the engine only hooks those
modules and runs the model's own forward (with its KV cache), reading ``.logits``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backend import BACKENDS
from .ops.kva_quadrature import METHODS, interpolate, quadrature, weighted_grad_sum
from .patching import find_down_projs

__all__ = ["attribute", "quadrature", "METHODS", "SEMANTICS"]

SEMANTICS = ("last_token", "captum")

# Packed last-token rows (see _packed_rows); tests switch it off to check the expanded-cache path.
PACKED = True
# (model class, attention implementation) pairs that did not honour the packed-rows mask.
_NO_PACKING: set[tuple] = set()
# Model classes whose code did not accept a batch-m down_proj output inside a batch-1 forward (captum semantics).
_NO_BROADCAST: set[type] = set()


def attribute(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    steps: int = 7,
    method: str = "riemann_left",
    semantics: str = "last_token",
    target: Union[str, Tensor, Sequence[int]] = "argmax",
    layers: Optional[Sequence[int]] = None,
    max_batch_rows: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """KVA scores: ``float32 [batch, num_layers, hidden]``, signed (see the module docstring).

    Args:
        model: a transformers causal LM (any architecture :func:`find_down_projs` supports), on one device.
            It is run in eval mode with every parameter frozen; both are restored afterwards.
        input_ids: ``[batch, seq]`` (or ``[seq]``) token ids.
        attention_mask: ``[batch, seq]``, 1 for real tokens, 0 for padding (left or right). ``None``: no padding.
            Each prompt is attributed alone, as if it had been passed unpadded.
        steps: number of quadrature points ``m`` (the paper uses 7).
        method: ``"riemann_left"`` (the paper's), ``"riemann_right"``, ``"riemann_middle"``,
            ``"riemann_trapezoid"`` (LoKI HEAD's default) or ``"gausslegendre"``; nodes and weights are
            Captum's (:func:`quadrature`).
        semantics: ``"last_token"`` (the paper's estimator) or ``"captum"`` (LoKI HEAD's Captum estimator).
        target: ``"argmax"`` (the model's own top next token after each prompt) or token ids ``[batch]``.
        layers: decoder layer indices to attribute (negative counts from the end), in the order wanted;
            ``None`` for all. The result then has ``len(layers)`` rows per prompt, in that order.
        max_batch_rows: the most (layer, step) rows one pass may hold (``"last_token"``: rows of the batched
            last-token pass, all layers together; ``"captum"``: steps of one layer per pass). ``None``: all in
            one pass on the CPU; on CUDA a limit from the free memory.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the quadrature kernels.

    Returns:
        ``float32 [batch, len(layers) or num_layers, hidden]`` on ``input_ids``' device.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; expected one of {', '.join(SEMANTICS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or int(max_batch_rows) < 1):
        raise ValueError(f"max_batch_rows must be a positive int or None, got {max_batch_rows!r}")
    alphas, weights = quadrature(method, steps)

    projs = find_down_projs(model)
    num_layers = len(projs)
    wanted = _layer_list(layers, num_layers)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    targets = _targets(target, batch)

    device = _model_device(model)
    compute = sorted(set(wanted))  # each layer computed once, in layer order
    runner = _Runner(model, [projs[i].module for i in compute])
    with _frozen(model), torch.inference_mode(False), torch.enable_grad():
        out = torch.empty(batch, len(wanted), _hidden(projs[0].module), dtype=torch.float32, device=input_ids.device)
        order = torch.tensor([compute.index(i) for i in wanted], device=input_ids.device)
        for b in range(batch):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b] != 0]
            if ids.numel() == 0:
                raise ValueError(f"prompt {b} has no real tokens (its attention_mask is all zeros)")
            ids = ids.to(device).clone().unsqueeze(0)  # clone: a normal tensor even if made in inference mode
            tgt = None if targets is None else int(targets[b])
            if semantics == "last_token":
                scores = _last_token(runner, ids, tgt, alphas, weights, max_batch_rows, backend)
            else:
                scores = _captum(runner, ids, tgt, alphas, weights, max_batch_rows, backend)
            out[b] = scores.to(out.device).index_select(0, order)
    return out


# --------------------------------------------------------------------------------------------------
# the two estimators, for one unpadded prompt ids [1, T]
# --------------------------------------------------------------------------------------------------
def _last_token(runner: "_Runner", ids: Tensor, target: Optional[int], alphas: Tensor, weights: Tensor,
                max_rows: Optional[int], backend: str) -> Tensor:
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
            clean_logits, _ = runner.run(last, cache=_expand_cache(prefix, 1), use_cache=True)
    if target is None:
        target = int(clean_logits[0].argmax())
    x = torch.cat(captured)  # [n, H]

    # (3) one batched single-token pass over all (layer, step) rows, chunked; (4) one backward per chunk.
    z_all = interpolate(x, alphas, None, backend=backend)  # [n*m, H], row i*m + k = alpha_k x_i
    grads = torch.empty_like(z_all)
    total = n * m
    packed = PACKED and _can_pack(runner, prefix)
    kind = "last_token_packed" if packed else "last_token"
    chunk = max_rows or _default_rows(runner, ids.shape[1], kind, total) + 1  # +1: the packed check row
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
                    _NO_PACKING.add(runner.kind)
                    warnings.warn(
                        f"KVA: {runner.kind[0].__name__} ({runner.kind[1]}) did not honour the packed-rows attention "
                        "mask; using one expanded KV cache per row instead (same result, slower)", stacklevel=3
                    )
                    packed = False
                    chunk = max_rows or _default_rows(runner, ids.shape[1], "last_token", total)
                    continue
        else:
            logits = _expanded_rows(runner, last, prefix, z, start, m)
        prob = _target_prob(logits, target)
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


def _expanded_rows(runner: "_Runner", last: Tensor, prefix, z: Tensor, start: int, m: int) -> Tensor:
    """Logits ``[R, V]``: a batch of ``R`` copies of the last token, each on the prefix cache expanded to R rows."""
    rows = z.shape[0]
    with runner.hooks(_swap_last(z, start, m, rows)):
        logits, _ = runner.run(last.expand(rows, 1), cache=_expand_cache(prefix, rows), use_cache=True)
    return logits


def _packed_rows(runner: "_Runner", last: Tensor, prefix, z: Tensor, start: int, m: int, check: bool) -> Tensor:
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
        logits, _ = runner.run(last.expand(1, rows), cache=_expand_cache(prefix, 1), use_cache=True,
                               attention_mask=mask, position_ids=position_ids, keep_last=False)
    return logits[0]


def _can_pack(runner: "_Runner", prefix) -> bool:
    """Packed rows need a plain prefix cache (no sliding window cutting it) and an sdpa/eager attention."""
    if prefix is None or runner.kind in _NO_PACKING or runner.kind[1] not in ("sdpa", "eager"):
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


def _captum(runner: "_Runner", ids: Tensor, target: Optional[int], alphas: Tensor, weights: Tensor,
            max_rows: Optional[int], backend: str) -> Tensor:
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

    chunk = min(max_rows or _default_rows(runner, seq, "captum", m), m)
    grads = torch.empty(n * m, captured[0].shape[-1], dtype=captured[0].dtype, device=ids.device)
    for i in range(n):
        x, b = captured[i][0], captured[i][1]  # [T, H] each
        z_all = interpolate(x.reshape(1, -1), alphas, b.reshape(1, -1), backend=backend).view(m, seq, -1)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            grads[i * m + start:i * m + stop] = _captum_rows(runner, i, ids, z_all[start:stop], target)
        del z_all
    x_last = torch.stack([c[0, -1] for c in captured])
    b_last = torch.stack([c[1, -1] for c in captured])
    return weighted_grad_sum(grads, weights, x_last, b_last, backend=backend)


def _captum_rows(runner: "_Runner", layer: int, ids: Tensor, z: Tensor, target: int) -> Tensor:
    """∇_{z[:, -1]} p for the rows of ``z [R, T, H]`` swapped in as layer ``layer``'s whole down_proj output."""
    rows, seq = z.shape[0], z.shape[1]
    model_type = type(runner.model)
    broadcast = model_type not in _NO_BROADCAST and rows > 1
    try:
        return _captum_pass(runner, layer, ids, z, target, broadcast)
    except torch.cuda.OutOfMemoryError:
        raise  # not a shape problem: the fallback would need more memory still
    except (RuntimeError, ValueError):
        if not broadcast:
            raise
    _NO_BROADCAST.add(model_type)  # this model's code needs the batch from the start
    return _captum_pass(runner, layer, ids, z, target, False)


def _captum_pass(runner: "_Runner", layer: int, ids: Tensor, z: Tensor, target: int, broadcast: bool) -> Tensor:
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
    (grad,) = torch.autograd.grad(_target_prob(logits, target), leaf)
    return grad[:, 0]


# --------------------------------------------------------------------------------------------------
# running the model
# --------------------------------------------------------------------------------------------------
class _Runner:
    """Runs the model's own forward for the last position's logits, with hooks on selected down_projs."""

    def __init__(self, model: nn.Module, modules: list[nn.Module]):
        self.model = model
        self.modules = modules
        self.params = inspect.signature(model.forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in self.params), "past_key_values")
        self.keep_last = "logits_to_keep" in self.params
        config = getattr(model, "config", None)
        self.kind = (type(model), str(getattr(config, "_attn_implementation", None)))
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


def _target_prob(logits: Tensor, target: int) -> Tensor:
    """Sum over rows of softmax(logits)[target], in fp32."""
    return torch.softmax(logits.float(), dim=-1)[:, target].sum()


def _expand_cache(cache, rows: int):
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


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(model: nn.Module):
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


def _layer_list(layers, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        i = int(i)
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer index {i} out of range for a model with {num_layers} layers")
        out.append(i % num_layers)
    if not out:
        raise ValueError("layers is empty")
    return out


def _targets(target, batch: int) -> Optional[Tensor]:
    if isinstance(target, str):
        if target != "argmax":
            raise ValueError(f"target must be 'argmax' or token ids [batch], got {target!r}")
        return None
    t = torch.as_tensor(target).reshape(-1)
    if t.is_floating_point() or t.numel() != batch:
        raise ValueError(f"target must hold {batch} integer token ids, got {tuple(t.shape)} {t.dtype}")
    return t.cpu()


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _hidden(module: nn.Module) -> int:
    out = getattr(module, "out_features", None)
    if isinstance(out, int):
        return out
    return module.weight.shape[-1]  # Conv1D-style (GPT-2): weight [in, out]


def _default_rows(runner: _Runner, seq: int, semantics: str, total: int) -> int:
    """All rows on the CPU; on CUDA as many as about half the free memory holds (a rough upper estimate)."""
    p = next(runner.model.parameters(), None)
    if p is None or p.device.type != "cuda":
        return total
    config = getattr(runner.model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(config, "hidden_size", 4096))
    layers = int(getattr(config, "num_hidden_layers", 32))
    heads = int(getattr(config, "num_attention_heads", 32))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    d_ff = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 32000))
    size = p.element_size()
    if semantics == "last_token":
        # Saved for backward per row: each layer's K and V over the whole prompt (GQA-repeated, worst case),
        # the single-token activations, and the fp32 logits/softmax.
        per_row = layers * (2 * seq * heads * head_dim + 12 * hidden + 4 * d_ff) * size + 12 * vocab
    elif semantics == "last_token_packed":
        # The single-token activations, one row of attention probabilities per head, the fp32 logits/softmax.
        per_row = layers * ((12 * hidden + 4 * d_ff) * size + 8 * heads * (seq + total)) + 12 * vocab
    else:
        # No-grad prefix pass: one layer's activations and the KV cache of every layer, for the whole prompt.
        per_row = seq * (4 * d_ff + 8 * hidden + 2 * layers * heads * head_dim) * size + 12 * vocab
    free, _ = torch.cuda.mem_get_info(p.device)
    return max(1, min(total, int(0.5 * free / max(per_row, 1))))
