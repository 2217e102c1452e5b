"""K-FAC factor files: ours (one safetensors file per model) and the original's ``.pt`` files (read only).

Our layout, written by :func:`save_factors` and read by :func:`load_factors`:

* tensors ``A.{layer}.mlp`` (gate and up's shared input), ``A.{layer}.down`` and ``G.{layer}.{module}``
  (:mod:`loki_kernels.kfac.factors` keys with an ``A.``/``G.`` prefix), stored in their own dtype;
* metadata (strings): ``format`` = ``"loki-kfac-factors"``, ``version`` = ``"1"``, ``n_tokens`` (JSON
  ``{layer: count}``) and ``settings`` (JSON of :attr:`Factors.settings`).

A file is written to a temporary file in the same directory and moved into place with ``os.replace``, so a
failed write leaves no file (and an old file at the path untouched).

The original (``goodfire-ai/memorization_kfac``) writes one ``torch.save`` file per pass,
``kfac_factors_blk_{b1}_{b2}….pt``, holding ``{"blk{b}.{gate|up|down}": {"A", "G", "n_tokens"}}`` with mean-loss
factors (``normalize="original"``). Its gate and up entries hold the same ``A`` twice;
:func:`load_original_factors` keeps one and checks that they are equal.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..files import atomic_write
from .factors import MODULES, Factors, input_name

__all__ = ["FORMAT", "save_factors", "load_factors", "load_original_factors"]

FORMAT = "loki-kfac-factors"
VERSION = "1"
PathLike = Union[str, os.PathLike]
_KEY = re.compile(r"^(A|G)\.(\d+)\.(mlp|down|gate|up)$")
_ORIGINAL_KEY = re.compile(r"^blk(\d+)\.(gate|up|down)$")
# gate and up A of one block may differ by at most this (relative, Frobenius) and still be read as one
_SHARED_A_RTOL = 1e-5


def save_factors(factors: Factors, path: PathLike) -> Path:
    """Write ``factors`` to the safetensors file ``path`` (atomically) and return the path.

    Raises ``ValueError`` for keys outside the :mod:`~loki_kernels.kfac.factors` layout, non-tensor values,
    token counts that are not non-negative integers, and settings that are not JSON; nothing is written then.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for kind, table in (("A", factors.A), ("G", factors.G)):
        for key, tensor in table.items():
            name = f"{kind}.{key}"
            match = _KEY.match(name)
            if match is None or match.group(3) not in (("mlp", "down") if kind == "A" else MODULES):
                raise ValueError(f"factor key {kind}[{key!r}] is not '<layer>.<module>' "
                                 f"(A: mlp or down; G: {', '.join(MODULES)})")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"factor {name} is a {type(tensor).__name__}, not a tensor")
            tensors[name] = tensor.detach().to("cpu").contiguous()
    counts = {}
    for layer, count in factors.n_tokens.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"n_tokens[{layer!r}] must be a non-negative integer, got {count!r}")
        counts[str(layer)] = int(count)
    try:
        settings = json.dumps(factors.settings, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"factor settings are not JSON-serialisable: {e}") from None
    metadata = {"format": FORMAT, "version": VERSION, "n_tokens": json.dumps(counts, sort_keys=True),
                "settings": settings}

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_factors(path: PathLike, *, device: Union[str, torch.device] = "cpu") -> Factors:
    """Read a file written by :func:`save_factors` (tensors in their stored dtype, on ``device``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"K-FAC factor file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is not a K-FAC factor file (metadata format is "
                                 f"{metadata.get('format')!r}, expected {FORMAT!r})")
            if metadata.get("version") != VERSION:
                raise ValueError(f"{path}: unsupported K-FAC factor file version {metadata.get('version')!r}")
            factors = Factors(n_tokens={k: int(v) for k, v in json.loads(metadata["n_tokens"]).items()},
                              settings=json.loads(metadata["settings"]))
            for name in f.keys():
                match = _KEY.match(name)
                if match is None:
                    raise ValueError(f"{path}: unexpected tensor {name!r} in a K-FAC factor file")
                kind, layer, module = match.groups()
                getattr(factors, kind)[f"{layer}.{module}"] = f.get_tensor(name)
    except (SafetensorError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} is not a readable K-FAC factor file: {e}") from None
    return factors


def load_original_factors(path_or_paths: Union[PathLike, Iterable[PathLike]]) -> Factors:
    """Read the original's ``kfac_factors_blk_*.pt`` file(s) into one :class:`Factors` (on the CPU).

    ``path_or_paths``: one file, or several (one per pass); a block found in two files is an error. Gate and
    up of a block share one ``A`` here: when both are present they must be equal (bitwise, or within a relative
    ``1e-5``, with a warning naming the block; gate's is kept), otherwise ``ValueError``. The three entries of a
    block must have the same ``n_tokens``. Settings record ``normalize="original"`` and the source files.
    """
    paths = [Path(path_or_paths)] if isinstance(path_or_paths, (str, os.PathLike)) else \
        [Path(p) for p in path_or_paths]
    if not paths:
        raise ValueError("no original factor file given")
    entries: dict[int, dict[str, dict]] = {}
    source: dict[int, Path] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"original K-FAC factor file {path} does not exist")
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a file that is not a checkpoint
            raise ValueError(f"{path} is not a readable torch file: {e}") from None
        if not isinstance(content, dict) or not content:
            raise ValueError(f"{path} does not hold the original layout {{'blk<b>.<proj>': {{'A', 'G', 'n_tokens'}}}}")
        for key, entry in content.items():
            match = _ORIGINAL_KEY.match(str(key))
            if match is None or not isinstance(entry, dict) or not {"A", "G", "n_tokens"} <= set(entry):
                raise ValueError(f"{path}: entry {key!r} is not 'blk<b>.<gate|up|down>' with A, G and n_tokens")
            block, module = int(match.group(1)), match.group(2)
            if block in source and source[block] != path:
                raise ValueError(f"block {block} is in two files: {source[block]} and {path}")
            source[block] = path
            entries.setdefault(block, {})[module] = entry

    factors = Factors(settings={"normalize": "original", "source": "memorization_kfac",
                                "files": [str(p) for p in paths]})
    for block in sorted(entries):
        modules = entries[block]
        counts = {m: _count(e["n_tokens"], block, m) for m, e in modules.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"block {block}: n_tokens differ between modules ({counts})")
        factors.n_tokens[str(block)] = next(iter(counts.values()))
        for module in sorted(modules, key=MODULES.index):
            factors.G[f"{block}.{module}"] = _tensor(modules[module]["G"], block, module, "G")
            key = f"{block}.{input_name(module)}"
            a = _tensor(modules[module]["A"], block, module, "A")
            if key not in factors.A:
                factors.A[key] = a
            else:  # up after gate: the same input, stored twice by the original
                _check_shared(factors.A[key], a, block)
    return factors


def _check_shared(gate: torch.Tensor, up: torch.Tensor, block: int) -> None:
    if gate.shape == up.shape and torch.equal(gate, up):
        return
    if gate.shape != up.shape:
        raise ValueError(f"block {block}: gate and up A have different shapes {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}, but read the same input")
    diff = ((gate.double() - up.double()).norm() / gate.double().norm().clamp_min(1e-300)).item()
    if diff > _SHARED_A_RTOL:
        raise ValueError(f"block {block}: gate and up A differ (relative difference {diff:.3g}), "
                         f"but read the same input")
    warnings.warn(f"block {block}: gate and up A are not bitwise equal (relative difference {diff:.3g}); "
                  f"keeping gate's", stacklevel=3)


def _tensor(value: Any, block: int, module: str, kind: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != value.shape[1]:
        raise ValueError(f"block {block} {module}: {kind} is not a square matrix")
    return value


def _count(value: Any, block: int, module: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"block {block} {module}: n_tokens is {value!r}, not a non-negative integer")
    return int(value)
