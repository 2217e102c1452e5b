"""Memorisation: greedy continuation of prefix → suffix windows, scored by token-level Levenshtein distance.

See :mod:`loki_kernels.metrics` for the definitions and where this differs from the original
(``metrics/levenshtein_metrics.py``: ``compute_memorization_metrics_fixed_ids`` / ``..._levenshtein``).
"""

from __future__ import annotations

import inspect
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .common import check_batch_size, evaluating, progress_bar

__all__ = ["DEFAULT_LOOSE", "Window", "MemorizationResult", "load_memorization_windows", "levenshtein",
           "greedy_suffixes", "memorization"]

DEFAULT_LOOSE = 0.75  # loose_acc: similarity 1 − d/L at least this (d ≤ 12 of 48)
PathLike = Union[str, os.PathLike]


class Window(NamedTuple):
    """One memorisation probe: the model is given ``prefix`` and should continue with ``suffix`` (token ids)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


@dataclass
class MemorizationResult:
    """:func:`memorization`'s numbers (the original's keys first) and, per window in input order, ``d``, ``L``
    and the generated suffix."""

    strict_acc: float
    loose_acc: float
    avg_levenshtein_norm: float
    total: int
    strict: int
    loose: int
    loose_threshold: float
    distances: list[int] = field(default_factory=list)
    suffix_lengths: list[int] = field(default_factory=list)
    generated: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def load_memorization_windows(path: PathLike, tokenizer=None) -> list[Window]:
    """Windows from a JSONL file in either of the original's formats, line by line:

    * ``{"prefix_ids": [...], "suffix_ids": [...]}`` (the Dolma windows, e.g. 64 + 48 token ids), or
    * ``{"prefix": "...", "target_suffix": "..."}`` (the quotes set; ``prefix_text``, ``suffix``,
      ``suffix_text`` as the original's reader accepts), tokenized with ``tokenizer``, no special tokens.

    A line that is neither, an empty prefix or suffix, or a file with no windows is a ``ValueError`` naming
    the file and line (the original skipped such lines, and windows of other lengths, silently).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"memorisation file not found: {path}")
    windows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            windows.append(_window(record, tokenizer, where))
    if not windows:
        raise ValueError(f"{path}: no memorisation windows")
    return windows


def _window(record, tokenizer, where: str) -> Window:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with prefix_ids/suffix_ids or prefix/target_suffix")
    if "prefix_ids" in record or "suffix_ids" in record:
        parts = [record.get("prefix_ids"), record.get("suffix_ids")]
        if not all(isinstance(p, list) and all(type(t) is int and t >= 0 for t in p) for p in parts):
            raise ValueError(f"{where}: prefix_ids and suffix_ids must be lists of token ids")
    else:
        texts = [record.get("prefix") or record.get("prefix_text"),
                 record.get("target_suffix") or record.get("suffix") or record.get("suffix_text")]
        if not all(isinstance(t, str) and t for t in texts):
            raise ValueError(f"{where}: expected prefix_ids/suffix_ids, or prefix/target_suffix text")
        if tokenizer is None:
            raise ValueError(f"{where}: text windows need a tokenizer")
        parts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not parts[0] or not parts[1]:
        raise ValueError(f"{where}: empty {'prefix' if not parts[0] else 'suffix'}")
    return Window(tuple(parts[0]), tuple(parts[1]))


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Token-level edit distance (insertions, deletions, substitutions) between two id sequences."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(list(a), list(b)))


def greedy_suffixes(model: nn.Module, prefixes: Sequence[Sequence[int]], length: int) -> Tensor:
    """The model's greedy continuation of each prefix, exactly ``length`` tokens (EOS does not stop it):
    ``long[len(prefixes), length]`` on the CPU. One batch: prefixes are left-padded, with an attention mask
    and position ids that count real tokens only. Uses the KV cache when the model returns one. Runs in eval
    and inference mode."""
    if not prefixes or not all(len(p) for p in prefixes):
        raise ValueError("greedy_suffixes: needs at least one prefix, each of at least one token")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"greedy_suffixes: length must be a positive integer, got {length!r}")
    with evaluating(model) as device:
        return _greedy(model, prefixes, length, device)


def _greedy(model: nn.Module, prefixes: Sequence[Sequence[int]], length: int, device: torch.device) -> Tensor:
    width = max(map(len, prefixes))
    ids = torch.zeros((len(prefixes), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    params = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"  # transformers ≥ 5.x renamed it
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    step_ids, step_positions, cache, new = ids, positions, None, []
    for _ in range(length):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
                    **{cache_name: cache}, **keep)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        cache = getattr(out, "cache", None)
        cache = getattr(out, "past_key_values", None) if cache is None else cache
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        ids = torch.cat([ids, token], 1)
        step_ids, step_positions = (ids, positions) if cache is None else (token, positions[:, -1:])
    return torch.cat(new, 1).cpu()


def memorization(model: nn.Module, windows: Sequence[Window], batch_size: int = 32, loose: float = DEFAULT_LOOSE,
                 progress: bool = True) -> MemorizationResult:
    """Strict / loose accuracy and mean normalised Levenshtein distance of greedy suffixes (see the package
    docstring).

    Windows are grouped by suffix length ``L`` (each batch generates one ``L``) and sorted by prefix length
    within a group to pad little; results are reported in input order. Runs in eval and inference mode on
    the model's device and dtype. Similarity is ``1 − d/L`` compared as the original does, so at the default
    0.75 a 48-token suffix is loose up to ``d = 12``; strict matches count as loose.
    """
    check_batch_size(batch_size)
    if not 0.0 <= loose <= 1.0:
        raise ValueError(f"loose must be in [0, 1], got {loose}")
    if not windows:
        raise ValueError("memorization: no windows")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    for i, w in enumerate(windows):
        if not w.prefix or not w.suffix:
            raise ValueError(f"memorization: window {i} has an empty {'prefix' if not w.prefix else 'suffix'}")
        low, high = min(min(w.prefix), min(w.suffix)), max(max(w.prefix), max(w.suffix))
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"memorization: window {i} has token id {low if low < 0 else high}, outside the "
                             f"model's vocabulary [0, {vocab if vocab is not None else 'vocab'})")
    groups = defaultdict(list)
    for i, w in enumerate(windows):
        groups[len(w.suffix)].append(i)
    batches = []
    for length, idx in sorted(groups.items()):
        idx.sort(key=lambda i: len(windows[i].prefix))
        batches += [(length, idx[s:s + batch_size]) for s in range(0, len(idx), batch_size)]
    generated: list[Optional[list[int]]] = [None] * len(windows)
    with evaluating(model), progress_bar(len(batches), "memorisation", progress) as bar:
        for length, idx in batches:
            for i, row in zip(idx, greedy_suffixes(model, [windows[i].prefix for i in idx], length).tolist()):
                generated[i] = row
            bar.update(1)
    distances = [levenshtein(g, w.suffix) for g, w in zip(generated, windows)]
    lengths = [len(w.suffix) for w in windows]
    strict = sum(g == list(w.suffix) for g, w in zip(generated, windows))
    loose_count = sum(d == 0 or 1.0 - d / n >= loose for d, n in zip(distances, lengths))
    total = len(windows)
    return MemorizationResult(
        strict_acc=strict / total, loose_acc=loose_count / total,
        avg_levenshtein_norm=sum(d / n for d, n in zip(distances, lengths)) / total, total=total, strict=strict,
        loose=loose_count, loose_threshold=loose, distances=distances, suffix_lengths=lengths, generated=generated)


