"""``loki.selection``: the original project's unit-test cases for selection (tests/unit/test_selection.py,
rewritten here from their documented behaviour), run against our implementation of its API.

One documented difference shows here: where a quota rounds down to no row, the original API returns empty
lists (kept, ``test_tiny_quota_still_returns_one_list_per_layer``), while ``loki_kernels.select_target_pos``
and ``loki select-nodes`` refuse it.
"""

import numpy as np
import pytest

from loki.selection import (
    select_trainable_nodes_global_highest,
    select_trainable_nodes_global_lowest,
    select_trainable_nodes_layer_balanced,
)
from loki_kernels.selection import select_target_pos
from tests.conftest import SEED


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


# ------------------------------------------------------------------------------------ layer balanced
def test_layer_balanced_basic(rng):
    target_pos = select_trainable_nodes_layer_balanced(rng.random((10, 4, 8)), 50.0)
    assert len(target_pos) == 4
    assert all(len(rows) == 4 for rows in target_pos)  # int(8 * 50 / 100) per layer


def test_layer_balanced_quota_scaling(rng):
    scores = rng.random((20, 8, 16))
    total_10 = sum(map(len, select_trainable_nodes_layer_balanced(scores, 10.0)))
    total_50 = sum(map(len, select_trainable_nodes_layer_balanced(scores, 50.0)))
    assert total_10 == int(16 * 0.10) * 8 and total_50 == int(16 * 0.50) * 8
    assert total_50 > total_10


def test_layer_balanced_equal_across_layers(rng):
    target_pos = select_trainable_nodes_layer_balanced(rng.random((50, 10, 100)), 20.0)
    assert {len(rows) for rows in target_pos} == {20}


# --------------------------------------------------------------------------------------- global lowest
def test_global_lowest_basic(rng):
    target_pos = select_trainable_nodes_global_lowest(rng.random((10, 4, 8)), 25.0)
    assert len(target_pos) == 4
    assert sum(map(len, target_pos)) == int(4 * 8 * 0.25)


def test_global_lowest_can_be_unequal(rng):
    scores = np.zeros((20, 2, 10))
    scores[:, 0, :] = 0.1 + 0.01 * rng.random((20, 10))  # layer 0 low
    scores[:, 1, :] = 0.9 + 0.01 * rng.random((20, 10))  # layer 1 high
    target_pos = select_trainable_nodes_global_lowest(scores, 50.0)
    assert len(target_pos[0]) > len(target_pos[1])
    assert (len(target_pos[0]), len(target_pos[1])) == (10, 0)


# -------------------------------------------------------------------------------------- global highest
def test_global_highest_basic(rng):
    target_pos = select_trainable_nodes_global_highest(rng.random((10, 4, 8)), 25.0)
    assert len(target_pos) == 4
    assert sum(map(len, target_pos)) == int(4 * 8 * 0.25)


def test_global_highest_is_the_opposite_of_lowest(rng):
    scores = np.zeros((20, 4, 10))
    for layer in range(4):
        scores[:, layer, :] = layer * 0.3 + 0.01 * rng.random((20, 10))
    low = select_trainable_nodes_global_lowest(scores, 25.0)
    high = select_trainable_nodes_global_highest(scores, 25.0)
    assert len(low[0]) + len(low[1]) > len(high[0]) + len(high[1])
    assert [len(rows) for rows in low] == [10, 0, 0, 0] and [len(rows) for rows in high] == [0, 0, 0, 10]


# ---------------------------------------------------------------------------------------- edge cases
def test_tiny_quota_still_returns_one_list_per_layer(rng):
    scores = rng.random((10, 4, 8))
    assert select_trainable_nodes_layer_balanced(scores, 1.0) == [[], [], [], []]  # int(8 * 1 / 100) = 0
    with pytest.raises(ValueError, match="selects no row"):  # ours refuses it
        select_target_pos(scores, 1.0)


def test_full_quota(rng):
    target_pos = select_trainable_nodes_layer_balanced(rng.random((10, 4, 8)), 100.0)
    assert [sorted(rows) for rows in target_pos] == [list(range(8))] * 4


def test_single_sample(rng):
    scores = rng.random((1, 4, 8))
    target_pos = select_trainable_nodes_layer_balanced(scores, 50.0)
    assert len(target_pos) == 4
    for layer, rows in enumerate(target_pos):  # one sample: its 4 lowest rows per layer
        assert sorted(rows) == sorted(np.argsort(scores[0, layer], kind="stable")[:4].tolist())


def test_deterministic(rng):
    scores = rng.random((20, 8, 16))
    assert select_trainable_nodes_layer_balanced(scores, 30.0) == select_trainable_nodes_layer_balanced(scores, 30.0)
