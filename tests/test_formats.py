"""Attribution HDF5 files (writer, resume, reading original-format files, merge) and position JSON files."""

import json
import os
import zlib

import h5py
import numpy as np
import pytest
import torch

from loki_kernels import target_pos as target_pos_module
from loki_kernels.formats import (
    AttributionWriter,
    concat_attribution_files,
    open_attributions,
    read_attributions,
    read_metadata,
)
from loki_kernels.target_pos import load_target_pos, check_target_pos, save_target_pos
from loki_kernels.selection import select_target_pos
from tests.conftest import SEED

L, H = 3, 12


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def snapshot(path):
    """Everything a reader sees: rows and attributes."""
    with h5py.File(path, "r") as f:
        d = f["dataset"]
        return d[:].copy(), dict(d.attrs)


# ------------------------------------------------------------------------------ writer
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_writer_round_trip(tmp_path, rng, dtype):
    path = tmp_path / "sub" / "kva.h5"
    a = rng.standard_normal((4, L, H))  # float64 numpy
    b = torch.randn(3, L, H, dtype=torch.bfloat16)  # torch, a dtype numpy lacks
    c = rng.standard_normal((L, H)).astype(np.float32)  # one sample
    meta = dict(model_name="tiny", num_layers=L, ig_steps=7, lr=0.5, flash=False, seed=None, subsets=["a", "b"])
    with AttributionWriter(path, L, H, dtype=dtype, metadata=meta) as w:
        assert w.num_samples == 0
        w.append(a)
        w.append(b)
        w.append(c)
        w.append(np.zeros((0, L, H)))
        assert w.num_samples == 8

    expected = np.concatenate([a, b.float().numpy(), c[None]]).astype(dtype)
    np.testing.assert_array_equal(read_attributions(path), expected)
    np.testing.assert_array_equal(read_attributions(path, start=2, stop=5), expected[2:5])
    with open_attributions(path) as d:
        assert d.dtype == np.dtype(dtype) and d.shape == (8, L, H)
        assert d.maxshape == (None, L, H) and d.chunks == (1, L, H)
        assert d.compression == "gzip" and d.compression_opts == 4
        assert all(k.startswith("metadata_") for k in d.attrs)

    got = read_metadata(path)
    for key in ("model_name", "num_layers", "ig_steps", "lr", "flash", "subsets"):
        assert got[key] == meta[key] and type(got[key]) is type(meta[key])
    assert got["seed"] == "None"  # as the original stored None
    assert got["num_samples_processed"] == 8
    assert {"created_at", "completed_at"} <= set(got)


def test_exception_in_block_does_not_mark_complete(tmp_path):
    path = tmp_path / "kva.h5"
    with pytest.raises(RuntimeError):
        with AttributionWriter(path, L, H) as w:
            w.append(np.ones((2, L, H)))
            raise RuntimeError("killed")
    meta = read_metadata(path)
    assert meta["num_samples_processed"] == 2 and "completed_at" not in meta


def test_resume(tmp_path, rng):
    path = tmp_path / "kva.h5"
    first, second = rng.standard_normal((5, L, H)), rng.standard_normal((3, L, H))
    with AttributionWriter(path, L, H, metadata={"model_name": "tiny"}) as w:
        w.append(first)
    created = read_metadata(path)["created_at"]
    with AttributionWriter(path, L, H, metadata={"model_name": "other", "extra": 1}, resume=True) as w:
        assert w.num_samples == 5
        assert "completed_at" not in read_metadata(path)  # being extended
        w.append(second)
        assert w.num_samples == 8
    np.testing.assert_array_equal(read_attributions(path), np.concatenate([first, second]).astype(np.float32))
    meta = read_metadata(path)
    assert meta["model_name"] == "tiny" and meta["extra"] == 1 and meta["created_at"] == created
    assert meta["num_samples_processed"] == 8 and "completed_at" in meta

    new = tmp_path / "new.h5"  # resume=True on a missing file creates it
    with AttributionWriter(new, L, H, resume=True) as w:
        assert w.num_samples == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_layers=L + 1), r"holds \[samples, layers, hidden\] = \(2, 3, 12\).*4 layers x 12 hidden"),
     (dict(hidden_size=H - 1), r"3 layers x 11 hidden"),
     (dict(dtype="float16"), r"stored as float32, but dtype=float16")],
)
def test_resume_mismatch(tmp_path, kwargs, message):
    path = tmp_path / "kva.h5"
    with AttributionWriter(path, L, H) as w:
        w.append(np.ones((2, L, H)))
    before = snapshot(path)
    args = dict(num_layers=L, hidden_size=H) | kwargs
    with pytest.raises(ValueError, match="cannot resume .*kva.h5.*" + message):
        AttributionWriter(path, args.pop("num_layers"), args.pop("hidden_size"), resume=True, **args)
    after = snapshot(path)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1]


