"""K-FAC factor files: our safetensors round trip, atomic writes, and the original's ``.pt`` reader."""

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

import loki_kernels.kfac.storage as storage
from loki_kernels.kfac import Factors, collect_factors, load_factors, load_original_factors, save_factors
from loki_kernels.reference import collect_factors_original
from tests.conftest import TOL, rel_err
from tests.tiny_models import VOCAB, tiny_model


def random_factors(dtype=torch.float32):
    def spd(d):
        x = torch.randn(d + 3, d, dtype=torch.float64)
        return (x.t() @ x / (d + 3)).to(dtype)

    return Factors(
        A={"0.mlp": spd(7), "0.down": spd(13), "3.down": spd(13)},
        G={"0.gate": spd(13), "0.up": spd(13), "0.down": spd(7), "3.down": spd(7)},
        n_tokens={"0": int(torch.randint(1, 10**6, ())), "3": int(torch.randint(1, 10**6, ()))},
        settings={"fisher": "mc", "seed": 11, "layers": [0, 3], "normalize": "sum", "nested": {"x": [1.5, None]}},
    )


def assert_same(a: Factors, b: Factors):
    assert a.A.keys() == b.A.keys() and a.G.keys() == b.G.keys()
    for table in ("A", "G"):
        for key, tensor in getattr(a, table).items():
            other = getattr(b, table)[key]
            assert other.dtype == tensor.dtype and torch.equal(other, tensor), (table, key)
    assert a.n_tokens == b.n_tokens and a.settings == b.settings


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    factors = random_factors(dtype)
    path = save_factors(factors, tmp_path / "factors.safetensors")
    assert leftovers(tmp_path) == ["factors.safetensors"]
    loaded = load_factors(path)
    assert_same(loaded, factors)
    assert loaded.modules() == [(0, "gate"), (0, "up"), (0, "down"), (3, "down")]


def test_round_trip_of_a_collection(tmp_path):
    model = tiny_model("gpt2")
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 6))}]
    factors = collect_factors(model, batches, layers=[0, 2], modules=("up", "down"), progress=False)
    loaded = load_factors(save_factors(factors, tmp_path / "f.safetensors"))
    assert_same(loaded, factors)
    assert loaded.a(2, "up") is loaded.A["2.mlp"]  # one A for the MLP input, stored once
    with open(tmp_path / "f.safetensors", "rb") as f:
        header = f.read(200_000)
    assert header.count(b'"A.2.mlp"') == 1 and b'"A.2.up"' not in header


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "f.safetensors"
    save_factors(random_factors(), path)
    second = random_factors(torch.float64)
    save_factors(second, path)
    assert_same(load_factors(path), second)
    assert leftovers(tmp_path) == ["f.safetensors"]


