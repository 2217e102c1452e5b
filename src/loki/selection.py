"""The original ``loki.selection`` API, on ``loki_kernels.selection`` and ``loki_kernels.formats``.

Same names and signatures as github.com/Nexround/LoKI; the semantics and the documented tie-breaking are
those of :mod:`loki_kernels.selection` (stable sorts, exact quotas, errors on NaN/inf). As in the original, a
quota too small to give any layer a row returns empty lists here (``loki_kernels.select_target_pos`` and
``loki select-nodes`` refuse it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from loki_kernels.formats import concat_attribution_files, read_attributions
from loki_kernels.selection import target_pos_from_counts, vote_counts
from loki_kernels.target_pos import save_target_pos

PathLike = Union[str, os.PathLike]

__all__ = [
    "select_trainable_nodes_layer_balanced",
    "select_trainable_nodes_global_lowest",
    "select_trainable_nodes_global_highest",
    "load_attributions_from_hdf5",
    "save_positions_to_json",
    "merge_hdf5_files",
]


def _select(attribution_scores, quota: float, strategy: str) -> list[list[int]]:
    return target_pos_from_counts(vote_counts(attribution_scores, quota, strategy), quota, strategy)


def select_trainable_nodes_layer_balanced(attribution_scores, quota: float) -> list[list[int]]:
    """Per layer, the ``floor(H·q/100)`` rows most often among each sample's lowest-attributed."""
    return _select(attribution_scores, quota, "layer_balanced")


def select_trainable_nodes_global_lowest(attribution_scores, quota: float) -> list[list[int]]:
    """The ``floor(L·H·q/100)`` rows, over all layers, most often among each sample's lowest."""
    return _select(attribution_scores, quota, "global_lowest")


def select_trainable_nodes_global_highest(attribution_scores, quota: float) -> list[list[int]]:
    """The ``floor(L·H·q/100)`` rows, over all layers, most often among each sample's highest."""
    return _select(attribution_scores, quota, "global_highest")


def load_attributions_from_hdf5(hdf5_path: PathLike) -> np.ndarray:
    """The whole ``[N, L, H]`` dataset in memory (the selection functions can also stream a path)."""
    return read_attributions(hdf5_path)


def save_positions_to_json(positions: list[list[int]], output_path: PathLike, create_dirs: bool = True) -> None:
    """Write a position JSON (``[[row, ...] per layer]``), atomically."""
    if not positions:
        raise ValueError("positions list cannot be empty")
    if not create_dirs and not Path(output_path).parent.exists():
        raise FileNotFoundError(f"directory {Path(output_path).parent} does not exist")
    save_target_pos(positions, output_path)


def merge_hdf5_files(input_dir: PathLike, output_file: PathLike) -> None:
    """Concatenate every ``*.h5`` file in ``input_dir`` (sorted by name) along the sample axis."""
    inputs = sorted(Path(input_dir).glob("*.h5"))
    if not inputs:
        raise ValueError(f"no .h5 files in {input_dir}")
    concat_attribution_files(inputs, output_file)
