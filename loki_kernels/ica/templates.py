"""ICA functional-network templates: the data, FunctionalNetworksSFT's JSON file, matching, and row selections.

A template set holds, per ICA component, the ``(layer, channel)`` pairs of its network (the top percentile of
its spatial map). The JSON layout is FunctionalNetworksSFT's (``build_templates_from_current_components`` /
``save_templates``)::

    {"name": "global_templates_v1",
     "layout": {"captured_layers_sorted": [0, 1, ...], "hidden_size": 4096},
     "templates": {"0": {"3": [17, 250, ...], ...}, "1": {...}, ...},
     "meta": {...}}                      # ours, optional: how the set was built (FNSFT ignores extra keys)

Layers without channels are left out of a component's dict, as FNSFT does. Turning templates into training
selections follows FNSFT's two modes (kfac_ica.md §2.2, §4.1):

* :func:`positions` — the rows that *train* (``target_pos``): ``preserve`` the union of the chosen components'
  channels per layer, ``lesion`` its complement;
* :func:`silenced` — the rows whose output is *zeroed* during training (FNSFT's forward mask): ``preserve``
  the complement of the union where the union is non-empty and nothing where it is empty (FNSFT hooks no
  layer without channels, so such a layer is frozen but not silenced), ``lesion`` the union.

Both cover the template's captured layers only; other layers are absent (``check_target_pos`` gives them no
rows). :func:`match_components` pairs two template sets one-to-one by the IoU of their flattened
``(layer, channel)`` supports with the Hungarian algorithm (an optimal assignment maximising the summed
IoU, not greedy), flagging each pair with the paper's IoU ≥ 0.2 "same network" rule.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from torch import nn

from ..arch import find_down_projs
from ..files import write_text_atomic

__all__ = [
    "Templates",
    "Match",
    "MODES",
    "SAME_NETWORK_IOU",
    "save_templates",
    "load_templates",
    "templates_from_dict",
    "check_templates",
    "positions",
    "silenced",
    "match_components",
    "mean_iou",
    "iou",
]

MODES = ("preserve", "lesion")
SAME_NETWORK_IOU = 0.2  # Liu et al.: two networks with IoU >= 0.2 are the same network


@dataclass
class Templates:
    """``components[c][layer]`` = sorted channels of network ``c`` in ``layer`` (only layers that have some).

    ``layers`` are the captured layers in ascending order and ``hidden_size`` their width (FNSFT's
    ``layout``); ``meta`` records how the set was built (written to the JSON under ``"meta"``).
    """

    name: str
    layers: list[int]
    hidden_size: int
    components: dict[int, dict[int, list[int]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def support(self, component: int) -> set[tuple[int, int]]:
        """The ``(layer, channel)`` pairs of one component."""
        chans = self.components[_component_id(self, component)]
        return {(layer, ch) for layer, chs in chans.items() for ch in chs}

    def to_dict(self) -> dict[str, Any]:
        """The FunctionalNetworksSFT JSON object (string keys, sorted channel lists)."""
        out: dict[str, Any] = {
            "name": self.name,
            "layout": {"captured_layers_sorted": list(self.layers), "hidden_size": int(self.hidden_size)},
            "templates": {
                str(c): {str(layer): sorted(int(ch) for ch in chs) for layer, chs in sorted(comp.items()) if chs}
                for c, comp in sorted(self.components.items())
            },
        }
        if self.meta:
            out["meta"] = self.meta
        return out


# ------------------------------------------------------------------------------------------------ files
def save_templates(templates: Templates, path: Union[str, os.PathLike]) -> None:
    """Write ``templates`` as FNSFT's JSON (``indent=2``), atomically: a temporary file renamed over ``path``."""
    text = json.dumps(templates.to_dict(), indent=2) + "\n"
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    write_text_atomic(path, text)


