"""Choose LoKI's trainable ``down_proj`` rows from KVA attributions by per-sample voting.

Same semantics as the original ``src/loki/selection`` (and the notebooks the paper used):

- ``attributions[t, l, j]`` is the **signed** attribution of row ``j`` of layer ``l``'s ``down_proj`` on sample ``t``.
  Nothing takes ``abs`` or averages over samples; low means most *negative*.
- Each sample votes for rows; the rows with the most votes are chosen.

  - ``layer_balanced`` (LoKI's default): per sample and layer, a vote for the ``k`` lowest rows of that
    layer; per layer, the ``k`` most voted rows. ``k = floor(H * q / 100)`` (:func:`layer_quota`).
  - ``global_lowest`` / ``global_highest`` (the paper's G-L / G-H ablations): per sample, a vote for the
    ``T`` lowest / highest of all ``L * H`` values; the ``T`` most voted rows over all layers, regrouped
    per layer, so layers get uneven (possibly zero) counts. ``T = floor(L * H * q / 100)`` (:func:`total_quota`).

- Output: one list of Python ints per layer, ordered by descending vote count (not sorted), as in the
  original target_pos JSONs.

Tie-breaking (deterministic, independent of chunking, device and library build):

- within a sample, equal attributions go to the **lower** index first, for ``*_lowest`` and ``global_highest``
  alike, i.e. the votes go to the first ``k`` of a stable ascending (descending) sort; in the flattened
  ranking of the global strategies the index is ``l * H + j``. ``-0.0`` and ``0.0`` are equal;
- in the final ranking, equal vote counts go to the **higher** index first. For the global strategies this
  is exactly the original ``argsort(count.flatten(), kind="stable")[::-1][:T]``; for ``layer_balanced``
  the original used numpy's default (unstable) sort there, whose tie order depends on the numpy build, and
  the same higher-index-first rule is used here.

Differences from the original code:

- the original min-max normalised each sample (per layer, or over all layers) before ranking. That map is
  monotone, so it is skipped and raw attributions are ranked. It can still differ from the original where float
  rounding of the normalisation merged two nearly equal values into a tie (notably with float16 data,
  which the original normalised in float16), and where ``max == min`` (all values become 0 there, and its
  unstable sort picked an arbitrary order; here all values tie and the lower index comes first);
- the original per-sample sorts were numpy's default, unstable ones; here they are stable (rule above);
- ``k`` and ``T`` are computed exactly (rational arithmetic), not in floats. The original
  ``int((1 / L) * (L * H * q / 100))`` equals ``floor(H * q / 100)`` for all its shipped settings
  (Llama-3.1-8B 409/819/1228 at q = 10/20/30, Qwen2.5-0.5B 44/89/179/268 at q = 5/10/20/30) but not always:
  L = 49, H = 1024, q = 100 gives 1023 there, 1024 here;
- NaN/inf attributions raise ``ValueError`` instead of being ranked, and an empty attribution array is an error;
- attributions are processed ``chunk_size`` samples at a time, so an HDF5 file need not fit in memory; a
  sample's ``k`` lowest are found with ``topk`` plus explicit tie handling (the stable sort's set, without
  sorting).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = [
    "STRATEGIES", "select_target_pos", "vote_counts", "target_pos_from_counts", "target_pos_from_scores", "layer_quota",
    "total_quota",
]

STRATEGIES = ("layer_balanced", "global_lowest", "global_highest")


# ------------------------------------------------------------------------------------------------ quotas
def layer_quota(hidden_size: int, quota: float) -> int:
    """Rows per layer for ``layer_balanced``: ``floor(hidden_size * quota / 100)``, computed exactly.

    ``quota`` is read as the decimal it prints as (``12.3`` is 123/10, not the nearest binary float).
    """
    return int(hidden_size * _exact(quota) // 100)


def total_quota(num_layers: int, hidden_size: int, quota: float) -> int:
    """Rows over all layers for the global strategies: ``floor(num_layers * hidden_size * quota / 100)``."""
    return int(num_layers * hidden_size * _exact(quota) // 100)


def _exact(quota: float) -> Fraction:
    _check_quota(quota)
    return Fraction(repr(float(quota))) if not isinstance(quota, numbers.Integral) else Fraction(int(quota))


def _votes_per_sample(strategy: str, num_layers: int, hidden: int, quota: float) -> int:
    """Rows one sample votes for: ``k`` per layer (``layer_balanced``) or ``T`` over all layers (global)."""
    return layer_quota(hidden, quota) if strategy == "layer_balanced" else total_quota(num_layers, hidden, quota)


def _smallest_quota(rows: int) -> float:
    """The smallest quota with at most 4 decimals that selects one of ``rows`` rows."""
    return math.ceil(100 / rows * 10**4) / 10**4


def _check_quota(quota: Any) -> None:
    if isinstance(quota, bool) or not isinstance(quota, numbers.Real):
        raise ValueError(f"quota must be a percentage in (0, 100], got {quota!r}")
    if not (math.isfinite(quota) and 0 < quota <= 100):
        raise ValueError(f"quota must be a percentage in (0, 100], got {quota!r}")


def _check_strategy(strategy: Any) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


# ------------------------------------------------------------------------------------------------ public
def select_target_pos(
    attributions: Any,
    quota: float,
    strategy: str = "layer_balanced",
    *,
    chunk_size: int = 256,
    progress: bool = False,
) -> list[list[int]]:
    """Trainable rows per layer (``list[L]`` of Python ints, most voted first) from KVA ``attributions``.

    ``attributions`` is ``[N, L, H]`` signed attributions: a numpy array, a torch tensor (processed on its
    device), an h5py Dataset, anything else with ``.shape`` and slicing, or the path of an attribution
    HDF5 file (dataset ``"dataset"``, read ``chunk_size`` samples at a time; never loaded whole).
    ``quota`` is a percentage in (0, 100]; ``strategy`` one of :data:`STRATEGIES`. See the module
    docstring for the semantics and tie-breaking. ``progress=True`` shows a tqdm bar over samples.

    Raises ``ValueError`` for a bad quota or strategy, a quota so small that it selects no row at all (the
    original returned empty lists), attributions that are not 3-D or empty, and NaN/inf attributions (naming
    the sample, layer and row).
    """
    _check_quota(quota)
    _check_strategy(strategy)
    if isinstance(attributions, (str, os.PathLike)):
        from .formats import open_attributions

        with open_attributions(attributions) as dset:
            return select_target_pos(dset, quota, strategy, chunk_size=chunk_size, progress=progress)
    counts = _vote_counts(attributions, quota, strategy, chunk_size, progress)
    num_layers, hidden = counts.shape
    if _votes_per_sample(strategy, num_layers, hidden, quota) == 0:
        rows, of = (hidden, "a layer") if strategy == "layer_balanced" else (num_layers * hidden, "all layers")
        raise ValueError(f"quota {quota:g}% selects no row: it is less than one of the {rows} rows of {of} "
                         f"(the smallest quota that selects one is {_smallest_quota(rows):g}%)")
    return target_pos_from_counts(counts, quota, strategy)


def vote_counts(
    attributions: Any,
    quota: float,
    strategy: str = "layer_balanced",
    *,
    chunk_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """The ``[L, H]`` int64 matrix of votes: how many samples put each row among their lowest (highest).

    Same inputs as :func:`select_target_pos`, which is ``target_pos_from_counts(vote_counts(...))``.
    Counts of disjoint sample sets add up, so shards can be counted separately and summed.
    """
    _check_quota(quota)
    _check_strategy(strategy)
    if isinstance(attributions, (str, os.PathLike)):
        from .formats import open_attributions

        with open_attributions(attributions) as dset:
            return vote_counts(dset, quota, strategy, chunk_size=chunk_size, progress=progress)
    return _vote_counts(attributions, quota, strategy, chunk_size, progress).cpu().numpy()


def target_pos_from_counts(counts: Any, quota: float, strategy: str = "layer_balanced") -> list[list[int]]:
    """The final ranking: the most voted rows of an ``[L, H]`` vote matrix, ties to the higher index.

    ``layer_balanced``: the ``k`` most voted rows of each layer. Global strategies: the ``T`` most voted
    rows over all layers (flat index ``l * H + j``), regrouped per layer in ranking order.
    """
    _check_quota(quota)
    _check_strategy(strategy)
    counts = torch.as_tensor(counts)
    if counts.ndim != 2:
        raise ValueError(f"vote counts must be 2-D [layers, hidden_size], got shape {tuple(counts.shape)}")
    num_layers, hidden = counts.shape
    if strategy == "layer_balanced":
        k = layer_quota(hidden, quota)
        # stable ascending sort, reversed: descending counts, equal counts to the higher index first
        order = torch.argsort(counts, dim=1, stable=True).flip(1)[:, :k]
        return order.tolist()
    chosen = torch.argsort(counts.reshape(-1), stable=True).flip(0)[: total_quota(num_layers, hidden, quota)]
    result: list[list[int]] = [[] for _ in range(num_layers)]
    for flat in chosen.tolist():
        result[flat // hidden].append(flat % hidden)
    return result


def target_pos_from_scores(scores: Any, quota: float, strategy: str = "layer_lowest") -> list[list[int]]:
    """Rows chosen by one score per row (an ``[L, H]`` tensor or array, e.g. K-FAC row curvature), no voting.

    ``strategy``: ``"layer_lowest"`` / ``"layer_highest"``: the ``k = floor(H * q / 100)`` rows of each layer
    with the lowest / highest scores (:func:`layer_quota`; ``layer_balanced``'s rule on one value per row);
    ``"global_lowest"`` / ``"global_highest"``: the ``T = floor(L * H * q / 100)`` lowest / highest of all
    ``L * H`` scores (:func:`total_quota`), regrouped per layer (uneven, possibly empty layers). Each layer's
    list is in ranking order (most extreme first); equal scores go to the lower index first (the flat index
    ``l * H + j`` for the global strategies). Raises ``ValueError`` for scores that are not 2-D, empty or not
    finite, an unknown strategy, a bad quota, or a quota that selects no row.
    """
    choices = ("layer_lowest", "layer_highest", "global_lowest", "global_highest")
    if strategy not in choices:
        raise ValueError(f"unknown score selection strategy {strategy!r}; choose one of {', '.join(choices)}")
    _check_quota(quota)
    scores = torch.as_tensor(scores).detach().cpu()
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty 2-D [layers, hidden_size] array, got shape {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        layer, row = (int(i) for i in torch.nonzero(~torch.isfinite(scores))[0])
        raise ValueError(f"score of layer {layer}, row {row} is {scores[layer, row].item()}: scores must be finite")
    num_layers, hidden = scores.shape
    per_layer = strategy.startswith("layer_")
    count = layer_quota(hidden, quota) if per_layer else total_quota(num_layers, hidden, quota)
    if count == 0:
        rows, of = (hidden, "a layer") if per_layer else (num_layers * hidden, "all layers")
        raise ValueError(f"quota {quota:g}% selects no row: it is less than one of the {rows} rows of {of} "
                         f"(the smallest quota that selects one is {_smallest_quota(rows):g}%)")
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    descending = strategy.endswith("_highest")
    if per_layer:  # a stable sort keeps equal scores in index order, descending or not
        return torch.argsort(scores, dim=1, descending=descending, stable=True)[:, :count].tolist()
    chosen = torch.argsort(scores.reshape(-1), descending=descending, stable=True)[:count]
    result: list[list[int]] = [[] for _ in range(num_layers)]
    for flat in chosen.tolist():
        result[flat // hidden].append(flat % hidden)
    return result


# ------------------------------------------------------------------------------------------------ voting
def _vote_counts(attributions: Any, quota: float, strategy: str, chunk_size: int, progress: bool) -> torch.Tensor:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    array_like = hasattr(attributions, "shape") and hasattr(attributions, "__getitem__")
    if not isinstance(attributions, torch.Tensor) and not array_like:
        attributions = np.asarray(attributions)
    shape = tuple(int(s) for s in attributions.shape)
    if len(shape) != 3:
        raise ValueError(f"attributions must be 3-D [samples, layers, hidden_size], got shape {shape}")
    num_samples, num_layers, hidden = shape
    if 0 in shape:
        raise ValueError(f"attributions are empty (shape {shape}): nothing to select from")

    device = attributions.device if isinstance(attributions, torch.Tensor) else torch.device("cpu")
    counts = torch.zeros(num_layers, hidden, dtype=torch.int64, device=device)
    k = _votes_per_sample(strategy, num_layers, hidden, quota)
    if k == 0:  # the quota rounds to no row: nobody votes (the original returns empty lists too)
        return counts

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_samples, desc=f"selecting ({strategy}, q={quota:g}%)", unit="sample")
    try:
        for start, chunk in _chunks(attributions, num_samples, chunk_size, device):
            _check_finite(chunk, start)
            if strategy == "layer_balanced":  # per sample and layer, the k lowest of H values
                votes = _extreme_k(chunk, k, largest=False)
            else:  # per sample, the k lowest / highest of all L * H values
                flat = chunk.reshape(chunk.shape[0], -1)
                votes = _extreme_k(flat, k, largest=strategy == "global_highest").view_as(chunk)
            counts += votes.sum(dim=0)
            if bar is not None:
                bar.update(chunk.shape[0])
    except BaseException:
        if bar is not None:
            bar.leave = False  # erase the unfinished bar, so that only the error is left on the terminal
        raise
    finally:
        if bar is not None:
            bar.close()
    return counts


def _extreme_k(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Mask of the ``k`` lowest (``largest``: highest) entries of each row of ``x``, ties to the lower index.

    The same set as the first ``k`` of a stable ascending (descending) sort, found in O(n) per row: a
    ``topk`` gives the boundary value, everything strictly beyond it is in, and of the entries equal to
    it the lowest-indexed ones fill the remaining places.
    """
    n = x.shape[-1]
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    kth = torch.topk(x, k, dim=-1, largest=largest, sorted=False).values
    boundary = kth.amin(dim=-1, keepdim=True) if largest else kth.amax(dim=-1, keepdim=True)
    beyond = x > boundary if largest else x < boundary
    at = x == boundary
    mask = beyond | at
    if bool((mask.sum(dim=-1) == k).all()):  # no row has surplus ties at its boundary
        return mask
    room = k - beyond.sum(dim=-1, keepdim=True)
    return beyond | (at & (at.cumsum(dim=-1) <= room))


def _chunks(
    attributions: Any, num_samples: int, chunk_size: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, samples start:start+chunk_size)`` as tensors on ``device``; float16/bfloat16 widened to float32."""
    for start in range(0, num_samples, chunk_size):
        stop = min(start + chunk_size, num_samples)
        try:
            block = attributions[start:stop]
        except (OSError, RuntimeError) as e:  # h5py: a damaged file that opens but cannot be read
            name = getattr(getattr(attributions, "file", None), "filename", None)
            source = f"attribution file {name!r}" if name else "the attributions"
            raise ValueError(f"cannot read samples {start}-{stop - 1} of {source} (damaged?): {e}") from None
        if isinstance(block, torch.Tensor):
            chunk = block.detach()
        else:
            array = np.asarray(block)
            if array.dtype.kind not in "fiu":
                raise ValueError(f"attributions must be real numbers, got dtype {array.dtype}")
            chunk = torch.from_numpy(np.ascontiguousarray(array))
        if chunk.is_complex() or chunk.dtype == torch.bool:
            raise ValueError(f"attributions must be real numbers, got dtype {chunk.dtype}")
        if chunk.dtype in (torch.float16, torch.bfloat16):  # exact widening; some sorts lack half support
            chunk = chunk.float()
        yield start, chunk.to(device)


def _check_finite(chunk: torch.Tensor, start: int) -> None:
    if not chunk.is_floating_point():
        return
    finite = torch.isfinite(chunk)
    if bool(finite.all()):
        return
    t, layer, row = (int(i) for i in torch.nonzero(~finite)[0])
    raise ValueError(
        f"attribution of sample {start + t}, layer {layer}, row {row} is {chunk[t, layer, row].item()}: "
        f"attributions must be finite (found NaN/inf)"
    )
