"""Template sets: FNSFT's JSON layout, malformed files, matching, and the preserve/lesion row selections."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from loki_kernels.ica import (
    Templates,
    check_templates,
    load_templates,
    match_components,
    mean_iou,
    positions,
    save_templates,
    silenced,
    templates_from_dict,
)
from loki_kernels.ica.templates import assignment, iou
from loki_kernels.target_pos import check_target_pos
from tests.tiny_models import HIDDEN, LAYERS, tiny_model


def random_templates(n_components=4, layers=(0, 1, 2), hidden=HIDDEN, per_component=9) -> Templates:
    components = {}
    for c in range(n_components):
        flat = torch.randperm(len(layers) * hidden)[:per_component].tolist()
        comp: dict[int, list[int]] = {}
        for j in flat:
            comp.setdefault(layers[j // hidden], []).append(j % hidden)
        components[c] = {layer: sorted(chs) for layer, chs in sorted(comp.items())}
    return Templates("global_templates_v1", list(layers), hidden, components)


# ------------------------------------------------------------------------------------------------ files
def test_json_round_trip_in_fnsft_layout(tmp_path):
    t = random_templates()
    t.meta = {"mode": "stream", "seed": 3}
    path = tmp_path / "sub" / "global_templates.json"
    save_templates(t, path)
    data = json.loads(path.read_text())
    assert data["name"] == "global_templates_v1"
    assert data["layout"] == {"captured_layers_sorted": [0, 1, 2], "hidden_size": HIDDEN}
    assert set(data["templates"]) == {"0", "1", "2", "3"}
    for c, comp in t.components.items():
        assert data["templates"][str(c)] == {str(layer): chs for layer, chs in comp.items()}
    assert load_templates(path) == t
    assert os.listdir(path.parent) == ["global_templates.json"]  # no temporary file left behind


def test_reads_what_fnsft_writes(tmp_path):
    # FNSFT's json.dump of build_templates_from_current_components: int component keys become strings,
    # layers without channels are absent, channel lists sorted
    fnsft = {"name": "global_templates_v1", "layout": {"captured_layers_sorted": [0, 2, 5], "hidden_size": 8},
             "templates": {0: {"0": [1, 3], "5": [7]}, 1: {"2": [0, 1, 2]}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(fnsft, indent=2))
    t = load_templates(path)
    assert t.layers == [0, 2, 5] and t.hidden_size == 8
    assert t.components == {0: {0: [1, 3], 5: [7]}, 1: {2: [0, 1, 2]}}
    assert t.support(0) == {(0, 1), (0, 3), (5, 7)}
    assert templates_from_dict(fnsft) == t


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    save_templates(random_templates(), path)
    before = path.read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        save_templates(random_templates(), path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["t.json"]


GOOD = {"name": "x", "layout": {"captured_layers_sorted": [0, 1], "hidden_size": 4},
        "templates": {"0": {"0": [1, 2]}, "1": {"1": [3]}}}


def edited(path: str, value):
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split("/")
    node = data
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("data, message", [
    ([1, 2], "expected a JSON object"),
    (edited("layout", KeyError), "missing key 'layout'"),
    (edited("templates", KeyError), "missing key 'templates'"),
    (edited("name", 3), "'name' must be a string"),
    (edited("layout/hidden_size", KeyError), "'layout' must hold"),
    (edited("layout/hidden_size", 0), "hidden_size"),
    (edited("layout/captured_layers_sorted", [1, 0]), "strictly ascending"),
    (edited("layout/captured_layers_sorted", [0, -1]), "non-negative"),
    (edited("templates", [1]), "'templates' must be an object"),
    (edited("templates/x", {}), "component key 'x'"),
    (edited("templates/0", [1]), "component 0 must map layers"),
    (edited("templates/0/7", [1]), "layer '7' is not one of the captured layers"),
    (edited("templates/0/0", [1, 9]), "channel 9 is out of range"),
    (edited("templates/0/0", [1, 1]), "listed twice"),
    (edited("templates/0/0", ["a"]), "channels must be a list of integers"),
    (edited("templates/0/0", [1.5]), "channels must be a list of integers"),
    (edited("meta", [1]), "'meta' must be an object"),
])
def test_malformed_files(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        load_templates(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_templates(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_templates(bad)
    assert str(bad) in str(info.value)


def test_check_against_a_model():
    model = tiny_model("llama")
    check_templates(random_templates(), model)
    with pytest.raises(ValueError, match=f"capture layer {LAYERS}.*{LAYERS} decoder layers"):
        check_templates(random_templates(layers=(0, LAYERS)), model)
    with pytest.raises(ValueError, match=f"hidden size {HIDDEN + 1}.*writes {HIDDEN} channels"):
        check_templates(random_templates(hidden=HIDDEN + 1), model)


# ------------------------------------------------------------------------------------------- selections
HAND = Templates("hand", [0, 2, 3], 6, {
    0: {0: [1, 2], 2: [0]},
    1: {0: [2, 5]},  # channel 2 of layer 0 is in components 0 and 1
    2: {},  # an empty component
})


def test_preserve_trains_the_union_and_silences_the_rest():
    assert positions(HAND, [0, 1], "preserve") == {0: [1, 2, 5], 2: [0], 3: []}
    # layer 3 has no channel: frozen (no rows train) but not silenced, as FNSFT hooks no such layer
    assert silenced(HAND, [0, 1], "preserve") == {0: [0, 3, 4], 2: [1, 2, 3, 4, 5], 3: []}
    assert positions(HAND, [1], "preserve") == {0: [2, 5], 2: [], 3: []}
    assert silenced(HAND, [1], "preserve") == {0: [0, 1, 3, 4], 2: [], 3: []}


def test_lesion_trains_the_complement_and_silences_the_union():
    assert positions(HAND, [0, 1], "lesion") == {0: [0, 3, 4], 2: [1, 2, 3, 4, 5], 3: list(range(6))}
    assert silenced(HAND, [0, 1], "lesion") == {0: [1, 2, 5], 2: [0], 3: []}
    assert positions(HAND, 2, "lesion") == {0: list(range(6)), 2: list(range(6)), 3: list(range(6))}
    assert silenced(HAND, [2], "lesion") == {0: [], 2: [], 3: []}


def test_selections_partition_the_rows():
    t = random_templates(6, layers=(0, 1, 2), hidden=HIDDEN, per_component=30)
    chosen = torch.randperm(6)[:3].tolist()
    for mode in ("preserve", "lesion"):
        train, zero = positions(t, chosen, mode), silenced(t, chosen, mode)
        for layer in t.layers:
            assert not set(train[layer]) & set(zero[layer])  # silenced rows never train
            if train[layer] and zero[layer]:
                assert sorted(train[layer] + zero[layer]) == list(range(HIDDEN))
        check_target_pos(train, LAYERS, HIDDEN)  # a valid target_pos dict


def test_selection_errors():
    with pytest.raises(ValueError, match="unknown component id 7.*components \\[0, 1, 2\\]"):
        positions(HAND, [0, 7], "preserve")
    with pytest.raises(ValueError, match="mode must be"):
        silenced(HAND, [0], "keep")
    with pytest.raises(ValueError, match="components is empty"):
        positions(HAND, [], "lesion")
    with pytest.raises(ValueError, match="not an integer"):
        positions(HAND, ["0"], "lesion")


# --------------------------------------------------------------------------------------------- matching
def test_match_finds_permuted_copies():
    a = random_templates(5, per_component=20)
    order = torch.randperm(5).tolist()
    b = Templates("b", a.layers, a.hidden_size, {i: a.components[c] for i, c in enumerate(order)})
    matches = match_components(a, b)
    assert [(m.a, m.b) for m in matches] == sorted((c, i) for i, c in enumerate(order))
    assert all(m.iou == 1.0 and m.same_network for m in matches)
    assert mean_iou(matches) == 1.0


def test_match_iou_and_threshold():
    a = Templates("a", [0, 1], 10, {0: {0: [0, 1, 2, 3]}, 1: {1: [5, 6]}})
    b = Templates("b", [0, 1], 10, {0: {1: [6, 7, 8, 9, 0]}, 1: {0: [2, 3, 4]}, 2: {0: [9]}})
    matches = match_components(a, b)
    assert [(m.a, m.b) for m in matches] == [(0, 1), (1, 0)]
    assert matches[0].iou == pytest.approx(2 / 5) and matches[0].same_network
    assert matches[1].iou == pytest.approx(1 / 6) and not matches[1].same_network
    assert match_components(a, b, threshold=0.1)[1].same_network
    assert iou(set(), set()) == 0.0


def test_hungarian_is_optimal():
    for rows, cols in [(1, 1), (4, 4), (5, 3), (3, 6), (7, 7)]:
        cost = torch.rand(rows, cols, dtype=torch.float64).numpy()
        cost[0, :] = cost[0, 0]  # ties
        pairs = assignment(cost)
        assert len(pairs) == min(rows, cols)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        best = min(
            sum(cost[r, c] for r, c in zip(perm_rows, perm_cols, strict=True))
            for perm_rows in itertools.permutations(range(rows), min(rows, cols))
            for perm_cols in [range(min(rows, cols))] if cols <= rows
        ) if cols <= rows else min(
            sum(cost[r, c] for r, c in zip(range(rows), perm, strict=True))
            for perm in itertools.permutations(range(cols), rows)
        )
        assert np.isclose(sum(cost[r, c] for r, c in pairs), best)
    assert assignment(np.zeros((0, 3))) == []