def load_templates(path: Union[str, os.PathLike]) -> Templates:
    """Read a template JSON file (FNSFT's layout). A missing file raises ``FileNotFoundError``; a malformed one
    a one-line ``ValueError`` naming the file and what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"template file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"template file {path!r} is not valid JSON: {e}") from None
    return templates_from_dict(data, source=f"template file {path!r}")


def templates_from_dict(data: Any, *, source: str = "templates") -> Templates:
    """Check and convert FNSFT's template object (as read from JSON) into :class:`Templates`."""

    def fail(what: str):
        raise ValueError(f"{source}: {what}")

    if not isinstance(data, Mapping):
        fail(f"expected a JSON object, got {type(data).__name__}")
    for key in ("layout", "templates"):
        if key not in data:
            fail(f"missing key {key!r}")
    name = data.get("name", "")
    if not isinstance(name, str):
        fail(f"'name' must be a string, got {type(name).__name__}")
    layout = data["layout"]
    if not isinstance(layout, Mapping) or "captured_layers_sorted" not in layout or "hidden_size" not in layout:
        fail("'layout' must hold 'captured_layers_sorted' and 'hidden_size'")
    layers = layout["captured_layers_sorted"]
    if not isinstance(layers, list) or not all(_is_int(v) and v >= 0 for v in layers):
        fail("'layout.captured_layers_sorted' must be a list of non-negative layer indices")
    if any(a >= b for a, b in zip(layers, layers[1:], strict=False)):
        fail(f"'layout.captured_layers_sorted' must be strictly ascending, got {layers}")
    hidden = layout["hidden_size"]
    if not _is_int(hidden) or hidden < 1:
        fail(f"'layout.hidden_size' must be a positive integer, got {hidden!r}")
    raw = data["templates"]
    if not isinstance(raw, Mapping):
        fail(f"'templates' must be an object {{component: {{layer: channels}}}}, got {type(raw).__name__}")
    captured = set(layers)
    components: dict[int, dict[int, list[int]]] = {}
    for ckey, comp in raw.items():
        cid = _int_key(ckey)
        if cid is None or cid < 0:
            fail(f"component key {ckey!r} is not a non-negative integer")
        if cid in components:
            fail(f"component {cid} is listed twice")
        if not isinstance(comp, Mapping):
            fail(f"component {cid} must map layers to channel lists, got {type(comp).__name__}")
        per_layer: dict[int, list[int]] = {}
        for lkey, chans in comp.items():
            layer = _int_key(lkey)
            if layer is None or layer not in captured:
                fail(f"component {cid}: layer {lkey!r} is not one of the captured layers {layers}")
            if layer in per_layer:
                fail(f"component {cid}: layer {layer} is listed twice")
            if not isinstance(chans, list) or not all(_is_int(ch) for ch in chans):
                fail(f"component {cid}, layer {layer}: channels must be a list of integers")
            bad = [ch for ch in chans if not 0 <= ch < hidden]
            if bad:
                fail(f"component {cid}, layer {layer}: channel {bad[0]} is out of range [0, {hidden})")
            if len(set(chans)) != len(chans):
                fail(f"component {cid}, layer {layer}: a channel is listed twice")
            if chans:
                per_layer[layer] = sorted(int(ch) for ch in chans)
        components[cid] = dict(sorted(per_layer.items()))
    meta = data.get("meta", {})
    if not isinstance(meta, Mapping):
        fail(f"'meta' must be an object, got {type(meta).__name__}")
    return Templates(name, [int(v) for v in layers], int(hidden), dict(sorted(components.items())), dict(meta))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_key(key):
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


# ----------------------------------------------------------------------------------------- model checks
def check_templates(templates: Templates, model: nn.Module) -> None:
    """``ValueError`` (one line) unless every captured layer exists in ``model`` with width ``hidden_size``."""
    downs = find_down_projs(model)
    missing = [layer for layer in templates.layers if layer >= len(downs)]
    if missing:
        raise ValueError(f"templates {templates.name!r} capture layer {missing[0]}, but the model has "
                         f"{len(downs)} decoder layers")
    for layer in templates.layers:
        width = downs[layer].out_features
        if width != templates.hidden_size:
            raise ValueError(f"templates {templates.name!r} have hidden size {templates.hidden_size}, but layer "
                             f"{layer}'s down projection writes {width} channels")