def test_existing_file_needs_resume_or_overwrite(tmp_path):
    path = tmp_path / "kva.h5"
    with AttributionWriter(path, L, H) as w:
        w.append(np.ones((2, L, H)))
    with pytest.raises(FileExistsError, match="already exists; pass resume=True .* or overwrite=True"):
        AttributionWriter(path, L, H)
    assert read_attributions(path).shape == (2, L, H)
    with AttributionWriter(path, L, 5, overwrite=True) as w:
        assert w.num_samples == 0
    assert read_attributions(path).shape == (0, L, 5)


@pytest.mark.parametrize(
    "batch, message",
    [(np.ones((2, L, H + 1)), r"expected a batch of shape \[B, 3, 12\].*got \[2, 3, 13\]"),
     (np.ones((2, H, L)), r"got \[2, 12, 3\]"),
     (np.ones((L * H,)), r"got \[36\]"),
     ("nan", r"batch row 1 \(layer 2, hidden 5\) is nan; attributions must be finite"),
     ("inf", r"batch row 1 \(layer 2, hidden 5\) is -inf"),
     ("overflow", r"batch row 1 \(layer 2, hidden 5\) = 70000.0 overflows float16"),
     (np.ones((2, L, H), dtype=complex), r"expected real numbers")],
)
def test_bad_append_leaves_file_unchanged(tmp_path, rng, batch, message):
    path = tmp_path / "kva.h5"
    dtype = "float16" if isinstance(batch, str) and batch == "overflow" else "float32"
    if isinstance(batch, str):
        values = {"nan": np.nan, "inf": -np.inf, "overflow": 70000.0}[batch]
        batch = torch.randn(3, L, H)
        batch[1, 2, 5] = values
    with AttributionWriter(path, L, H, dtype=dtype) as w:
        w.append(rng.standard_normal((4, L, H)))
        before = snapshot(path)
        with pytest.raises(ValueError, match=message):
            w.append(batch)
        assert w.num_samples == 4
        after = snapshot(path)
        np.testing.assert_array_equal(after[0], before[0])
        w.append(np.zeros((1, L, H)))  # still usable
    assert read_attributions(path).shape == (5, L, H)


def test_writer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float16'\), got 'bfloat16'"):
        AttributionWriter(tmp_path / "a.h5", L, H, dtype="bfloat16")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        AttributionWriter(tmp_path / "a.h5", L, 0)
    with pytest.raises(ValueError, match=r"metadata 'obj': object values cannot be stored"):
        AttributionWriter(tmp_path / "a.h5", L, H, metadata={"obj": object()})
    assert not (tmp_path / "a.h5").exists()
    with AttributionWriter(tmp_path / "a.h5", L, H, dtype=torch.float16) as w:
        assert w.dtype == np.float16
    w.close()  # idempotent
    with pytest.raises(ValueError, match="is closed"):
        w.append(np.zeros((1, L, H)))


