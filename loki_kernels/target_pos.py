"""``target_pos``: which ``down_proj`` rows train, one list of row indices per decoder layer (LoKI's position JSON).

``target_pos`` is the whole model's selection (``[[row, ...] per layer]``, the original's name and JSON
format); one layer's sorted rows are its ``active_pos``. This module reads, writes and checks both.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Union

from .files import write_text_atomic

TargetPosLike = Union[str, os.PathLike, Mapping, Iterable]

__all__ = ["TargetPosLike", "check_target_pos", "load_target_pos", "save_target_pos", "check_active_pos"]


def load_target_pos(path: Union[str, os.PathLike]) -> Union[list, dict]:
    """Read a target_pos JSON file (a list of lists, or ``{layer: rows}``) without validating it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"target_pos file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"target_pos file {os.fspath(path)!r} is not valid JSON: {e}") from None


def check_target_pos(
    target_pos: TargetPosLike, num_layers: int, out_features: Union[int, list[int]]
) -> list[list[int]]:
    """Validate ``target_pos`` and return one sorted list of row indices per layer.

    ``target_pos`` is one list of rows per layer, a ``{layer: rows}`` dict (missing layers get no rows;
    keys are ints or their decimal strings, as JSON writes them, and one layer may not be named twice),
    or a path to a JSON file holding either. Every problem raises ``ValueError`` naming the layer and
    the offending value.
    """
    if isinstance(target_pos, (str, os.PathLike)):
        target_pos = load_target_pos(target_pos)
    sizes = out_features if isinstance(out_features, list) else [out_features] * num_layers

    if isinstance(target_pos, Mapping):
        per_layer: list = [[] for _ in range(num_layers)]
        named: dict[int, object] = {}
        for key, rows in target_pos.items():
            layer = _layer_key(key, num_layers)
            if layer in named:
                raise ValueError(f"target_pos names layer {layer} twice (keys {named[layer]!r} and {key!r})")
            named[layer] = key
            per_layer[layer] = rows
    elif isinstance(target_pos, Iterable) and not isinstance(target_pos, (bytes, str)):
        per_layer = list(target_pos)
        if len(per_layer) != num_layers:
            raise ValueError(f"target_pos has {len(per_layer)} layers, but the model has {num_layers} decoder layers")
    else:
        raise ValueError(
            f"target_pos must be a list of row lists, a {{layer: rows}} dict or a JSON path, "
            f"not {type(target_pos).__name__}"
        )
    return [check_active_pos(rows, sizes[layer], f"target_pos layer {layer}") for layer, rows in enumerate(per_layer)]


def _layer_key(key, num_layers: int) -> int:
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        layer = int(key)
    elif isinstance(key, numbers.Integral) and not isinstance(key, bool):
        layer = int(key)
    else:
        raise ValueError(f"target_pos key {key!r} is not a layer index")
    if not 0 <= layer < num_layers:
        raise ValueError(f"target_pos layer {layer} is out of range: the model has {num_layers} decoder layers")
    return layer


def check_active_pos(rows, size: int, where: str = "active_pos") -> list[int]:
    """Validate one layer's row indices (integers in [0, size), no duplicates) and return them sorted."""
    if hasattr(rows, "tolist"):  # numpy arrays and torch tensors
        rows = rows.tolist()
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise ValueError(f"{where}: expected a list of row indices, got {type(rows).__name__}")
    seen: set[int] = set()
    for value in rows:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{where}: row {value!r} is not an integer")
        row = int(value)
        if not 0 <= row < size:
            raise ValueError(f"{where}: row {row} is out of range [0, {size})")
        if row in seen:
            raise ValueError(f"{where}: row {row} is listed twice")
        seen.add(row)
    return sorted(seen)


def save_target_pos(target_pos, path: Union[str, os.PathLike]) -> None:
    """Write ``target_pos`` (one list of row indices per layer) as a JSON file.

    The format is the original's (``json.dump(target_pos, indent=4)``), plus a trailing newline. Rows keep
    their order (selection lists them most voted first). Every layer's rows must be non-negative integers
    without duplicates (``ValueError`` naming the layer and value otherwise); layers may be empty. Parent
    folders are created. The file is written to a temporary file next to ``path`` and renamed over it, so
    a failure never leaves a truncated or half-written file (an existing one stays as it was).
    """
    if hasattr(target_pos, "tolist"):  # a 2-D numpy array or torch tensor
        target_pos = target_pos.tolist()
    if isinstance(target_pos, (str, bytes, Mapping)) or not isinstance(target_pos, Iterable):
        raise ValueError(f"target_pos must be a list of row lists (one per layer), not {type(target_pos).__name__}")
    layers = [_row_list(rows, f"target_pos layer {layer}") for layer, rows in enumerate(target_pos)]
    if not layers:
        raise ValueError("target_pos must list at least one layer")
    text = json.dumps(layers, indent=4) + "\n"

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    write_text_atomic(path, text)


def _row_list(rows, where: str) -> list[int]:
    """``rows`` as Python ints in their given order, checked like :func:`check_active_pos` but with no upper bound."""
    if hasattr(rows, "tolist"):
        rows = rows.tolist()
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise ValueError(f"{where}: expected a list of row indices, got {type(rows).__name__}")
    rows = list(rows)
    for value in rows:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{where}: row {value!r} is negative")
    bound = max((int(v) for v in rows if isinstance(v, numbers.Integral) and not isinstance(v, bool)), default=-1)
    check_active_pos(rows, bound + 1, where)  # integers only, no duplicates
    return [int(v) for v in rows]
