"""Collect K-FAC factors (and per-row curvature scores of ``down_proj``) from a causal LM in one pass over the data.

For each requested projection ``y = W a`` of a layer's MLP, :func:`collect_factors` accumulates
``A = Σ_t a_t a_tᵀ`` over its inputs and ``G = Σ_t g_t g_tᵀ`` over the gradients ``g_t = ∂loss/∂y_t`` of its
outputs, then divides both by the number of token positions ``n``. :func:`row_scores` reads the same
gradients at each ``down_proj`` and reduces them to one curvature number per row.

How (what the original ``goodfire-ai/memorization_kfac`` ``data/collect_kfac_multilayer.py`` does differently is
kept as :mod:`loki_kernels.reference.kfac_collect`):

* **One pass for all layers.** Every requested layer is collected in the same forward and backward. No
  parameter requires grad during the pass: a forward pre-hook detaches the input of the lowest requested
  layer's MLP (of its ``down`` when only ``down`` is requested) and makes it require grad, so the graph, and
  the backward, start there and compute no weight gradient at all (the original computes ``dW`` of the target
  weights and back-propagates to the embeddings, once per ``layers_per_pass`` group). Every ``requires_grad``
  flag and training flag is restored afterwards, also on error; the weights are never written.
* **Gradients** come from tensor hooks on the module outputs (``Tensor.register_hook``), inputs from forward
  hooks; both are accumulated into fp32 accumulators by :func:`loki_kernels.ops.covariance.covariance_` as
  they arrive, whatever the model's dtype (bf16/fp16 activations, fp32 products).
* **Positions.** A position ``t`` of a sequence counts (is a *loss position*) when ``t < T − 1`` and both token
  ``t`` and token ``t + 1`` are real (``attention_mask`` 1): the last position of every sequence is dropped,
  as in the original (its next token is unknown), and pad positions are masked out of ``A``, ``G``, the loss
  and the count. With ragged batches the model gets ``position_ids = cumsum(attention_mask) − 1`` (clamped at
  0), so a left-padded sequence gives the same factors as the same sequence alone; the original passes none.
  ``n_tokens[layer]`` is the number of loss positions (the same for every layer of one collection).
* **Loss.** Summed next-token cross-entropy over the loss positions (fp32 logits), so the factors do not
  depend on how the data is cut into batches. ``fisher="empirical"`` uses the gold next tokens;
  ``fisher="mc"`` (an MC estimate of the true Fisher, the original's ``--sample_labels``) draws one label per
  loss position from ``softmax(logits)``: one CPU ``torch.Generator`` seeded once with ``seed`` for the whole
  collection, and per batch one ``torch.multinomial(probs, 1, generator=gen)`` on the float32 CPU
  probabilities of that batch's loss positions in row-major (sequence, then position) order.
* **Scale.** ``normalize="sum"``: ``G = (1/n) Σ_t g_t g_tᵀ`` with ``g_t`` the gradient of the summed loss
  (``E[g gᵀ]`` per token). ``normalize="original"``: each batch's loss is divided by its number of loss
  positions ``N_b`` (the original's mean loss), so ``G = (1/n) Σ_b N_b⁻² Σ_{t∈b} g_t g_tᵀ`` with the same
  summed-loss ``g_t``. Without padding ``N_b = B·(T−1)`` and this is exactly the original's factor; with
  padding ``N_b`` counts the loss positions only, which is what the original's gold-label loss
  (``ignore_index``) divides by, but its sampled-label loss divides by all ``B·(T−1)`` positions (it samples
  labels at pads too), and the original's ``A`` and ``n`` include the pad positions. ``A`` is the same for both.
* **Model state.** ``eval()`` during the pass (no dropout); ``use_cache=False``.
* **Gate and up** read the same input: their ``A`` is computed once, under ``"{layer}.mlp"``.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import MLP, find_mlps, linear_shape
from ..ops.covariance import covariance_, symmetrize_
from .factors import MODULES, Factors, input_name

__all__ = ["FISHERS", "NORMALIZATIONS", "RowScores", "collect_factors", "row_scores"]

FISHERS = ("mc", "empirical")
NORMALIZATIONS = ("sum", "original")


# ------------------------------------------------------------------------------------------------ results
@dataclass
class RowScores:
    """Per-row curvature of ``down_proj`` (row ``o`` writes residual channel ``o``), one row of each tensor per layer.

    With ``g_t`` the gradient of the summed loss with respect to ``down_proj``'s output at loss position ``t``
    and ``a_t`` its input (``act(gate)·up``, length ``d_ff``), over the ``n`` loss positions:

    * ``coupled[i, o] = (1/n) Σ_t g_{t,o}² ‖a_t‖²``: the sum over row ``o``'s weights of the diagonal
      (per-weight) empirical/MC Fisher ``E[g_o² a_i²]``, which couples the gradient and the input of each token;
    * ``diag_g[i, o] = (1/n) Σ_t g_{t,o}²``: the diagonal of the K-FAC ``G`` factor (``normalize="sum"``).
      Under K-FAC row ``o``'s Fisher mass is ``diag_g[o]·tr(A)``, proportional to ``diag_g``.

    ``layers[i]`` is the decoder layer of row ``i`` of both tensors (``[len(layers), hidden]``, float32, on
    the CPU). With every layer collected (the default) they are ``[L, H]`` and turn into a whole-model
    ``target_pos`` with :func:`loki_kernels.selection.target_pos_from_scores`.
    """

    layers: list[int]
    coupled: Tensor
    diag_g: Tensor
    n_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ public
def collect_factors(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layers: Iterable[int],
    modules: Iterable[str] = MODULES,
    fisher: str = "mc",
    seed: int = 0,
    normalize: str = "sum",
    progress: bool = True,
) -> Factors:
    """K-FAC factors of the MLP ``modules`` of ``layers``, from one forward+backward per batch (module docstring).

    ``batches``: an iterable of dicts with ``input_ids`` ``[B, T]`` and optionally ``attention_mask``
    ``[B, T]`` (1 real token, 0 pad; left or right padding); it is read once, into a list, before anything
    runs. ``modules``: any of ``"gate"``, ``"up"``, ``"down"`` that the architecture has (Phi-3's fused
    ``gate_up_proj`` and GPT-2's ``c_fc`` are ``"up"``, with no ``"gate"``). ``fisher``: ``"mc"`` (sampled
    labels, deterministic given ``seed``) or ``"empirical"`` (gold labels). ``normalize``: ``"sum"`` (summed
    loss, batch-size independent) or ``"original"`` (the original's mean loss per batch).

    Returns :class:`~loki_kernels.kfac.factors.Factors` with fp32 factors on their module's device
    (``A["{layer}.mlp"]`` shared by gate and up, ``A["{layer}.down"]``, ``G["{layer}.{module}"]``),
    ``n_tokens["{layer}"]`` and the collection settings. Bad arguments raise a one-line ``ValueError`` before
    any forward.
    """
    _check_choice("fisher", fisher, FISHERS)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_seed(seed)
    mlps = find_mlps(model)
    wanted = _check_layers(layers, len(mlps))
    names = _check_modules(modules)
    for layer in wanted:
        for name in names:
            _projection(model, mlps[layer], name)
    data = _check_batches(model, batches)

    accumulators: dict[str, dict[str, Tensor]] = {"A": {}, "G": {}}
    probes = []
    for layer in wanted:
        mlp = mlps[layer]
        reads_mlp = [name for name in names if name != "down"]
        if reads_mlp:  # one A for gate and up, taken from the first of them
            key = f"{layer}.mlp"
            module = _projection(model, mlp, reads_mlp[0])
            accumulators["A"][key] = _zeros(linear_shape(module)[0], _weight_device(module))
            probes.append(_Probe(module, on_input=_covariance_into(accumulators["A"][key])))
        for name in names:
            module = _projection(model, mlp, name)
            d_in, d_out = linear_shape(module)
            key = f"{layer}.{name}"
            accumulators["G"][key] = _zeros(d_out, _weight_device(module))
            on_input = None
            if name == "down":
                accumulators["A"][key] = _zeros(d_in, _weight_device(module))
                on_input = _covariance_into(accumulators["A"][key])
            probes.append(_Probe(module, on_input=on_input, on_grad=_covariance_into(accumulators["G"][key])))

    lowest = mlps[wanted[0]]
    leaf = lowest.module if names != ("down",) else lowest.down.module
    desc = f"K-FAC factors, layer{'s' if len(wanted) > 1 else ''} {_span(wanted)}"
    n = _run(model, data, probes, leaf, fisher=fisher, seed=seed, normalize=normalize, progress=progress, desc=desc)

    for kind in ("A", "G"):
        for tensor in accumulators[kind].values():
            symmetrize_(tensor).div_(n)
    settings = {
        "fisher": fisher, "seed": int(seed), "normalize": normalize, "layers": wanted, "modules": list(names),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batches": len(data), "sequences": sum(int(ids.shape[0]) for ids, _ in data),
        "positions": "t < T-1 with tokens t and t+1 real",
    }
    return Factors(A=accumulators["A"], G=accumulators["G"], n_tokens={str(layer): n for layer in wanted},
                   settings=settings)


def row_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layers: Optional[Iterable[int]] = None,
    fisher: str = "mc",
    seed: int = 0,
    progress: bool = True,
) -> RowScores:
    """Per-row curvature of every (or each listed) layer's ``down_proj``: :class:`RowScores` (``coupled``, ``diag_g``).

    Same pass, positions, summed loss, labels and seeding as :func:`collect_factors` (``diag_g`` equals the
    diagonal of its ``normalize="sum"`` ``G`` of ``down`` for the same data, fisher and seed). ``layers=None``:
    all decoder layers, so the scores are ``[L, H]``. Only the ``down_proj`` hooks run; no covariance is formed.
    """
    _check_choice("fisher", fisher, FISHERS)
    _check_seed(seed)
    mlps = find_mlps(model)
    wanted = list(range(len(mlps))) if layers is None else _check_layers(layers, len(mlps))
    data = _check_batches(model, batches)

    coupled = {layer: torch.zeros(mlps[layer].down.out_features, dtype=torch.float64,
                                  device=_weight_device(mlps[layer].down.module)) for layer in wanted}
    diag_g = {layer: torch.zeros_like(coupled[layer]) for layer in wanted}
    probes = []
    for layer in wanted:
        norms: dict[str, Tensor] = {}

        def on_input(x: Tensor, valid: Tensor, norms=norms) -> None:
            x = x[valid.to(x.device)].float()
            norms["a"] = (x * x).sum(dim=1)

        def on_grad(g: Tensor, valid: Tensor, norms=norms, layer=layer) -> None:
            g = g[valid.to(g.device)].float()
            g2 = g * g
            coupled[layer] += (g2.t() @ norms.pop("a")).double()
            diag_g[layer] += g2.sum(dim=0).double()

        probes.append(_Probe(mlps[layer].down.module, on_input=on_input, on_grad=on_grad))

    desc = f"row scores, layer{'s' if len(wanted) > 1 else ''} {_span(wanted)}"
    n = _run(model, data, probes, mlps[wanted[0]].down.module, fisher=fisher, seed=seed, normalize="sum",
             progress=progress, desc=desc)
    stack = lambda d: torch.stack([(d[layer] / n).cpu() for layer in wanted]).float()  # noqa: E731
    settings = {"fisher": fisher, "seed": int(seed), "layers": wanted, "batches": len(data),
                "model_type": getattr(getattr(model, "config", None), "model_type", None)}
    return RowScores(layers=wanted, coupled=stack(coupled), diag_g=stack(diag_g), n_tokens=n, settings=settings)


# ------------------------------------------------------------------------------------------------ the pass
@dataclass
class _Probe:
    """What to do with one module's input (``[B·T, d_in]``) and output gradient (``[B·T, d_out]``) per batch."""

    module: nn.Module
    on_input: Optional[Callable[[Tensor, Tensor], None]] = None
    on_grad: Optional[Callable[[Tensor, Tensor], None]] = None


def _covariance_into(out: Tensor) -> Callable[[Tensor, Tensor], None]:
    def update(x: Tensor, valid: Tensor) -> None:
        covariance_(out, x, valid.to(x.device))

    return update


def _run(model: nn.Module, data: list, probes: list[_Probe], leaf: nn.Module, *, fisher: str, seed: int,
         normalize: str, progress: bool, desc: str) -> int:
    """One forward+backward per batch with the probes' hooks on; returns the number of loss positions."""
    from tqdm.auto import tqdm

    if torch.is_inference_mode_enabled():
        raise RuntimeError("K-FAC collection needs gradients: call it outside torch.inference_mode()")
    device = _device(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    generator = torch.Generator().manual_seed(int(seed))
    batch: dict[str, Tensor] = {}
    saved = _ModelState(model)
    handles = []
    total = 0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

        def make_leaf(module, args, kwargs):
            if args:
                x = args[0].detach().requires_grad_(True)
                batch["leaf"] = x
                return (x, *args[1:]), kwargs
            name = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
            batch["leaf"] = kwargs[name] = kwargs[name].detach().requires_grad_(True)
            return args, kwargs

        handles.append(leaf.register_forward_pre_hook(make_leaf, with_kwargs=True))
        for probe in probes:
            handles.append(probe.module.register_forward_hook(_forward_hook(probe, batch)))

        with torch.enable_grad():
            for ids, mask in tqdm(data, desc=desc, unit="batch", disable=not progress):
                ids = ids.to(device)
                mask = None if mask is None else mask.to(device)
                valid = _loss_positions(ids, mask)
                count = int(valid.sum())
                if count == 0:
                    continue
                batch["valid"] = valid.reshape(-1)
                kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
                if mask is not None:
                    kwargs["attention_mask"] = mask.long()
                    if takes_positions:
                        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
                logits = model(**kwargs).logits
                logits = logits[valid.to(logits.device)].float()  # [count, vocab], row-major loss positions
                labels = _labels(ids, valid, logits, fisher, generator)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                if normalize == "original":
                    loss = loss / count
                if "leaf" not in batch:
                    raise RuntimeError("the lowest requested layer's MLP did not run in the forward pass")
                torch.autograd.grad(loss, batch.pop("leaf"))
                total += count
                del logits, loss
    finally:
        for handle in handles:
            handle.remove()
        batch.clear()
        saved.restore()
    return total


def _forward_hook(probe: _Probe, batch: dict):
    def hook(module, args, output):
        if probe.on_input is not None:
            x = args[0]
            probe.on_input(x.reshape(-1, x.shape[-1]), batch["valid"])
        if probe.on_grad is not None and isinstance(output, Tensor) and output.requires_grad:
            valid = batch["valid"]

            def on_grad(g: Tensor) -> None:
                probe.on_grad(g.reshape(-1, g.shape[-1]), valid)

            output.register_hook(on_grad)

    return hook


def _loss_positions(ids: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``bool[B, T]``: position ``t`` counts when ``t < T − 1`` and tokens ``t`` and ``t + 1`` are real."""
    valid = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    if mask is None:
        valid[:, :-1] = True
    else:
        real = mask.to(torch.bool)
        valid[:, :-1] = real[:, :-1] & real[:, 1:]
    return valid


def _labels(ids: Tensor, valid: Tensor, logits: Tensor, fisher: str, generator: torch.Generator) -> Tensor:
    if fisher == "empirical":
        return ids[:, 1:][valid[:, :-1]].to(logits.device)
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


class _ModelState:
    """Every module's training flag and every parameter's ``requires_grad``, to put back after the pass."""

    def __init__(self, model: nn.Module):
        self.training = [(m, m.training) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, flag in self.training:
            module.training = flag
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ checks
def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_layers(layers: Any, num_layers: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a list of decoder layer indices, got {layers!r}")
    result: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"layer index {layer!r} is not an integer")
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"unknown layer index {layer}: the model has {num_layers} decoder layers "
                             f"(0-{num_layers - 1})")
        if int(layer) in result:
            raise ValueError(f"layer {layer} is listed twice")
        result.append(int(layer))
    if not result:
        raise ValueError("layers is empty: name at least one decoder layer")
    return sorted(result)


def _check_modules(modules: Any) -> tuple[str, ...]:
    if isinstance(modules, str):
        modules = (modules,)
    names = []
    for name in modules:
        input_name(name)  # ValueError for an unknown module
        if name in names:
            raise ValueError(f"module {name!r} is listed twice")
        names.append(name)
    if not names:
        raise ValueError(f"modules is empty: name at least one of {', '.join(MODULES)}")
    return tuple(sorted(names, key=MODULES.index))


def _projection(model: nn.Module, mlp: MLP, name: str) -> nn.Module:
    part = getattr(mlp, name)
    if part is None:
        hint = " (its gate and up are one fused projection, or it has no gate: use modules=('up', 'down'))" \
            if name == "gate" else ""
        raise ValueError(f"{type(model).__name__} layer {mlp.layer} has no {name} projection{hint}")
    if linear_shape(part.module) is None:
        raise ValueError(f"{part.name} is not a linear layer ({type(part.module).__name__})")
    return part.module


def _check_batches(model: nn.Module, batches: Any) -> list[tuple[Tensor, Optional[Tensor]]]:
    """The batches as ``(input_ids, attention_mask or None)`` CPU/device tensors, all checked before any forward."""
    if batches is None or isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise ValueError(f"batches must be an iterable of dicts with 'input_ids', got {type(batches).__name__}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    data = []
    positions = 0
    for i, item in enumerate(batches):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            what = f"keys {sorted(map(str, item))}" if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(f"batch {i} has no 'input_ids' ({what})")
        ids = torch.as_tensor(item["input_ids"])
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"batch {i}: input_ids must be integer token ids of shape [batch, seq], "
                             f"got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            raise ValueError(f"batch {i}: token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        mask = item.get("attention_mask")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.shape != ids.shape:
                raise ValueError(f"batch {i}: attention_mask has shape {tuple(mask.shape)}, "
                                 f"input_ids {tuple(ids.shape)}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"batch {i}: attention_mask must hold 0 (pad) and 1 (token) only")
        positions += int(_loss_positions(ids, mask).sum())
        data.append((ids, mask))
    if not data:
        raise ValueError("no batches: the data is empty")
    if positions == 0:
        raise ValueError("the batches hold no loss position (a real token followed by a real token)")
    return data


# ------------------------------------------------------------------------------------------------ helpers
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _weight_device(module: nn.Module) -> torch.device:
    return module.weight.device


def _zeros(d: int, device: torch.device) -> Tensor:
    return torch.zeros(d, d, dtype=torch.float32, device=device)


def _span(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 6 else f"{layers[0]}..{layers[-1]} ({len(layers)})"
