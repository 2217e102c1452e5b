"""Vote-based row selection against a slow, obviously correct pure-Python version, plus its properties.

Data is fresh on every run (seeded from LOKI_TEST_SEED, see tests/conftest.py) and deliberately full of
ties: scores rounded to one decimal, cast to float16, small integers, constant samples.
"""

import math
import re
import zlib
from fractions import Fraction

import h5py
import numpy as np
import pytest
import torch

from loki_kernels.selection import (
    STRATEGIES,
    layer_quota,
    target_pos_from_counts,
    select_target_pos,
    total_quota,
    vote_counts,
)
from tests.conftest import SEED

KINDS = ["randn", "decimal", "float16", "small_int", "constant_samples"]


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def make_scores(rng, kind, n=None, layers=3, hidden=None):
    n = n or int(rng.integers(7, 21))
    hidden = hidden or int(rng.integers(10, 51))
    x = rng.standard_normal((n, layers, hidden))
    if kind == "decimal":
        x = x.round(1)
    elif kind == "float16":
        x = (x * 1e-4).astype(np.float16)  # tiny values: float16 storage creates ties
    elif kind == "small_int":
        x = rng.integers(-3, 4, size=x.shape).astype(np.float32)
        x[(x == 0) & (rng.random(x.shape) < 0.5)] = -0.0  # -0.0 and 0.0 tie
    elif kind == "constant_samples":
        x = x.round(1).astype(np.float32)
        x[::3] = 0.5  # max == min: every value of those samples ties
    else:
        x = x.astype(np.float32)
    return x


# ------------------------------------------------------------------------------ slow reference
def _select_or_empty(scores, quota, strategy, **kwargs):
    """select_target_pos, or the original's empty lists where the quota selects no row (which we refuse)."""
    try:
        return select_target_pos(scores, quota, strategy, **kwargs)
    except ValueError as e:
        assert "selects no row" in str(e)
        return [[] for _ in range(scores.shape[1])]