# ------------------------------------------------------------------------------ reading original files
def write_original_head(path, data, metadata):
    """As the original HDF5Manager does: float16, auto chunks, gzip 4, metadata_* attrs, one sample at a time."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("dataset", shape=(0, *data.shape[1:]), maxshape=(None, *data.shape[1:]),
                             dtype=np.float16, chunks=True, compression="gzip", compression_opts=4)
        for key, value in metadata.items():
            d.attrs[f"metadata_{key}"] = value
    for sample in data:
        with h5py.File(path, "a") as f:
            d = f["dataset"]
            d.resize(d.shape[0] + 1, axis=0)
            d[-1] = sample.astype(np.float16)


def test_read_original_head_file(tmp_path, rng):
    path = tmp_path / "kva_mmlu.h5"
    data = rng.standard_normal((9, L, H)) * 1e-3
    meta = dict(model_name="meta-llama/Llama-3.1-8B-Instruct", model_type="llama", num_layers=L, hidden_size=H,
                ig_steps=7, ig_method="riemann_trapezoid", seed=42, use_flash_attention=False,
                created_at="2025-11-20T10:30:00")
    write_original_head(path, data, meta)
    with h5py.File(path, "a") as f:  # completion metadata, as the original's update_metadata writes it
        f["dataset"].attrs["metadata_num_samples_processed"] = 9
        f["dataset"].attrs["metadata_completed_at"] = "2025-11-20T12:00:00"
    stored = read_attributions(path)
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, data.astype(np.float16))
    assert read_metadata(path) == meta | dict(num_samples_processed=9, completed_at="2025-11-20T12:00:00")
    assert select_target_pos(path, 25, chunk_size=4) == select_target_pos(data.astype(np.float16), 25)
    # resuming an original float16 file works when float16 is asked for
    with AttributionWriter(path, L, H, dtype="float16", resume=True) as w:
        w.append(np.zeros((1, L, H)))
    assert read_attributions(path).shape == (10, L, H)


def test_read_first_commit_file(tmp_path, rng):
    # first commit: values cast to fp16 but the dataset created without dtype -> stored as float32, no metadata
    path = tmp_path / "kva.h5"
    data = rng.standard_normal((6, L, H)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=data.astype(np.float32), maxshape=(None, L, H), chunks=True,
                         compression="gzip")
    assert read_attributions(path).dtype == np.float32
    np.testing.assert_array_equal(read_attributions(path), data.astype(np.float32))
    assert read_metadata(path) == {}
    assert select_target_pos(path, 50, "global_lowest", chunk_size=4) == select_target_pos(data, 50, "global_lowest")


def test_open_errors(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(ValueError, match=r"attribution file '.*nope.h5' does not exist"):
        read_attributions(missing)
    with pytest.raises(ValueError, match="does not exist"):
        select_target_pos(missing, 10)

    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"'.*text.h5' is not a readable HDF5 file"):
        read_metadata(text)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["scores"] = np.zeros((2, L, H))
        f.create_group("g")["inner"] = np.zeros(3)
    listing = r"\(its datasets: 'g/inner', 'scores'\)"
    with pytest.raises(ValueError, match=r"'.*other.h5' has no dataset 'dataset' " + listing):
        read_attributions(other)
    assert read_attributions(other, dataset="scores").shape == (2, L, H)

    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as f:
        f["dataset"] = np.zeros((2, L * H))
    with pytest.raises(ValueError, match=r"'dataset' in '.*flat.h5' has shape \(2, 36\); expected 3-D"):
        select_target_pos(flat, 10)


# ------------------------------------------------------------------------------ merge
def test_merge(tmp_path, rng):
    parts, datas = [], []
    for i, n in enumerate([3, 0, 5, 2]):
        path = tmp_path / f"kva.part{i}.h5"
        datas.append(rng.standard_normal((n, L, H)).astype(np.float32))
        with AttributionWriter(path, L, H, metadata={"model_name": "tiny", "rank": i}) as w:
            w.append(datas[-1])
        parts.append(path)
    out = tmp_path / "merged" / "kva.h5"
    assert concat_attribution_files(parts, out, chunk_size=2) == 10
    np.testing.assert_array_equal(read_attributions(out), np.concatenate(datas))
    meta = read_metadata(out)
    assert meta["model_name"] == "tiny" and meta["rank"] == 0 and meta["num_samples_processed"] == 10
    assert meta["concatenated_from"] == [os.fspath(p) for p in parts]
    with open_attributions(out) as d:
        assert d.maxshape == (None, L, H) and d.chunks == (1, L, H) and d.compression == "gzip"
    assert sorted(p.name for p in out.parent.iterdir()) == ["kva.h5"]  # no temporary left behind

    with pytest.raises(FileExistsError, match="already exists"):
        concat_attribution_files(parts, out)
    assert concat_attribution_files(parts[::-1], out, overwrite=True) == 10
    np.testing.assert_array_equal(read_attributions(out), np.concatenate(datas[::-1]))


def test_merge_mismatch(tmp_path):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "out.h5"
    with AttributionWriter(a, L, H) as w:
        w.append(np.ones((1, L, H)))
    with AttributionWriter(b, L, H, dtype="float16") as w:
        w.append(np.ones((1, L, H)))
    message = r"cannot concatenate '.*b.h5'.*\[3, 12\] as float16.*'.*a.h5' holds \[3, 12\] as float32"
    with pytest.raises(ValueError, match=message):
        concat_attribution_files([a, b], out)
    with pytest.raises(ValueError, match="no input files"):
        concat_attribution_files([], out)
    with pytest.raises(ValueError, match="does not exist"):
        concat_attribution_files([a, tmp_path / "c.h5"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]


# ------------------------------------------------------------------------------ position JSON
def test_save_target_pos_round_trip(tmp_path, rng):
    scores = rng.standard_normal((8, L, 40))
    for strategy in ("layer_balanced", "global_lowest"):
        target_pos = select_target_pos(scores, 20, strategy)
        path = tmp_path / "pos_json" / "model" / f"{strategy}.json"
        save_target_pos(target_pos, path)
        text = path.read_text()
        assert text.startswith("[\n    [") and text.endswith("]\n")  # the original's indent=4, plus a newline
        assert load_target_pos(path) == target_pos  # order kept (most voted first), Python ints
        assert check_target_pos(path, L, 40) == [sorted(rows) for rows in target_pos]
    save_target_pos(np.array([[3, 1], [0, 2]]), tmp_path / "arr.json")
    assert load_target_pos(tmp_path / "arr.json") == [[3, 1], [0, 2]]
    save_target_pos([[], [5]], tmp_path / "empty_layer.json")  # global strategies can leave layers empty
    assert load_target_pos(tmp_path / "empty_layer.json") == [[], [5]]


@pytest.mark.parametrize(
    "target_pos, message",
    [([[1, 2], [3, 1.5]], r"target_pos layer 1: row 1.5 is not an integer"),
     ([[1, 2], [-1]], r"target_pos layer 1: row -1 is negative"),
     ([[1, 1]], r"target_pos layer 0: row 1 is listed twice"),
     ([[1], "12"], r"target_pos layer 1: expected a list of row indices, got str"),
     ([[True]], r"row True is not an integer"),
     ([[object()]], r"is not an integer"),
     ({"0": [1]}, r"target_pos must be a list of row lists"),
     ([], r"at least one layer")],
)
def test_save_target_pos_rejects_and_keeps_old_file(tmp_path, target_pos, message):
    path = tmp_path / "10.json"
    save_target_pos([[4, 2]], path)
    with pytest.raises(ValueError, match=message):
        save_target_pos(target_pos, path)
    assert path.read_text() == "[\n    [\n        4,\n        2\n    ]\n]\n"
    assert os.listdir(tmp_path) == ["10.json"]


def test_save_target_pos_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "10.json"
    save_target_pos([[4, 2]], path)
    old = path.read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(target_pos_module.os, "fsync", fail)  # fails after part of the write
    with pytest.raises(OSError, match="disk full"):
        save_target_pos([[1, 2, 3]] * 50, path)
    assert path.read_text() == old and os.listdir(tmp_path) == ["10.json"]
    with pytest.raises(OSError, match="disk full"):
        save_target_pos([[1]], tmp_path / "new.json")
    assert os.listdir(tmp_path) == ["10.json"]
    monkeypatch.undo()
    save_target_pos([[1, 2, 3]], path)
    assert json.loads(path.read_text()) == [[1, 2, 3]]