# ------------------------------------------------------------------------------------------- selections
def _component_id(templates: Templates, component) -> int:
    if not _is_int(component):
        raise ValueError(f"component id {component!r} is not an integer")
    if int(component) not in templates.components:
        known = sorted(templates.components)
        raise ValueError(f"unknown component id {component}: templates {templates.name!r} have components {known}")
    return int(component)


def _union(templates: Templates, components: Iterable[int], mode: str) -> dict[int, set[int]]:
    if mode not in MODES:
        raise ValueError(f"mode must be 'preserve' or 'lesion', got {mode!r}")
    if isinstance(components, (str, bytes)) or not isinstance(components, Iterable):
        components = [components]
    ids = [_component_id(templates, c) for c in components]
    if not ids:
        raise ValueError("components is empty: choose at least one component id")
    union: dict[int, set[int]] = {layer: set() for layer in templates.layers}
    for cid in ids:
        for layer, chans in templates.components[cid].items():
            union[layer].update(chans)
    return union


def positions(templates: Templates, components: Iterable[int], mode: str) -> dict[int, list[int]]:
    """Rows that train, per captured layer (a ``target_pos`` dict): ``preserve`` the union of the chosen
    components' channels, ``lesion`` its complement in ``range(hidden_size)``."""
    union = _union(templates, components, mode)
    every = range(templates.hidden_size)
    if mode == "preserve":
        return {layer: sorted(chans) for layer, chans in union.items()}
    return {layer: [ch for ch in every if ch not in chans] for layer, chans in union.items()}


def silenced(templates: Templates, components: Iterable[int], mode: str) -> dict[int, list[int]]:
    """Rows whose output is zeroed during training, per captured layer (FNSFT's forward mask):
    ``preserve`` the complement of the union where it is non-empty (``[]`` where empty), ``lesion`` the union."""
    union = _union(templates, components, mode)
    every = range(templates.hidden_size)
    if mode == "lesion":
        return {layer: sorted(chans) for layer, chans in union.items()}
    return {layer: ([ch for ch in every if ch not in chans] if chans else []) for layer, chans in union.items()}


# --------------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class Match:
    """Component ``a`` of the first set paired with ``b`` of the second; ``same_network``: IoU ≥ 0.2."""

    a: int
    b: int
    iou: float
    same_network: bool


def iou(a: set, b: set) -> float:
    """Intersection over union of two supports (0 when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def match_components(a: Templates, b: Templates, *, threshold: float = SAME_NETWORK_IOU) -> list[Match]:
    """One-to-one pairing of ``a``'s and ``b``'s components maximising the total IoU (Hungarian algorithm).

    IoU is over flattened ``(layer, channel)`` supports, so the two sets may capture different layers.
    With unequal counts the extra components stay unmatched. Matches are sorted by ``a``'s component id.
    """
    ids_a, ids_b = sorted(a.components), sorted(b.components)
    sup_a = [a.support(c) for c in ids_a]
    sup_b = [b.support(c) for c in ids_b]
    scores = np.array([[iou(x, y) for y in sup_b] for x in sup_a], dtype=np.float64).reshape(len(ids_a),
                                                                                              len(ids_b))
    pairs = assignment(-scores)
    return [Match(ids_a[i], ids_b[j], float(scores[i, j]), bool(scores[i, j] >= threshold)) for i, j in pairs]


def mean_iou(matches: list[Match]) -> float:
    """The mean IoU of a matching (0 for no matches)."""
    return float(np.mean([m.iou for m in matches])) if matches else 0.0


def assignment(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of the rows and columns of ``cost`` (Hungarian algorithm, O(n³)).

    Returns ``min(rows, cols)`` ``(row, col)`` pairs sorted by row. This is the shortest-augmenting-path form
    (Jonker–Volgenant potentials), the algorithm behind ``scipy.optimize.linear_sum_assignment``.
    """
    cost = np.asarray(cost, dtype=np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape  # n <= m: every row gets a column
    if n == 0:
        return []
    inf = float("inf")
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: row (1-based) assigned to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(m + 1, inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    pairs = [(int(owner[j]) - 1, j - 1) for j in range(1, m + 1) if owner[j]]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)
