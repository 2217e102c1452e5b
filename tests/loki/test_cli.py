"""The `loki` console script end to end on tiny local models and files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loki.cli import main
from loki_kernels.formats import AttributionWriter
from loki_kernels.selection import select_target_pos
from tests.tiny_models import HIDDEN, LAYERS, batch, logits, train


@pytest.fixture
def h5(tmp_path):
    scores = np.random.default_rng().standard_normal((9, LAYERS, HIDDEN)).astype(np.float32)
    path = tmp_path / "kva_result" / "hdf5" / "TinyModel" / "kva_mmlu.h5"
    path.parent.mkdir(parents=True)
    with AttributionWriter(path, LAYERS, HIDDEN, metadata={"model_name": "tiny"}) as w:
        w.append(scores)
    return path, scores


def test_select_nodes_default_names(h5, tmp_path, monkeypatch, capsys):
    path, scores = h5
    monkeypatch.chdir(tmp_path)
    assert main(["select-nodes", "--hdf5-path", str(path), "--quota", "10"]) == 0
    out = tmp_path / "kva_result" / "pos_json" / "TinyModel" / "10.json"
    assert json.loads(out.read_text()) == select_target_pos(scores, 10)
    assert "selected" in capsys.readouterr().out

    assert main(["select-nodes", "--hdf5-path", str(path), "--quota", "20", "--strategy", "global_highest"]) == 0
    out = tmp_path / "kva_result" / "pos_json" / "TinyModel" / "global_highest_20.json"
    assert json.loads(out.read_text()) == select_target_pos(scores, 20, "global_highest")


def test_select_nodes_output_flags(h5, tmp_path):
    path, scores = h5
    assert main(["select-nodes", "--hdf5-path", str(path), "--quota", "30", "--strategy", "global_lowest",
                 "--output-dir", str(tmp_path / "o"), "--output-name", "global_30_L.json"]) == 0
    written = json.loads((tmp_path / "o" / "global_30_L.json").read_text())
    assert written == select_target_pos(scores, 30, "global_lowest")


@pytest.mark.parametrize("argv, message", [
    (["--quota", "0"], "--quota must be in (0, 100], got 0"),
    (["--quota", "101"], "--quota must be in (0, 100], got 101"),
])
def test_select_nodes_bad_quota(h5, capsys, argv, message):
    assert main(["select-nodes", "--hdf5-path", str(h5[0])] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"loki select-nodes: error: {message}"


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["select-nodes", "--hdf5-path", str(tmp_path / "missing.h5"), "--quota", "10"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"HDF5 file not found: {tmp_path / 'missing.h5'}")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    assert main(["select-nodes", "--hdf5-path", str(tmp_path / "bad.h5"), "--quota", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.h5" in err and "Traceback" not in err


def test_create_and_restore_model(base_dir, capsys):
    tmp, base, rows = base_dir
    assert main(["create-model", "--model-name", str(tmp / "base"), "--target-pos-path", str(tmp / "10.json"),
                 "--save-dir", str(tmp / "loki"), "--torch-dtype", "float32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp / "loki", trust_remote_code=True)
    ids = batch()
    train(model, ids, steps=2)
    model.save_pretrained(tmp / "trained")
    assert main(["restore-model", "--model-path", str(tmp / "trained"), "--target-pos-path", str(tmp / "10.json"),
                 "--output-path", str(tmp / "restored"), "--model-name", str(tmp / "base"),
                 "--torch-dtype", "float32"]) == 0
    restored = AutoModelForCausalLM.from_pretrained(tmp / "restored")
    assert torch.equal(logits(restored, ids), logits(model, ids))


def test_create_model_bad_json_is_one_line(base_dir, capsys):
    tmp, _, rows = base_dir
    rows[1] = rows[1] + [HIDDEN + 5]
    (tmp / "bad.json").write_text(json.dumps(rows))
    code = main(["create-model", "--model-name", str(tmp / "base"), "--target-pos-path", str(tmp / "bad.json"),
                 "--save-dir", str(tmp / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"target_pos layer 1: row {HIDDEN + 5} is out of range" in err
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("command", ["analyse", "select-nodes", "create-model", "restore-model", "demo"])
def test_help(command):
    done = subprocess.run([sys.executable, "-m", "loki.cli", command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: loki " + command in done.stdout


def test_missing_required_flag_is_argparse_error():
    done = subprocess.run([sys.executable, "-m", "loki.cli", "select-nodes"], capture_output=True, text=True)
    assert done.returncode == 2 and "required: --hdf5-path, --quota" in done.stderr and "Traceback" not in done.stderr
