"""KVA (Knowledge Vector Attribution): integrated gradients of the model's next-token probability with
respect to each decoder layer's MLP ``down_proj`` output at the last prompt position (LoKI, §1 of the
report). One signed ``[hidden]`` vector per layer and prompt.

:func:`attribute` computes the two estimators the original code used, exactly, but far faster:

``semantics="last_token"`` (the paper's estimator, LoKI's first commit; the default)
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

Every architecture :func:`~loki_kernels.arch.find_down_projs` supports works: the engine only hooks those
modules and runs the model's own forward (with its KV cache), reading ``.logits``.

The package: this module checks the arguments and loops over prompts; :mod:`.estimators` holds the two
estimators; :mod:`.runner` runs the model, its hooks and its KV cache.
"""


from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..arch import find_down_projs, max_positions, text_config
from ..backend import BACKENDS
from ..ops.kva_quadrature import METHODS, quadrature
from . import estimators
from .runner import Runner, frozen

__all__ = ["attribute", "quadrature", "METHODS", "SEMANTICS", "DEFAULT_STEPS", "DEFAULT_METHOD"]

SEMANTICS = ("last_token", "captum")
DEFAULT_STEPS = 7  # the paper's m
DEFAULT_METHOD = "riemann_left"  # the paper's quadrature (LoKI HEAD's Captum script used riemann_trapezoid)


def attribute(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    steps: int = DEFAULT_STEPS,
    method: str = DEFAULT_METHOD,
    semantics: str = "last_token",
    target: Union[str, Tensor, Sequence[int]] = "argmax",
    layers: Optional[Sequence[int]] = None,
    max_batch_rows: Optional[int] = None,
    pack_rows: bool = True,
    broadcast_prefix: bool = True,
    backend: str = "auto",
) -> Tensor:
    """KVA scores: ``float32 [batch, num_layers, hidden]``, signed (see the module docstring).

    Args:
        model: a transformers causal LM (any architecture :func:`find_down_projs` supports), on one device.
            It is run in eval mode with every parameter frozen; both are restored afterwards.
        input_ids: ``[batch, seq]`` (or ``[seq]``) token ids, each in ``[0, vocabulary size)``.
        attention_mask: ``[batch, seq]``, 1 for real tokens, 0 for padding (left or right). ``None``: no padding.
            Each prompt is attributed alone, as if it had been passed unpadded; it may not be longer than the
            model's ``max_position_embeddings``.
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
        pack_rows: ``"last_token"`` only. ``True``: the (layer, step) rows run as query tokens of one sequence
            sharing the prefix KV cache, where the model honours a custom attention mask (checked on every
            call; otherwise it falls back by itself). ``False``: a batch of rows on the expanded prefix cache.
            Same result either way.
        broadcast_prefix: ``"captum"`` only. ``True``: the layers below the attributed one run at batch 1
            where the model's code allows it (otherwise it falls back by itself). ``False``: the whole
            prompt runs at batch ``m``. Same result either way.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the quadrature kernels.

    Returns:
        ``float32 [batch, len(layers) or num_layers, hidden]`` on ``input_ids``' device.

    Raises ``ValueError`` naming the value for: an unknown semantics, method or backend; a bad ``steps``,
    ``max_batch_rows``, layer index or target; token ids outside the vocabulary; a prompt with no real
    tokens or longer than the model's positions.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; expected one of {', '.join(SEMANTICS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or int(max_batch_rows) < 1):
        raise ValueError(f"max_batch_rows must be a positive int or None, got {max_batch_rows!r}")
    alphas, weights = quadrature(method, steps)

    projs = find_down_projs(model)
    wanted = _layer_list(layers, len(projs))
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    prompts = [input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b] != 0]
               for b in range(input_ids.shape[0])]
    _check_prompts(model, prompts)
    targets = _targets(target, len(prompts), _output_vocab(model))

    device = _model_device(model)
    compute = sorted(set(wanted))  # each layer computed once, in layer order
    runner = Runner(model, [projs[i].module for i in compute])
    with frozen(model), torch.inference_mode(False), torch.enable_grad():
        out = torch.empty(len(prompts), len(wanted), projs[0].out_features, dtype=torch.float32,
                          device=input_ids.device)
        order = torch.tensor([compute.index(i) for i in wanted], device=input_ids.device)
        for b, ids in enumerate(prompts):
            ids = ids.to(device).clone().unsqueeze(0)  # clone: a normal tensor even if made in inference mode
            tgt = None if targets is None else int(targets[b])
            if semantics == "last_token":
                scores = estimators.last_token(runner, ids, tgt, alphas, weights, max_batch_rows, backend, pack_rows)
            else:
                scores = estimators.captum(runner, ids, tgt, alphas, weights, max_batch_rows, backend,
                                           broadcast_prefix)
            out[b] = scores.to(out.device).index_select(0, order)
    return out


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
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


def _check_prompts(model: nn.Module, prompts: list[Tensor]) -> None:
    """Every prompt has real tokens, fits the model's positions, and holds only ids of its vocabulary."""
    config = text_config(model)
    positions = max_positions(config)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
    for b, ids in enumerate(prompts):
        if ids.numel() == 0:
            raise ValueError(f"prompt {b} has no real tokens (its attention_mask is all zeros)")
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
        if positions is not None and ids.numel() > positions:
            raise ValueError(f"prompt {b} has {ids.numel()} tokens, more than the model's {positions} positions "
                             f"(max_position_embeddings)")
        bad = (ids < 0) | (ids >= vocab) if vocab is not None else ids < 0
        if bool(bad.any()):
            at = int(bad.nonzero()[0])
            raise ValueError(f"prompt {b} holds token id {int(ids[at])} at position {at}, outside the model's "
                             f"vocabulary of {vocab} tokens")


def _output_vocab(model: nn.Module) -> Optional[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(head, "out_features", None) or getattr(text_config(model), "vocab_size", None)
    return int(size) if size is not None else None


def _targets(target, batch: int, vocab: Optional[int]) -> Optional[Tensor]:
    if isinstance(target, str):
        if target != "argmax":
            raise ValueError(f"target must be 'argmax' or token ids [batch], got {target!r}")
        return None
    t = torch.as_tensor(target).reshape(-1)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.numel() != batch:
        raise ValueError(f"target must hold {batch} integer token ids, got {tuple(t.shape)} {t.dtype}")
    bad = (t < 0) | (t >= vocab) if vocab is not None else t < 0
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"target {int(t[b])} of prompt {b} is not a token id of the model's {vocab} outputs")
    return t.cpu()


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
