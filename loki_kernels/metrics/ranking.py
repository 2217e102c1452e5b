"""nDCG@k of next-token rankings against the unedited model's, cached as a keyed baseline file.

See :mod:`loki_kernels.metrics` for the definition and where this differs from the original
(``metrics/ndcg_evaluator.py``, ``data/baseline_generator.py``: an int32 memmap without a key stored in it).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..files import atomic_write
from .common import check_batch_size, check_rows, evaluating, progress_bar

__all__ = ["NDCGBaseline", "model_hash", "tokens_hash", "ndcg_baseline", "save_ndcg_baseline", "load_ndcg_baseline",
           "check_ndcg_baseline", "ndcg_at_k", "ndcg"]

PathLike = Union[str, os.PathLike]
BASELINE_FORMAT = "loki-ndcg-baseline/1"


@dataclass
class NDCGBaseline:
    """The unedited model's top-k next-token ids at every scored position, ``int32[rows, seq_len − 1, k]``, and
    its key: what it was made for (``tokens_hash``, ``k``, ``seq_len``) and by (``model_hash``, ``model_dtype``)."""

    top_ids: Tensor
    k: int
    seq_len: int
    tokens_hash: str
    model_hash: str
    model_dtype: str
    path: Optional[Path] = None  # the file it was read from or written to

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "(in memory)"


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the model's parameters (names, dtypes, shapes, bytes), one tensor at a time."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
            digest.update(p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def tokens_hash(tokens: Tensor) -> str:
    """SHA-256 of a token matrix (shape and int64 values)."""
    digest = hashlib.sha256(f"{tuple(tokens.shape)};".encode())
    digest.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy())
    return digest.hexdigest()


def _top_ids(model: nn.Module, tokens: Tensor, k: int, batch_size: int, progress: bool, desc: str) -> Tensor:
    """The model's top-k ids at every position but the last of each row: ``int32[rows, seq_len − 1, k]``."""
    top = torch.empty((tokens.shape[0], tokens.shape[1] - 1, k), dtype=torch.int32)
    with evaluating(model) as device, progress_bar(math.ceil(len(tokens) / batch_size), desc, progress) as bar:
        for s in range(0, len(tokens), batch_size):
            logits = model(input_ids=tokens[s:s + batch_size].to(device)).logits[:, :-1]
            if k > logits.shape[-1]:
                raise ValueError(f"k = {k} is more than the model's {logits.shape[-1]} logits")
            top[s:s + batch_size] = logits.topk(k, dim=-1).indices.to("cpu", torch.int32)
            bar.update(1)
    return top


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def ndcg_baseline(model: nn.Module, tokens: Tensor, k: int = 10, batch_size: int = 8,
                  progress: bool = True) -> NDCGBaseline:
    """The (unedited) model's top-``k`` ids on ``tokens`` (``[rows, seq_len]`` ids), keyed for :func:`ndcg`."""
    _check_k(k)
    check_batch_size(batch_size)
    check_rows(tokens, "nDCG baseline")
    top = _top_ids(model, tokens, k, batch_size, progress, f"nDCG@{k} baseline")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return NDCGBaseline(top, k, tokens.shape[1], tokens_hash(tokens), model_hash(model), dtype)