# --------------------------------------------------------------------------------------------- atomicity
def test_failing_write_leaves_no_file(tmp_path, monkeypatch):
    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_factors(random_factors(), tmp_path / "new.safetensors")
    assert leftovers(tmp_path) == []

    monkeypatch.undo()
    old = random_factors()
    save_factors(old, tmp_path / "old.safetensors")
    monkeypatch.setattr(storage, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_factors(random_factors(), tmp_path / "old.safetensors")
    assert leftovers(tmp_path) == ["old.safetensors"]
    assert_same(load_factors(tmp_path / "old.safetensors"), old)


@pytest.mark.parametrize("change, match", [
    (lambda f: f.settings.update(bad=object()), "not JSON-serialisable"),
    (lambda f: f.n_tokens.update({"0": -1}), r"n_tokens\['0'\]"),
    (lambda f: f.A.update({"0.gate": f.A["0.mlp"]}), r"factor key A\['0.gate'\]"),
    (lambda f: f.G.update({"x.up": f.G["0.up"]}), r"factor key G\['x.up'\]"),
    (lambda f: f.G.update({"1.up": [1.0]}), "not a tensor"),
])
def test_bad_factors_write_nothing(tmp_path, change, match):
    factors = random_factors()
    change(factors)
    with pytest.raises(ValueError, match=match):
        save_factors(factors, tmp_path / "f.safetensors")
    assert leftovers(tmp_path) == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_factors(random_factors(), tmp_path / "nowhere" / "f.safetensors")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_factors(tmp_path / "missing.safetensors")
    save_file({"x": torch.randn(2, 2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a K-FAC factor file"):
        load_factors(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_factors(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------------------------- original .pt
def original_files(tmp_path, model, batches, groups):
    """The original's files, one per pass: ``kfac_factors_blk_{b1}_{b2}….pt`` in its layout."""
    paths = []
    for group in groups:
        content = collect_factors_original(model, batches, layers=group, layers_per_pass=len(group),
                                           sample_labels=True, seed=2)
        content = {k: {"A": v["A"].cpu(), "G": v["G"].cpu(), "n_tokens": v["n_tokens"]} for k, v in content.items()}
        path = tmp_path / f"kfac_factors_blk_{'_'.join(map(str, group))}.pt"
        torch.save(content, path)
        paths.append(path)
    return paths


def test_original_reader(tmp_path):
    model = tiny_model("llama")
    batches = [{"input_ids": torch.randint(0, VOCAB, (3, 8))} for _ in range(2)]
    paths = original_files(tmp_path, model, batches, [[0, 2], [1]])
    factors = load_original_factors(paths)
    assert factors.layers() == [0, 1, 2]
    assert factors.n_tokens == {"0": 42, "1": 42, "2": 42}
    assert factors.settings["normalize"] == "original"
    raw = torch.load(paths[0], weights_only=True)
    assert torch.equal(factors.a(0, "gate"), raw["blk0.gate"]["A"]) and factors.a(0, "up") is factors.a(0, "gate")
    assert torch.equal(factors.g(2, "down"), raw["blk2.down"]["G"])
    assert set(factors.A) == {f"{b}.{i}" for b in range(3) for i in ("mlp", "down")}

    ours = collect_factors(model, batches, layers=[0, 1, 2], fisher="mc", seed=2, normalize="original",
                           progress=False)
    for layer, module in ours.modules():
        assert rel_err(factors.g(layer, module), ours.g(layer, module)) < TOL[torch.float32]
        assert rel_err(factors.a(layer, module), ours.a(layer, module)) < TOL[torch.float32]

    single = load_original_factors(paths[1])  # one path, not a list
    assert single.layers() == [1] and torch.equal(single.g(1, "up"), factors.g(1, "up"))


def test_original_reader_checks(tmp_path):
    model = tiny_model("llama")
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 6))}]
    (path,) = original_files(tmp_path, model, batches, [[1]])
    content = torch.load(path, weights_only=True)

    def write(name, change):
        changed = copy.deepcopy(content)
        change(changed)
        torch.save(changed, tmp_path / name)
        return tmp_path / name

    near = write("near.pt", lambda c: c["blk1.up"]["A"].mul_(1 + 1e-7))
    with pytest.warns(UserWarning, match="block 1: gate and up A are not bitwise equal"):
        factors = load_original_factors(near)
    assert torch.equal(factors.a(1, "up"), content["blk1.gate"]["A"])

    far = write("far.pt", lambda c: c["blk1.up"]["A"].add_(torch.randn_like(c["blk1.up"]["A"])))
    with pytest.raises(ValueError, match="block 1: gate and up A differ"):
        load_original_factors(far)
    counts = write("counts.pt", lambda c: c["blk1.down"].update(n_tokens=3))
    with pytest.raises(ValueError, match="block 1: n_tokens differ"):
        load_original_factors(counts)
    with pytest.raises(ValueError, match="block 1 is in two files"):
        load_original_factors([path, near])
    layout = write("layout.pt", lambda c: c.update({"layer1.up": c["blk1.up"]}))
    with pytest.raises(ValueError, match="entry 'layer1.up'"):
        load_original_factors(layout)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_original_factors(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="no original factor file"):
        load_original_factors([])