def slow_select(scores, quota, strategy, normalise=False):
    """Loops over samples and layers; ties: lower index within a sample, higher index in the final ranking.

    ``normalise=True`` applies the original's per-sample min-max normalisation first (only used on data
    where it cannot concatenate distinct values, to show it does not change the result).
    """
    q = Fraction(str(quota))
    n, layers, hidden = scores.shape
    s = scores.astype(np.float64).tolist()
    if strategy == "layer_balanced":
        k = math.floor(hidden * q / 100)
        counts = [[0] * hidden for _ in range(layers)]
        for t in range(n):
            for layer in range(layers):
                values = s[t][layer]
                if normalise:
                    values = _minmax(values)
                order = sorted(range(hidden), key=lambda j: (values[j], j))
                for j in order[:k]:
                    counts[layer][j] += 1
        return [sorted(range(hidden), key=lambda j: (-counts[layer][j], -j))[:k] for layer in range(layers)], counts

    total = math.floor(layers * hidden * q / 100)
    counts = [0] * (layers * hidden)
    for t in range(n):
        values = [v for row in s[t] for v in row]
        if normalise:
            values = _minmax(values)
        sign = -1 if strategy == "global_highest" else 1
        order = sorted(range(layers * hidden), key=lambda f: (sign * values[f], f))
        for f in order[:total]:
            counts[f] += 1
    ranked = sorted(range(layers * hidden), key=lambda f: (-counts[f], -f))[:total]
    result = [[] for _ in range(layers)]
    for f in ranked:
        result[f // hidden].append(f % hidden)
    return result, [counts[layer * hidden:(layer + 1) * hidden] for layer in range(layers)]


def _minmax(values):
    lo, hi = min(values), max(values)
    return [0.0] * len(values) if hi == lo else [(v - lo) / (hi - lo) for v in values]


# ------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_slow_reference(rng, strategy, kind):
    scores = make_scores(rng, kind)
    for quota in (int(rng.integers(1, 101)), 100, 12.5, 33.3):
        expected, expected_counts = slow_select(scores, quota, strategy)
        got = _select_or_empty(scores, quota, strategy, chunk_size=int(rng.integers(1, 8)))
        assert got == expected, (strategy, kind, quota)
        assert vote_counts(scores, quota, strategy).tolist() == expected_counts
        assert all(type(row) is int for layer in got for row in layer)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_original_normalisation_does_not_change_the_result(rng, strategy):
    scores = make_scores(rng, "decimal")
    scores[2] = 0.0  # a max == min sample
    quota = int(rng.integers(1, 101))
    assert _select_or_empty(scores, quota, strategy) == slow_select(scores, quota, strategy, normalise=True)[0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_input_types_agree(rng, strategy):
    scores = make_scores(rng, "decimal")
    expected = select_target_pos(scores, 20, strategy)
    assert select_target_pos(torch.from_numpy(scores), 20, strategy) == expected
    assert select_target_pos(torch.from_numpy(scores).to(torch.float64), 20, strategy, chunk_size=4) == expected
    assert select_target_pos(scores.tolist(), 20, strategy) == expected
    half = scores.astype(np.float16)
    assert select_target_pos(torch.from_numpy(half), 20, strategy) == select_target_pos(half, 20, strategy)
    bf16 = torch.from_numpy(scores).bfloat16()
    assert select_target_pos(bf16, 20, strategy) == select_target_pos(bf16.float().numpy(), 20, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streaming_from_hdf5_equals_in_memory(tmp_path, rng, strategy):
    scores = make_scores(rng, "float16", n=17)
    path = tmp_path / "kva.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=scores, maxshape=(None, *scores.shape[1:]), chunks=True,
                         compression="gzip", compression_opts=4)
    expected = select_target_pos(scores, 30, strategy)
    assert expected == slow_select(scores, 30, strategy)[0]
    for chunk_size in (1, 4, 5, 16, 17, 1000):  # 4 and 5 do not divide 17
        assert select_target_pos(path, 30, strategy, chunk_size=chunk_size) == expected
        assert select_target_pos(str(path), 30, strategy, chunk_size=chunk_size, progress=True) == expected
    with h5py.File(path, "r") as f:
        assert select_target_pos(f["dataset"], 30, strategy, chunk_size=5) == expected
        streamed = vote_counts(f["dataset"], 30, strategy, chunk_size=4)
        assert streamed.tolist() == vote_counts(scores, 30, strategy).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_tensor_equals_cpu(rng, strategy):
    scores = make_scores(rng, "decimal")
    assert select_target_pos(torch.from_numpy(scores).cuda(), 25, strategy) == select_target_pos(scores, 25, strategy)


# ------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_properties(rng, strategy, kind):
    scores = make_scores(rng, kind)
    n, layers, hidden = scores.shape
    quota = int(rng.integers(-(-100 // hidden), 101))  # at least one row per layer
    target_pos = select_target_pos(scores, quota, strategy)
    counts = vote_counts(scores, quota, strategy)
    assert len(target_pos) == layers
    for rows in target_pos:
        assert len(set(rows)) == len(rows) and all(0 <= r < hidden for r in rows)

    if strategy == "layer_balanced":
        k = layer_quota(hidden, quota)
        assert (counts.sum(axis=1) == n * k).all()  # every sample votes k rows per layer
        scopes = [(counts[layer], rows) for layer, rows in enumerate(target_pos)]
        assert [len(rows) for rows in target_pos] == [k] * layers
    else:
        total = total_quota(layers, hidden, quota)
        assert counts.sum() == n * total
        flat_rows = [layer * hidden + r for layer, rows in enumerate(target_pos) for r in rows]
        scopes = [(counts.reshape(-1), flat_rows)]
        assert sum(map(len, target_pos)) == total
    for votes, chosen in scopes:
        unchosen = sorted(set(range(len(votes))) - set(chosen))
        if chosen and unchosen:  # every chosen row has at least as many votes as every unchosen one
            assert votes[chosen].min() >= votes[unchosen].max()
    for layer, rows in enumerate(target_pos):  # most voted first
        assert list(counts[layer][rows]) == sorted(counts[layer][rows], reverse=True)


def test_global_strategies_go_opposite_ways(rng):
    scores = make_scores(rng, "randn")
    scores[:, 0] -= 100.0  # layer 0 is the lowest, layer 2 the highest
    scores[:, 2] += 100.0
    hidden = scores.shape[2]
    low = select_target_pos(scores, 100 / 3, "global_lowest")
    high = select_target_pos(scores, 100 / 3, "global_highest")
    assert sorted(low[0]) == list(range(hidden)) and low[1] == low[2] == []
    assert sorted(high[2]) == list(range(hidden)) and high[0] == high[1] == []


def test_lowest_is_signed_not_absolute():
    scores = np.array([[[-5.0, 0.1, 3.0, -0.2]]] * 4, dtype=np.float32)
    # rows 0 and 3 (or 2 and 1) get every vote; equal counts list the higher index first
    assert select_target_pos(scores, 50, "layer_balanced") == [[3, 0]]
    assert select_target_pos(scores, 50, "global_lowest") == [[3, 0]]
    assert select_target_pos(scores, 50, "global_highest") == [[2, 1]]


def test_tie_breaking_rules():
    # all values tie in every sample: samples vote for the lowest indices, and in the final ranking
    # equal counts go to the higher index first
    scores = np.zeros((3, 2, 10), dtype=np.float32)
    assert vote_counts(scores, 30, "layer_balanced").tolist() == [[3, 3, 3] + [0] * 7] * 2
    assert select_target_pos(scores, 30, "layer_balanced") == [[2, 1, 0], [2, 1, 0]]
    # global: the 6 lowest flat indices get the votes -> layer 0 rows 0..5, ranked from the higher index
    assert select_target_pos(scores, 30, "global_lowest") == [[5, 4, 3, 2, 1, 0], []]
    assert select_target_pos(scores, 30, "global_highest") == [[5, 4, 3, 2, 1, 0], []]
    # zero-vote rows are never preferred, even at a higher index
    counts = np.array([[2, 0, 2, 1]])
    assert target_pos_from_counts(counts, 50, "layer_balanced") == [[2, 0]]
    assert target_pos_from_counts(counts, 75, "global_lowest") == [[2, 0, 3]]


def test_chunk_size_does_not_matter(rng):
    scores = make_scores(rng, "small_int", n=13)
    for strategy in STRATEGIES:
        expected = select_target_pos(scores, 40, strategy, chunk_size=256)
        for chunk_size in (1, 2, 5, 12):
            assert select_target_pos(scores, 40, strategy, chunk_size=chunk_size) == expected


# ------------------------------------------------------------------------------ quotas
@pytest.mark.parametrize(
    "layers, hidden, quota, k",
    [(32, 4096, 10, 409), (32, 4096, 20, 819), (32, 4096, 30, 1228),
     (24, 896, 5, 44), (24, 896, 10, 89), (24, 896, 20, 179), (24, 896, 30, 268)],
)
def test_shipped_quotas(layers, hidden, quota, k):
    assert layer_quota(hidden, quota) == k
    assert layer_quota(hidden, float(quota)) == k
    assert int((1 / layers) * (layers * hidden * quota / 100)) == k  # the original's formula agrees here
    assert total_quota(layers, hidden, quota) == int(layers * hidden * quota / 100)
    scores = torch.randn(2, 2, hidden)
    assert [len(rows) for rows in select_target_pos(scores, quota)] == [k, k]


def test_quota_is_exact_where_floats_are_not():
    # the original int((1/L) * (L*H*q/100)) gives 1023 here
    assert int((1 / 49) * (49 * 1024 * 100 / 100)) == 1023
    assert layer_quota(1024, 100) == 1024
    assert layer_quota(1000, 0.1) == 1 and total_quota(3, 1000, 0.1) == 3
    assert layer_quota(10, 9.99) == 0  # rounds down to nothing: the original returned empty lists; we refuse
    with pytest.raises(ValueError, match=r"quota 9.99% selects no row: .* of the 10 rows of a layer .* is 10%"):
        select_target_pos(np.random.randn(3, 2, 10), 9.99)
    with pytest.raises(ValueError, match=r"quota 1% selects no row: .* of the 20 rows of all layers .* is 5%"):
        select_target_pos(np.random.randn(3, 2, 10), 1, "global_lowest")
    assert target_pos_from_counts(np.zeros((2, 10), dtype=np.int64), 9.99) == [[], []]  # the counts API does not
    assert select_target_pos(np.random.randn(3, 2, 10), 100) != [[], []]


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "bad, where", [(float("nan"), (4, 1, 7)), (float("inf"), (0, 2, 0)), (-float("inf"), (9, 0, 3))]
)
def test_non_finite_scores_are_named(bad, where, rng):
    scores = make_scores(rng, "randn", n=11, hidden=12)
    scores[where] = bad
    for strategy in STRATEGIES:
        for chunk_size in (3, 256):
            with pytest.raises(ValueError, match=rf"sample {where[0]}, layer {where[1]}, row {where[2]} is {bad}"):
                select_target_pos(scores, 10, strategy, chunk_size=chunk_size)


def test_non_finite_in_hdf5_is_named_with_its_absolute_sample_index(tmp_path, rng):
    scores = make_scores(rng, "randn", n=11, hidden=12)
    scores[8, 2, 5] = np.nan
    path = tmp_path / "kva.h5"
    with h5py.File(path, "w") as f:
        f["dataset"] = scores
    with pytest.raises(ValueError, match=r"sample 8, layer 2, row 5 is nan"):
        select_target_pos(path, 10, chunk_size=3)


@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 4, 5), (7,)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"3-D \[samples, layers, hidden_size\].*" + re.escape(str(shape))):
        select_target_pos(np.zeros(shape), 10)


def test_empty_scores():
    with pytest.raises(ValueError, match="empty"):
        select_target_pos(np.zeros((0, 3, 10)), 10)


@pytest.mark.parametrize("quota", [0, -1, 100.5, 101, float("nan"), float("inf"), "10", None, True])
def test_bad_quota(quota):
    with pytest.raises(ValueError, match=r"quota must be a percentage in \(0, 100\]"):
        select_target_pos(np.zeros((2, 2, 10)), quota)


def test_bad_strategy():
    choices = "layer_balanced, global_lowest, global_highest"
    with pytest.raises(ValueError, match=f"unknown selection strategy 'lowest'; choose one of {choices}"):
        select_target_pos(np.zeros((2, 2, 10)), 10, "lowest")


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        select_target_pos(np.zeros((2, 2, 10)), 10, chunk_size=chunk_size)


def test_non_numeric_scores():
    with pytest.raises(ValueError, match="real numbers"):
        select_target_pos(np.zeros((2, 2, 10), dtype=complex), 10)