def save_ndcg_baseline(baseline: NDCGBaseline, path: PathLike) -> Path:
    """Write ``baseline`` as a safetensors file (``top_ids``; the key in its metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": BASELINE_FORMAT, "k": str(baseline.k), "seq_len": str(baseline.seq_len),
                "tokens_hash": baseline.tokens_hash, "model_hash": baseline.model_hash,
                "model_dtype": baseline.model_dtype}
    atomic_write(path, lambda tmp: save_file({"top_ids": baseline.top_ids.contiguous()}, tmp, metadata=metadata))
    baseline.path = path
    return path


def load_ndcg_baseline(path: PathLike) -> NDCGBaseline:
    """Read a file written by :func:`save_ndcg_baseline`; a missing file is a ``FileNotFoundError``, anything
    else a ``ValueError``, both naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nDCG baseline not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, top = f.metadata() or {}, f.get_tensor("top_ids")
        if meta.get("format") != BASELINE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        baseline = NDCGBaseline(top, int(meta["k"]), int(meta["seq_len"]), meta["tokens_hash"], meta["model_hash"],
                                meta["model_dtype"], path)
    except Exception as e:  # safetensors raises its own error types on a damaged or foreign file
        raise ValueError(f"{path}: not an nDCG baseline file ({e})") from None
    if baseline.top_ids.ndim != 3 or tuple(baseline.top_ids.shape[1:]) != (baseline.seq_len - 1, baseline.k):
        raise ValueError(f"{path}: top_ids has shape {tuple(baseline.top_ids.shape)}, not [rows, "
                         f"{baseline.seq_len - 1}, {baseline.k}]")
    return baseline


def ndcg_at_k(predicted: Tensor, baseline: Tensor) -> Tensor:
    """Per-position nDCG of ranked ids ``predicted[..., k]`` against ``baseline[..., k]`` (distinct ids each):
    the r-th prediction has relevance ``k − b`` where it is the baseline's b-th id, 0 where it is absent.
    Float64, shape ``[...]``."""
    k = baseline.shape[-1]
    if predicted.shape != baseline.shape:
        raise ValueError(f"ndcg_at_k: predicted {tuple(predicted.shape)} and baseline {tuple(baseline.shape)} differ")
    gain = torch.arange(k, 0, -1, dtype=torch.float64)  # k − b for b = 0 .. k−1
    discount = torch.log2(torch.arange(k, dtype=torch.float64) + 2)  # log2(r + 2)
    same = predicted.long().unsqueeze(-1) == baseline.long().unsqueeze(-2)  # [..., r, b]
    relevance = (same.double() * gain).sum(-1)
    return (relevance / discount).sum(-1) / (gain / discount).sum()


def check_ndcg_baseline(baseline: Optional[NDCGBaseline], tokens: Tensor, k: int = 10) -> None:
    """``ValueError`` (naming the baseline's file) unless ``baseline`` was made for these ``tokens`` and ``k``:
    what :func:`ndcg` checks before scoring, for callers that want to know before loading a model."""
    if baseline is None:
        raise ValueError("nDCG needs a baseline made from the unedited model (ndcg_baseline); without one the "
                         "model would be scored against itself")
    wanted = {"k": k, "seq_len": tokens.shape[1], "rows": tokens.shape[0]}
    made = {"k": baseline.k, "seq_len": baseline.seq_len, "rows": baseline.top_ids.shape[0]}
    for key in wanted:
        if wanted[key] != made[key]:
            raise ValueError(f"nDCG baseline {baseline.source} was made for {key} = {made[key]}, not {wanted[key]}")
    if baseline.tokens_hash != tokens_hash(tokens):
        raise ValueError(f"nDCG baseline {baseline.source} was made for other tokens (hash "
                         f"{baseline.tokens_hash[:12]}, these {tokens_hash(tokens)[:12]})")


def ndcg(model: nn.Module, tokens: Tensor, baseline: Optional[NDCGBaseline], k: int = 10, batch_size: int = 8,
         progress: bool = True) -> float:
    """Mean nDCG@k of the model's next-token rankings on ``tokens`` against ``baseline`` (the unedited
    model's, :func:`ndcg_baseline`). Refuses a missing baseline, or one made for other tokens or another k,
    instead of scoring the model against itself."""
    _check_k(k)
    check_batch_size(batch_size)
    check_rows(tokens, "nDCG")
    check_ndcg_baseline(baseline, tokens, k)
    scores = ndcg_at_k(_top_ids(model, tokens, k, batch_size, progress, f"nDCG@{k}"), baseline.top_ids)
    return scores.mean().item()


