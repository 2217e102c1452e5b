"""Faults found by trying the package as a new user would, one test each; this module grows with every new case.

The rule every case checks: bad input gets a clear one-line error naming what is wrong (file, record, layer,
value, flag); on the CLI exit status 2 and exactly one stderr line ``loki <command>: error: ...``, never a
traceback; and nothing changes: no half-patched model, no output directory or file made (an existing one
byte for byte the same), no temporary directory or lock file left behind.

Sections:
1. ``loki create-model`` / ``restore-model`` / ``set_zero_weights`` and their output directories
2. ``loki analyse``: data, flags, prompt length, resume, damaged files, one run per output
3. ``loki select-nodes``, ``patch_model``, ``kva.attribute`` and the CLI's ``--help``
"""

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import loki
import loki_kernels
from loki import analyse, model_utils
from loki.analyse import AnalyseArgs, Question, load_questions, prompt_ids, run_analysis
from loki.cli import build_parser, main, quota_name
from loki.modeling_loki import LOKI_CLASSES
from loki_kernels import SplitLinear, find_down_projs, kva, patch_model, unpatch_model
from loki_kernels.files import FileLock
from loki_kernels.formats import AttributionWriter, open_attributions, read_attributions
from loki_kernels.kva import attribute
from loki_kernels.selection import layer_quota, select_target_pos, total_quota
from tests.conftest import SEED
from tests.tiny_models import (
    FFN,
    HIDDEN,
    LAYERS,
    VOCAB,
    batch,
    char_tokenizer,
    logits,
    random_rows,
    save_split_checkpoint,
    saved_char_model,
    snapshot,
    tiny_model,
    train,
)


def error_line(capsys, command: str, code: int) -> str:
    """Exit status 2 and exactly one stderr line ``loki <command>: error: ...``, no traceback; returns the message."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    prefix = f"loki {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):].rstrip("\n")


# ==================================================================================================
# 1. create-model, restore-model, set_zero_weights: output directories
# ==================================================================================================
# ------------------------------------------------------------------------------------------- helpers
def _tree(root):
    """Every path under ``root`` (a file by its bytes' hash): equal before and after means nothing changed."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".loki-" in p.name)


def _cli_error(capsys, command, argv):
    """Run ``loki <command> argv``; assert exit 2 and exactly one error line; return the message."""
    capsys.readouterr()  # what the test's own setup wrote
    return error_line(capsys, command, main([command] + [str(a) for a in argv]))


def _create(tmp, save_dir="loki"):
    loki.create_loki_model(model_name=tmp / "base", target_pos_path=tmp / "10.json", save_dir=tmp / save_dir,
                           torch_dtype=torch.float32)


def _trained_loki(tmp):
    """create-model, load with trust_remote_code, train, save_pretrained to tmp/trained."""
    _create(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp / "loki", trust_remote_code=True)
    train(model, batch(), steps=2)
    model.save_pretrained(tmp / "trained")
    return model


def _restore_argv(tmp, json_name="10.json", model_path="trained", output="restored", model_name="base"):
    return ["--model-path", tmp / model_path, "--target-pos-path", tmp / json_name, "--output-path", tmp / output,
            "--model-name", tmp / model_name, "--torch-dtype", "float32"]


def _with(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _create_argv(tmp, save_dir="loki", model_name="base"):
    return ["--model-name", tmp / model_name, "--target-pos-path", tmp / "10.json", "--save-dir", tmp / save_dir,
            "--torch-dtype", "float32"]


# ------------------------------------------------------------------- 1. restore with the wrong JSON
def test_restore_refuses_json_other_than_config_target_pos(base_dir, capsys):
    tmp, _, rows = base_dir
    _trained_loki(tmp)
    stored = json.loads((tmp / "trained" / "config.json").read_text())["target_pos"]
    assert stored == [sorted(r) for r in rows]
    other = [list(r) for r in rows]
    dropped = other[1].pop(0)
    other[1].append(next(r for r in range(HIDDEN) if r not in rows[1]))
    (tmp / "other.json").write_text(json.dumps(other))
    before = _tree(tmp)

    message = _cli_error(capsys, "restore-model", _restore_argv(tmp, "other.json"))
    assert message == (f"{tmp / 'other.json'} is not the target_pos the model in {tmp / 'trained'} was trained with: "
                       f"layer 1 lists {len(rows[1])} rows, the model's config.target_pos {len(rows[1])} "
                       f"(they differ in row {dropped})")
    assert not (tmp / "restored").exists() and _leftovers(tmp) == [] and _tree(tmp) == before


def test_restore_refuses_plain_checkpoint_trained_on_other_rows(base_dir, capsys):
    tmp, base, rows = base_dir
    loki_kernels.patch_model(base, rows)
    train(base, batch(), steps=2)
    base.save_pretrained(tmp / "trained")
    assert "target_pos" not in json.loads((tmp / "trained" / "config.json").read_text())
    other = [[r for r in range(HIDDEN) if r not in layer][:len(layer)] for layer in rows]  # disjoint from the trained
    (tmp / "other.json").write_text(json.dumps(other))
    before = _tree(tmp)

    message = _cli_error(capsys, "restore-model", _restore_argv(tmp, "other.json"))
    lost = sorted(rows[0])
    assert message == (f"layer 0: rows {lost[:5]}{' ...' if len(lost) > 5 else ''} of the trained model differ from "
                       f"the base model but are not in {tmp / 'other.json'}: it was trained with other target_pos, "
                       f"and restoring would lose those rows")
    assert not (tmp / "restored").exists() and _leftovers(tmp) == [] and _tree(tmp) == before

    # the right JSON restores it
    assert main(["restore-model"] + [str(a) for a in _restore_argv(tmp)]) == 0
    ids = batch()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp / "restored"), ids), logits(base, ids))


def test_restore_of_bfloat16_model_in_float16_is_not_refused(tmp_path, capsys):
    """Weights below float16's normal range round by more than float16's eps: still the base's, not trained."""
    model = tiny_model("llama")
    rows = random_rows()
    with torch.no_grad():
        for layer, layer_rows in zip(model.model.layers, rows):
            layer.mlp.down_proj.weight[:, 0] = 1e-6 * torch.rand(HIDDEN)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for layer, layer_rows in zip(model.model.layers, rows):
            layer.mlp.down_proj.weight[layer_rows] += 0.01  # what training did
    model.save_pretrained(tmp_path / "trained")
    (tmp_path / "10.json").write_text(json.dumps(rows))
    (tmp_path / "other.json").write_text(json.dumps([[r for r in range(HIDDEN) if r not in layer][:len(layer)]
                                                     for layer in rows]))
    args = _with(_restore_argv(tmp_path), "--torch-dtype", "float16")
    assert _cli_error(capsys, "restore-model", _with(args, "--target-pos-path", tmp_path / "other.json")).startswith(
        "layer 0: rows ")
    assert main(["restore-model"] + [str(a) for a in args]) == 0
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "restored")
    assert restored.dtype == torch.float16
    for layer, trained, layer_rows in zip(restored.model.layers, model.model.layers, rows):
        assert torch.equal(layer.mlp.down_proj.weight[layer_rows], trained.mlp.down_proj.weight[layer_rows].half())


# ------------------------------------------------------------------ 2. split checkpoints, missing base
@pytest.mark.parametrize("with_config", [True, False])
def test_restore_refuses_split_checkpoint_of_other_hidden_size(base_dir, capsys, with_config):
    tmp, base, rows = base_dir
    tiny_model(base.config.model_type, hidden_size=HIDDEN + 8).save_pretrained(tmp / "wide")
    save_split_checkpoint(tmp, base, rows)
    if not with_config:
        (tmp / "split" / "config.json").unlink()
    before = _tree(tmp)

    message = _cli_error(capsys, "restore-model", _restore_argv(tmp, model_path="split", model_name="wide"))
    if with_config:
        assert message == (f"the trained model {tmp / 'split'} has hidden size {HIDDEN} and {LAYERS} layers, the base "
                           f"model {tmp / 'wide'} {HIDDEN + 8} and {LAYERS}: not its base")
    else:
        k = len(rows[0])
        assert message == (f"layer 0: model.layers.0.mlp.down_proj.frozen.weight has shape [{HIDDEN - k}, {FFN}], but "
                           f"{tmp / '10.json'} lists {k} rows of a base down_proj of {HIDDEN + 8} x {FFN}, so it "
                           f"should be [{HIDDEN + 8 - k}, {FFN}]")
    assert not (tmp / "restored").exists() and _leftovers(tmp) == [] and _tree(tmp) == before


@pytest.mark.parametrize("config_has_target_pos", [True, False])
def test_restore_refuses_split_checkpoint_with_other_row_count(base_dir, capsys, config_has_target_pos):
    tmp, base, rows = base_dir
    save_split_checkpoint(tmp, base, rows)
    if not config_has_target_pos:
        config = json.loads((tmp / "split" / "config.json").read_text())
        del config["target_pos"]
        (tmp / "split" / "config.json").write_text(json.dumps(config))
    fewer = [list(r) for r in rows]
    dropped = fewer[1].pop()
    (tmp / "fewer.json").write_text(json.dumps(fewer))
    before = _tree(tmp)

    message = _cli_error(capsys, "restore-model", _restore_argv(tmp, "fewer.json", model_path="split"))
    k = len(rows[1])
    if config_has_target_pos:
        assert message == (f"{tmp / 'fewer.json'} is not the target_pos the model in {tmp / 'split'} was trained "
                           f"with: layer 1 lists {k - 1} rows, the model's config.target_pos {k} (they differ in row "
                           f"{dropped})")
    else:
        assert message == (f"layer 1: model.layers.1.mlp.down_proj.active.weight has shape [{k}, {FFN}], but "
                           f"{tmp / 'fewer.json'} lists {k - 1} rows of a base down_proj of {HIDDEN} x {FFN}, so it "
                           f"should be [{k - 1}, {FFN}]")
    assert not (tmp / "restored").exists() and _leftovers(tmp) == [] and _tree(tmp) == before


def test_restore_and_create_with_missing_base_model(base_dir, capsys):
    tmp, _, _ = base_dir
    _trained_loki(tmp)
    before = _tree(tmp)
    message = _cli_error(capsys, "restore-model", _with(_restore_argv(tmp), "--model-name", "/nonexistent"))
    assert message.startswith("cannot load the model config of '/nonexistent': ")
    message = _cli_error(capsys, "create-model", ["--model-name", "/nonexistent", "--target-pos-path", tmp / "10.json",
                                                  "--save-dir", tmp / "out"])
    assert message.startswith("cannot load the model config of '/nonexistent': ")
    message = _cli_error(capsys, "restore-model", _restore_argv(tmp, model_path="missing"))
    assert message == f"LoKI model not found: {tmp / 'missing'}"
    assert not (tmp / "restored").exists() and not (tmp / "out").exists()
    assert _leftovers(tmp) == [] and _tree(tmp) == before


# ------------------------------------------------------------------------- 3. model type mismatch
@pytest.mark.parametrize("source, wrong", [("qwen2", "llama"), ("llama", "qwen2")])
def test_create_refuses_other_model_type(tmp_path, capsys, source, wrong):
    tiny_model(source).save_pretrained(tmp_path / "base")
    (tmp_path / "10.json").write_text(json.dumps(random_rows()))
    before = _tree(tmp_path)

    message = _cli_error(capsys, "create-model", _create_argv(tmp_path) + ["--model-type", wrong])
    assert message == (f"--model-type {wrong} disagrees with {tmp_path / 'base'}'s config (model type {source!r}); "
                       f"pass --model-type {source} or leave it out")
    assert _tree(tmp_path) == before

    config_cls, model_cls = LOKI_CLASSES[wrong]
    with pytest.raises(ValueError) as info:
        loki.create_loki_model(loki_model_class=model_cls, loki_config_cls=config_cls, model_name=tmp_path / "base",
                               target_pos_path=tmp_path / "10.json", save_dir=tmp_path / "loki")
    assert str(info.value) == (f"model type {wrong!r} ({config_cls.__name__}) disagrees with {tmp_path / 'base'}'s "
                               f"config (model_type {source!r}); use the {source!r} classes")
    with pytest.raises(ValueError, match=f"model type {wrong!r} \\({config_cls.__name__}\\) disagrees"):
        loki.create_loki_model(loki_model_class=model_cls, model_name=tmp_path / "base",
                               target_pos_path=tmp_path / "10.json", save_dir=tmp_path / "loki")
    assert _tree(tmp_path) == before


def test_create_refuses_unknown_model_type_without_looking_it_up(base_dir, capsys, monkeypatch):
    tmp, _, _ = base_dir
    before = _tree(tmp)
    looked_up = []
    monkeypatch.setattr(model_utils, "load_config", lambda name, *a, **k: looked_up.append(str(name)))
    message = _cli_error(capsys, "create-model", _create_argv(tmp) + ["--model-type", "gemma"])
    assert message == "--model-type gemma: no LoKI model class for it; supported: llama, qwen2, qwen3, mistral"
    assert looked_up == [] and _tree(tmp) == before


# ------------------------------------------------------------------------------- 4. trust_remote_code
def test_create_dir_needs_trust_remote_code(base_dir):
    tmp, base, rows = base_dir
    _create(tmp)
    config = json.loads((tmp / "loki" / "config.json").read_text())
    assert config["model_type"] == f"loki_{base.config.model_type}"
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp / "loki")

    model = AutoModelForCausalLM.from_pretrained(tmp / "loki", trust_remote_code=True)
    assert type(model).__name__ == config["architectures"][0]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == [f"model.layers.{i}.mlp.down_proj.weight_active" for i in range(LAYERS)]
    for i, layer_rows in enumerate(rows):
        want = base.model.layers[i].mlp.down_proj.weight[sorted(layer_rows)]
        assert torch.equal(trainable[f"model.layers.{i}.mlp.down_proj.weight_active"], want)
    assert sum(p.numel() for p in trainable.values()) == sum(map(len, rows)) * FFN


# ---------------------------------------------------------------------------- 5. existing outputs
@pytest.mark.parametrize("command", ["create-model", "restore-model"])
def test_existing_output_needs_overwrite(base_dir, capsys, command):
    tmp, base, rows = base_dir
    if command == "create-model":
        argv, out_flag, sources = _create_argv, "--save-dir", ["base"]
    else:
        trained = _trained_loki(tmp)
        argv, out_flag, sources = _restore_argv, "--output-path", ["base", "trained"]

    def run(target, *extra):
        return [str(a) for a in _with(argv(tmp), out_flag, tmp / target)] + list(extra)

    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("keep me")
    (tmp / "file").write_text("a file")
    before = _tree(tmp)
    message = _cli_error(capsys, command, run("out"))
    assert message == (f"output {tmp / 'out'} already exists and is not empty; choose another one, or pass "
                       f"--overwrite (overwrite=True) to replace it")
    assert _cli_error(capsys, command, run("file")) == f"output {tmp / 'file'} exists and is not a directory"
    for source in sources:
        message = _cli_error(capsys, command, run(source))
        assert message == (f"output {tmp / source} is the source model's directory; choose another one, or pass "
                           f"--overwrite (overwrite=True) to replace it")
    assert _tree(tmp) == before

    ids = batch()
    expected = logits(trained, ids) if command == "restore-model" else logits(base, ids)
    load = {"trust_remote_code": True} if command == "create-model" else {}
    for target in ["out"] + sources[::-1]:
        assert main([command] + run(target, "--overwrite")) == 0
        assert not (tmp / target / "notes.txt").exists() and _leftovers(tmp) == []
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp / target, **load), ids), expected)
    if command == "create-model":  # the source dir itself became a LoKI dir
        assert json.loads((tmp / "base" / "config.json").read_text())["target_pos"] == [sorted(r) for r in rows]


# ------------------------------------------------------------------------------ 6. temporary dirs
def _fail(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("where, exc, code", [
    ("save_pretrained", OSError(28, "No space left on device"), 2),
    ("save_pretrained", KeyboardInterrupt(), 130),
    ("_save_tokenizer", OSError(28, "No space left on device"), 2),
    ("_save_tokenizer", KeyboardInterrupt(), 130),
])
def test_create_errors_leave_no_temp_dir(base_dir, capsys, monkeypatch, existing, where, exc, code):
    tmp, _, _ = base_dir
    if existing:
        (tmp / "loki").mkdir()
        (tmp / "loki" / "old.txt").write_text("old")
    before = _tree(tmp)
    if where == "save_pretrained":
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _fail(exc))
    else:
        monkeypatch.setattr(model_utils, where, _fail(exc))
    args = [str(a) for a in _create_argv(tmp)] + (["--overwrite"] if existing else [])
    capsys.readouterr()
    assert main(["create-model"] + args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == ("loki create-model: interrupted\n" if code == 130 else
                   "loki create-model: error: [Errno 28] No space left on device\n")
    assert _leftovers(tmp) == [] and _tree(tmp) == before


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_restore_and_zero_errors_leave_no_temp_dir(base_dir, monkeypatch, exc):
    tmp, _, _ = base_dir
    _trained_loki(tmp)
    (tmp / "restored").mkdir()
    (tmp / "restored" / "old.txt").write_text("old")
    before = _tree(tmp)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _fail(exc))
    with pytest.raises(type(exc)):
        loki.restore_loki_model(tmp / "10.json", tmp / "trained", tmp / "base", tmp / "restored",
                                torch_dtype=torch.float32, overwrite=True)
    with pytest.raises(type(exc)):
        loki.set_zero_weights(tmp / "10.json", tmp / "zeroed", tmp / "base", torch_dtype=torch.float32)
    assert _leftovers(tmp) == [] and _tree(tmp) == before


def test_failed_run_removes_parent_dirs_it_made(base_dir, capsys, monkeypatch):
    tmp, _, _ = base_dir
    before = _tree(tmp)
    monkeypatch.setattr(model_utils, "_save_tokenizer", _fail(OSError(28, "No space left on device")))
    message = _cli_error(capsys, "create-model", _with(_create_argv(tmp), "--save-dir", tmp / "a" / "b" / "loki"))
    assert message == "[Errno 28] No space left on device"
    assert not (tmp / "a").exists() and _tree(tmp) == before


@pytest.mark.parametrize("exc", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_failed_swap_keeps_old_output(base_dir, monkeypatch, exc):
    """The old directory is moved aside before the new one moves in: if that second move fails, it comes back."""
    tmp, _, _ = base_dir
    (tmp / "loki").mkdir()
    (tmp / "loki" / "old.txt").write_text("old")
    before = _tree(tmp)
    replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if ".loki-tmp-" in os.fspath(src):
            raise exc
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(model_utils.os, "replace", failing_replace)
    with pytest.raises(type(exc)):
        loki.create_loki_model(model_name=tmp / "base", target_pos_path=tmp / "10.json", save_dir=tmp / "loki",
                               torch_dtype=torch.float32, overwrite=True)
    assert _leftovers(tmp) == [] and _tree(tmp) == before


@pytest.mark.parametrize("name", ["loki", "lo[k]i"])
def test_stale_temp_dirs_of_dead_processes_are_removed(base_dir, name):
    tmp, _, _ = base_dir
    dead = 999999
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stale = [tmp / f".{name}.loki-tmp-{dead}-abcd", tmp / f".{name}.loki-old-{dead}-abcd"]
        live = [tmp / f".{name}.loki-tmp-{sleeper.pid}-abcd", tmp / f".{name}.loki-old-{sleeper.pid}-abcd"]
        other = [tmp / f".other.loki-tmp-{dead}-abcd"]  # another output's: not ours to judge
        for d in stale + live + other:
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half")
        _create(tmp, save_dir=name)
        assert AutoModelForCausalLM.from_pretrained(tmp / name, trust_remote_code=True) is not None
        assert _leftovers(tmp) == sorted(d.name for d in live + other)
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------------- 7. set_zero_weights
def test_set_zero_weights_output_rules(base_dir):
    tmp, _, rows = base_dir
    (tmp / "zeroed").mkdir()
    (tmp / "zeroed" / "notes.txt").write_text("keep me")
    (tmp / "bad.json").write_text(json.dumps(rows[:-1]))
    before = _tree(tmp)
    with pytest.raises(ValueError) as info:
        loki.set_zero_weights(tmp / "10.json", tmp / "zeroed", tmp / "base", torch_dtype=torch.float32)
    assert str(info.value) == (f"output {tmp / 'zeroed'} already exists and is not empty; choose another one, or "
                               f"pass --overwrite (overwrite=True) to replace it")
    with pytest.raises(ValueError, match="is the source model's directory"):
        loki.set_zero_weights(tmp / "10.json", tmp / "base", tmp / "base", torch_dtype=torch.float32)
    with pytest.raises(ValueError, match=f"bad.json: target_pos has {LAYERS - 1} layers"):
        loki.set_zero_weights(tmp / "bad.json", tmp / "new", tmp / "base", torch_dtype=torch.float32)
    assert _tree(tmp) == before

    loki.set_zero_weights(tmp / "10.json", tmp / "zeroed", tmp / "base", torch_dtype=torch.float32, overwrite=True)
    assert not (tmp / "zeroed" / "notes.txt").exists() and _leftovers(tmp) == []
    zeroed = AutoModelForCausalLM.from_pretrained(tmp / "zeroed")
    for i, layer_rows in enumerate(rows):
        assert torch.count_nonzero(zeroed.model.layers[i].mlp.down_proj.weight[layer_rows]) == 0


# ==================================================================================================
# 2. loki analyse
# ==================================================================================================
SUBJECTS = ("college_biology", "world_religions", "astronomy")
WORDS = ["orbit", "cell", "temple", "don't", 'say "hi"', "a, b", "café", "comet", "gene", "prayer", "nebula", "enzyme"]
RESULT = "kva_mmlu.h5"


def _records(n, rng):
    """Fresh random MMLU-format records (choices hold quotes, commas and non-ASCII; answers are ints)."""
    records = []
    for _ in range(n):
        choices = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 6)), replace=False)]
        records.append({
            "subject": str(rng.choice(SUBJECTS)),
            "question": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) + f" {rng.integers(1000)}?",
            "choices": choices,
            "answer": int(rng.integers(0, len(choices))),
        })
    return records


def _questions(records):
    return [Question(r["subject"], r["question"], tuple(r["choices"]), r["answer"]) for r in records]


def _jsonl(records, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def analyse_model(tmp_path_factory):
    """A tiny random Llama with a character tokenizer, saved locally."""
    return saved_char_model(tmp_path_factory.mktemp("faults_analyse"))


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])  # new data every run and test


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything loads the model."""
    def loaded(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(analyse, "_load_model", loaded)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)


def _argv(model_dir, data, out_dir, *extra):
    return ["analyse", "--model-path", str(model_dir), "--data", str(data), "--output-dir", str(out_dir),
            "--steps", "3", "--batch-size", "2", "--torch-dtype", "float32", *extra]


def _cli(capsys, argv):
    """``loki`` in this process, with what the test printed before dropped from the captured output."""
    capsys.readouterr()
    return main(argv)


def _one_error(capsys, rc, *needles):
    """Exit status 2 and exactly one stderr line ``loki analyse: error: ...`` holding every needle."""
    line = error_line(capsys, "analyse", rc)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _untouched(out_dir, before=None):
    """Nothing made in ``out_dir`` (or the output is byte for byte ``before``), and no lock file."""
    output = out_dir / RESULT
    if before is None:
        assert not output.exists()
    else:
        assert output.read_bytes() == before
    assert not (out_dir / (RESULT + ".lock")).exists()
    assert not out_dir.exists() or sorted(p.name for p in out_dir.iterdir()) == ([RESULT] if before else [])


def _interrupt_at(monkeypatch, call):
    """kva.attribute raises KeyboardInterrupt on its ``call``-th call (batches before it are written)."""
    real, n = kva.attribute, {"calls": 0}

    def attribute(*a, **kw):
        n["calls"] += 1
        if n["calls"] == call:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(kva, "attribute", attribute)
    return lambda: monkeypatch.setattr(kva, "attribute", real)


# ------------------------------------------------------------------------------------- 1. malformed data
def _bad_data(case, path, rng):
    """A data file with one fault at a random record; returns (path, needles the error must hold)."""
    records = _records(6, rng)
    k = int(rng.integers(0, len(records)))
    if case == "eleven_choices":
        records[k]["choices"] = [f"c{i}" for i in range(11)]
        needles = [f"record {k}", "11 choices"]
    elif case == "answer_minus_one_str":
        records[k]["answer"] = "-1"
        needles = [f"record {k}", "answer '-1'"]
    elif case == "answer_minus_one_int":
        records[k]["answer"] = -1
        needles = [f"record {k}", "answer -1"]
    elif case == "answer_bool":
        records[k]["answer"] = True
        needles = [f"record {k}", "answer True"]
    elif case == "missing_field":
        del records[k]["answer"]
        needles = [f"record {k}", "missing field 'answer'"]
    elif case == "empty_question":
        records[k]["question"] = "   "
        needles = [f"record {k}", "question is empty"]
    elif case == "not_an_object":
        lines = [json.dumps(r) for r in records]
        lines[k] = json.dumps(records[k]["choices"])
        path.write_text("\n".join(lines) + "\n")
        return path, [f"record {k}", "expected an object", "got list"]
    elif case == "bad_jsonl_line":
        lines = [json.dumps(r) for r in records]
        lines[k] = lines[k][:-5]
        path.write_text("\n".join(lines) + "\n")
        return path, [f"line {k + 1}", "not valid JSON"]
    elif case == "not_utf8":
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records[:k]) + b'{"question": "\xff"}\n')
        return path, ["not UTF-8"]
    elif case == "json_string":
        path = path.with_suffix(".json")
        path.write_text(json.dumps("hello"))
        return path, ["expected a JSON list", "got str"]
    return _jsonl(records, path), needles


@pytest.mark.parametrize("case", ["eleven_choices", "json_string", "answer_minus_one_str", "answer_minus_one_int",
                                  "answer_bool", "bad_jsonl_line", "not_an_object", "missing_field",
                                  "empty_question", "not_utf8"])
def test_malformed_data_is_one_line_naming_file_and_record(analyse_model, tmp_path, capsys, no_model, rng, case):
    model_dir, *_ = analyse_model
    data, needles = _bad_data(case, tmp_path / "data.jsonl", rng)
    with pytest.raises(ValueError) as info:
        load_questions(data)
    assert str(data) in str(info.value) and len(str(info.value).splitlines()) == 1
    rc = _cli(capsys, _argv(model_dir, data, tmp_path / "out"))
    _one_error(capsys, rc, str(data), *needles)
    _untouched(tmp_path / "out")


# ------------------------------------------------------------------------------------ 2. pandas-written data
@pytest.mark.parametrize("how", ["to_csv", "to_csv_no_index", "to_json", "records", "split", "index", "table"])
def test_pandas_written_data_loads(tmp_path, rng, how):
    records = _records(12, rng)  # more than 10 rows: row keys "10", "11" must keep their order
    frame = pd.DataFrame(records)
    if how.startswith("to_csv"):
        path = tmp_path / "data.csv"
        frame.to_csv(path, index=how == "to_csv")  # choices as "['a', 'b']", answers as ints
        assert "['" in path.read_text()
    else:
        path = tmp_path / "data.json"
        if how == "to_json":
            frame.to_json(path)  # the default orient ("columns")
        else:
            frame.to_json(path, orient=how)
    assert load_questions(path) == _questions(records)


# ---------------------------------------------------------------------------------- 3. too long for the model
def test_prompt_longer_than_the_model_is_refused_first(tmp_path, capsys, no_model, rng):
    tok = char_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    records = _records(5, rng)
    k = int(rng.integers(0, len(records)))
    records[k]["question"] = " ".join(rng.choice(WORDS, size=80))
    data = _jsonl(records, tmp_path / "data.jsonl")
    lengths = [len(prompt_ids(tok, q)) for q in _questions(records)]
    assert max(n for i, n in enumerate(lengths) if i != k) <= 256 < lengths[k]  # only question k is too long

    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"question {k} \(.*\) is {lengths[k]} tokens long.* 256 positions"):
        run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=out_dir / RESULT))
    rc = _cli(capsys, _argv(model_dir, data, out_dir))
    _one_error(capsys, rc, f"question {k} ", f"{lengths[k]} tokens", "max_position_embeddings")
    _untouched(out_dir)


# ------------------------------------------------------------------------------------------ 4. bad flags
@pytest.mark.parametrize("extra, needles", [
    (["--batch-size", "0"], ["--batch-size", "got 0"]),
    (["--batch-size", "-3"], ["--batch-size", "got -3"]),
    (["--method", "riemann_left", "--steps", "1"], ["--steps", "steps >= 2", "got 1"]),
    (["--steps", "0"], ["--steps", "got 0"]),
    (["--max-batch-rows", "0"], ["--max-batch-rows", "got 0"]),
    (["--shots", "-1"], ["--shots", "got -1"]),
    (["--shots", "2"], ["--shots", "--dev-data"]),
    (["--max-samples-per-subset", "0"], ["--max-samples-per-subset", "got 0"]),
])
def test_every_flag_is_checked_before_loading(analyse_model, tmp_path, capsys, no_model, rng, extra, needles):
    model_dir, *_ = analyse_model
    data = _jsonl(_records(4, rng), tmp_path / "data.jsonl")
    rc = _cli(capsys, _argv(model_dir, data, tmp_path / "out", *extra))
    _one_error(capsys, rc, *needles)
    _untouched(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 5. resume
def test_resume_refuses_edited_data(analyse_model, tmp_path, monkeypatch, capsys, rng):
    model_dir, model, tok = analyse_model
    records = _records(5, rng)
    data = _jsonl(records, tmp_path / "data.jsonl")
    output = tmp_path / "out" / RESULT
    restore = _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=output, steps=3, batch_size=2), model, tok)
    restore()
    assert read_attributions(output).shape[0] == 2
    before = output.read_bytes()

    records[int(rng.integers(0, 5))]["question"] += " edited"  # same path, same count, other content
    _jsonl(records, data)
    with pytest.raises(ValueError, match="content of --data changed"):
        run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=output, steps=3, batch_size=2), model, tok)
    rc = _cli(capsys, _argv(model_dir, data, output.parent))
    _one_error(capsys, rc, str(output), "content of --data changed")
    _untouched(output.parent, before)


def test_resume_accepts_another_spelling_of_the_same_file(analyse_model, tmp_path, monkeypatch, rng):
    model_dir, model, tok = analyse_model
    data = _jsonl(_records(5, rng), tmp_path / "data.jsonl")

    def args(data, output, model_dir=model_dir):
        return AnalyseArgs(model_path=model_dir, data=data, output=output, steps=3, batch_size=2)

    full = read_attributions(run_analysis(args(data, tmp_path / "full.h5"), model, tok))
    restore = _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(args(data.resolve(), (tmp_path / "part.h5").resolve()), model, tok)  # absolute paths
    restore()
    assert read_attributions(tmp_path / "part.h5").shape[0] == 2

    monkeypatch.chdir(tmp_path)  # relative spellings of the same data file, output and model
    relative = args(type(data)("data.jsonl"), type(data)("part.h5"), type(data)(os.path.relpath(model_dir)))
    run_analysis(relative, model, tok)
    resumed = read_attributions(tmp_path / "part.h5")
    assert resumed.shape == full.shape == (5, LAYERS, HIDDEN)  # completed, nothing duplicated
    np.testing.assert_allclose(resumed, full, rtol=1e-5, atol=1e-7)
    run_analysis(relative, model, tok)
    assert read_attributions(tmp_path / "part.h5").shape == full.shape
    assert not (tmp_path / "part.h5.lock").exists()


# ------------------------------------------------------------------------------------------ 6. damaged output
def _damage(path, how, rng):
    data = bytearray(path.read_bytes())
    if how == "chunk":  # bytes in the middle of the middle sample's compressed chunk
        with h5py.File(path, "r") as f:
            info = f["dataset"].id.get_chunk_info_by_coord((2, 0, 0))
        start = info.byte_offset + info.size // 2
        data[start:start + 16] = rng.bytes(16)
    elif how == "chunk_index":  # the chunk B-tree loses sample 4's chunk: HDF5 reads it as the fill value
        node = data.find(b"TREE\x01")  # v1 B-tree node of chunks; keys of 4 + 4 + 8 * (rank + 1) bytes
        assert node > 0
        key4 = node + 24 + 4 * (40 + 8)
        data[key4 + 8:key4 + 16] = bytes(8)  # its offset along the sample axis: 4 -> 0
    elif how == "object_header":  # the attribute messages of the dataset
        start = data.find(b"metadata_ig_method")
        data[start - 8:start - 4] = b"\xff" * 4
    elif how == "truncated":
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["chunk", "chunk_index", "object_header", "truncated"])
def test_damaged_output_is_reported_not_written(analyse_model, tmp_path, capsys, no_model, rng, how):
    model_dir, model, tok = analyse_model
    data = _jsonl(_records(5, rng), tmp_path / "data.jsonl")
    out_dir = tmp_path / "out"
    output = run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=out_dir / RESULT, steps=3,
                                      batch_size=2, torch_dtype="float32"), model, tok)
    assert read_attributions(output).shape == (5, LAYERS, HIDDEN)
    _damage(output, how, rng)
    damaged = output.read_bytes()

    with pytest.raises(ValueError) as info:
        run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=output, steps=3, batch_size=2), model, tok)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "damaged" in message or "not a readable HDF5 file" in message, message
    rc = _cli(capsys, _argv(model_dir, data, out_dir))  # the CLI says so too, and never "written"
    line = _one_error(capsys, rc, str(output))
    assert "damaged" in line or "not a readable HDF5 file" in line, line
    _untouched(out_dir, damaged)


# ------------------------------------------------------------------------------------ 7. one run per output
def test_second_run_refused_while_our_lock_is_held(analyse_model, tmp_path, monkeypatch, capsys, rng):
    model_dir, model, tok = analyse_model
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")  # HDF5's own lock off: ours must still hold
    data = _jsonl(_records(5, rng), tmp_path / "data.jsonl")
    out_dir = tmp_path / "out"
    output = out_dir / RESULT
    restore = _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=output, steps=3, batch_size=2), model, tok)
    restore()
    assert not (out_dir / (RESULT + ".lock")).exists()  # released after a failed run too
    before = output.read_bytes()

    with FileLock(output):
        rc = _cli(capsys, _argv(model_dir, data, out_dir))
        _one_error(capsys, rc, str(output), "in use")
        assert output.read_bytes() == before
    _untouched(out_dir, before)
    assert _cli(capsys, _argv(model_dir, data, out_dir)) == 0  # free again: it completes
    assert read_attributions(output).shape == (5, LAYERS, HIDDEN)
    assert not (out_dir / (RESULT + ".lock")).exists()


_PAUSED_RUN = """
import sys
from loki_kernels import kva
from loki.cli import main

real, calls = kva.attribute, [0]

def attribute(*a, **kw):
    calls[0] += 1
    if calls[0] == 2:  # the first batch is written: pause mid-run until told to go on
        print("paused", flush=True)
        sys.stdin.readline()
    return real(*a, **kw)

kva.attribute = attribute
sys.exit(main(sys.argv[1:]))
"""


def _env(**changes):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **changes}
    env.pop("TRITON_INTERPRET", None)
    return env


def test_two_runs_on_one_output_with_hdf5_locking_off(analyse_model, tmp_path, monkeypatch, capsys, rng):
    model_dir, *_ = analyse_model
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
    data = _jsonl(_records(5, rng), tmp_path / "data.jsonl")
    out_dir = tmp_path / "out"
    output = out_dir / RESULT
    first = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, *_argv(model_dir, data, out_dir)],
                             env=_env(HDF5_USE_FILE_LOCKING="FALSE"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "paused", first.stderr.read()
        with h5py.File(output, "r") as f:  # HDF5 does not lock it: only our lock keeps a second run out
            assert f["dataset"].shape[0] == 2
        before = output.read_bytes()
        rc = _cli(capsys, _argv(model_dir, data, out_dir))
        _one_error(capsys, rc, str(output), "in use")
        assert output.read_bytes() == before
        _, err = first.communicate("\n", timeout=300)  # go on: the first run completes
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert read_attributions(output).shape == (5, LAYERS, HIDDEN)
    assert sorted(p.name for p in out_dir.iterdir()) == [RESULT]  # no lock file left


# --------------------------------------------------------------------------------------- 8. HDF5's own lock
_HOLD_OPEN = """
import sys, h5py
f = h5py.File(sys.argv[1], "a")
print("open", flush=True)
sys.stdin.readline()
f.close()
"""


def test_file_held_open_by_hdf5_is_in_use(analyse_model, tmp_path, monkeypatch, capsys, rng):
    model_dir, model, tok = analyse_model
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    data = _jsonl(_records(5, rng), tmp_path / "data.jsonl")
    out_dir = tmp_path / "out"
    output = run_analysis(AnalyseArgs(model_path=model_dir, data=data, output=out_dir / RESULT, steps=3,
                                      batch_size=2), model, tok)
    env = _env()
    env.pop("HDF5_USE_FILE_LOCKING", None)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_OPEN, str(output)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open", holder.stderr.read()
        before = output.read_bytes()
        rc = _cli(capsys, _argv(model_dir, data, out_dir))
        line = _one_error(capsys, rc, str(output), "in use")
        assert "not a readable HDF5 file" not in line
        for attempt in (lambda: open_attributions(output).__enter__(),
                        lambda: AttributionWriter(output, LAYERS, HIDDEN, resume=True),
                        lambda: AttributionWriter(output, LAYERS, HIDDEN, overwrite=True)):
            with pytest.raises(ValueError, match="in use") as info:
                attempt()
            assert "not a readable" not in str(info.value) and "not a writable" not in str(info.value)
        assert output.read_bytes() == before  # overwrite=True did not truncate it either
        _, err = holder.communicate("\n", timeout=60)
        assert holder.returncode == 0, err
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert sorted(p.name for p in out_dir.iterdir()) == [RESULT]
    assert read_attributions(output).shape == (5, LAYERS, HIDDEN)


# ==================================================================================================
# 3. select-nodes, patch_model, kva.attribute, --help
# ==================================================================================================
def _scores(n=7, layers=LAYERS, hidden=HIDDEN):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    return rng.standard_normal((n, layers, hidden)).astype(np.float32)


def _write_h5(path, scores):
    with AttributionWriter(path, scores.shape[1], scores.shape[2], metadata={"model_name": "tiny"}) as w:
        w.append(scores)
    return path




def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


# --------------------------------------------------------------- 1. select-nodes: fractional quotas
@pytest.mark.parametrize("strategy", ["layer_balanced", "global_lowest"])
def test_fractional_quotas_get_their_own_file(tmp_path, capsys, strategy):
    # 200 rows per layer so that 12% and 12.5% select different numbers of rows
    hidden = 200
    scores = _scores(layers=LAYERS, hidden=hidden)
    path = _write_h5(tmp_path / "run" / "kva.h5", scores)
    out = tmp_path / "pos"
    for quota in ("12", "12.5"):
        assert main(["select-nodes", "--hdf5-path", str(path), "--quota", quota, "--strategy", strategy,
                     "--output-dir", str(out)]) == 0
    prefix = "" if strategy == "layer_balanced" else f"{strategy}_"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{prefix}12.json", f"{prefix}12.5.json"])
    for quota in (12, 12.5):
        rows = json.loads((out / f"{prefix}{quota:g}.json").read_text())
        assert rows == select_target_pos(scores, quota, strategy)
        if strategy == "layer_balanced":
            assert [len(r) for r in rows] == [layer_quota(hidden, quota)] * LAYERS
        else:
            assert sum(map(len, rows)) == total_quota(LAYERS, hidden, quota)
    assert layer_quota(hidden, 12) != layer_quota(hidden, 12.5)


def test_quota_names_never_collide():
    quotas = [12, 12.5, 33.333333, 33.3333, 33.33333, 0.1, 1e-3, 99.99999, 100]
    for strategy in ("layer_balanced", "global_lowest"):
        names = [quota_name(q, strategy) for q in quotas]
        assert len(set(names)) == len(quotas), names
    assert quota_name(12.0, "layer_balanced") == "12.json"
    assert quota_name(12.5, "global_lowest") == "global_lowest_12.5.json"


# ---------------------------------------------------- 2. select-nodes: a quota that selects nothing
@pytest.mark.parametrize("strategy, quota", [
    ("layer_balanced", 1.0),          # 40 * 1% = 0.4 rows per layer
    ("layer_balanced", 2.4999),
    ("global_lowest", 0.5),           # 120 * 0.5% = 0.6 rows in all
    ("global_highest", 0.8),
])
def test_quota_that_selects_no_row_is_an_error(tmp_path, capsys, strategy, quota):
    path = _write_h5(tmp_path / "kva.h5", _scores())
    out = tmp_path / "pos"
    code = main(["select-nodes", "--hdf5-path", str(path), "--quota", str(quota), "--strategy", strategy,
                 "--output-dir", str(out)])
    err = error_line(capsys, "select-nodes", code)
    assert f"quota {quota:g}% selects no row" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kva.h5"]


# -------------------------------------------------------------------- 3. select-nodes: corrupt HDF5
def _damage_middle_chunk(path):
    """Overwrite the stored bytes of a chunk in the middle of the dataset (the file still opens)."""
    with h5py.File(path, "r") as f:
        dset = f["dataset"]
        n = dset.id.get_num_chunks()
        info = dset.id.get_chunk_info(n // 2)
        offset, size, sample = info.byte_offset, info.size, info.chunk_offset[0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))
    return sample


@pytest.mark.parametrize("damage", ["not_hdf5", "truncated", "btree", "heap", "chunk"])
def test_corrupt_hdf5_is_one_line(tmp_path, capsys, damage):
    path = tmp_path / "kva.h5"
    if damage == "not_hdf5":
        path.write_bytes(os.urandom(4096))
    else:
        _write_h5(path, _scores(n=9))
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif damage in ("btree", "heap"):  # the file opens, its root group's index does not
            at = data.index(b"TREE" if damage == "btree" else b"HEAP")
            path.write_bytes(data[:at] + b"XXXX" + data[at + 4:])
        else:
            sample = _damage_middle_chunk(path)
            with h5py.File(path, "r") as f:  # opening works, reading that sample does not
                assert f["dataset"].shape[0] == 9
                with pytest.raises(OSError):
                    f["dataset"][sample]
    out = tmp_path / "pos"
    code = main(["select-nodes", "--hdf5-path", str(path), "--quota", "10", "--output-dir", str(out)])
    err = error_line(capsys, "select-nodes", code)
    assert str(path) in err
    if damage == "chunk":
        assert "samples" in err
    assert not out.exists()


def test_corrupt_chunk_names_file_and_samples_in_library(tmp_path):
    path = _write_h5(tmp_path / "kva.h5", _scores(n=9))
    sample = _damage_middle_chunk(path)
    with pytest.raises(ValueError) as info:
        select_target_pos(path, 10, chunk_size=4)
    message = str(info.value)
    start = sample // 4 * 4
    assert str(path) in message and f"samples {start}-{min(start + 4, 9) - 1}" in message
    assert "\n" not in message


# ---------------------------------------------------------------------- 4. patch_model: meta device
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patch_model_built_on_meta_device(arch):
    real = tiny_model(arch)
    rows = random_rows()
    with torch.device("meta"):
        meta = tiny_model(arch)
    assert next(meta.parameters()).is_meta
    patch_model(meta, rows)
    meta.to_empty(device="cpu")
    meta.tie_weights()  # to_empty unties tied weights (GPT-2's lm_head), with or without patching
    meta.load_state_dict(real.state_dict())  # strict: weight_active/bias_active come from `weight`
    for p, layer_rows in zip(find_down_projs(meta), rows):  # rebuilt by SplitLinear._apply, not loaded
        assert torch.equal(p.module.active_pos, torch.tensor(sorted(layer_rows)))
        assert p.module.index_map.tolist() == [
            sorted(layer_rows).index(j) if j in layer_rows else len(layer_rows) + j for j in range(HIDDEN)]
    # non-persistent buffers of the model itself (rotary inv_freq, ...) are not in any state dict: from_pretrained
    # recomputes them; here they are copied from the real model
    real_buffers = dict(real.named_buffers())
    for name, buf in meta.named_buffers():
        if not name.endswith(("active_pos", "index_map")):
            buf.copy_(real_buffers[name])

    patch_model(real, rows)
    for p_meta, p_real in zip(find_down_projs(meta), find_down_projs(real)):
        m, r = p_meta.module, p_real.module
        assert isinstance(m, SplitLinear)
        assert torch.equal(m.active_pos, r.active_pos) and torch.equal(m.index_map, r.index_map)
        assert torch.equal(m.weight_active, r.weight_active)
    ids = batch()
    assert torch.equal(logits(meta, ids), logits(real, ids))

    assert _flags(meta) == _flags(real)
    before = snapshot(meta)
    train(meta, ids, steps=2)
    after = snapshot(meta)
    for p, layer_rows in zip(find_down_projs(meta), rows):
        key = f"{p.name}.weight"
        changed = (after[key] != before[key]).reshape(HIDDEN, -1) if arch != "gpt2" else (after[key] != before[key]).t()
        assert set(changed.any(dim=1).nonzero().flatten().tolist()) == set(layer_rows)
    for key in before:
        if not key.endswith(tuple(f"{p.name}.{s}" for p in find_down_projs(meta) for s in ("weight", "bias"))):
            assert torch.equal(after[key], before[key]), key


# -------------------------------------------------------------- 5. patch_model: requires_grad flags
def _random_flags(model):
    for p in model.parameters():
        p.requires_grad_(random.random() < 0.5)
    return _flags(model)


@pytest.mark.parametrize("sequence", ["patch-unpatch", "nofreeze", "twice", "base-then-model"])
def test_requires_grad_flags_come_back(sequence):
    random.seed(int(torch.randint(0, 2**31, ())))
    model = tiny_model()
    flags = _random_flags(model)
    assert set(flags.values()) == {True, False} or len(flags) < 4
    if sequence == "patch-unpatch":
        patch_model(model, random_rows())
        unpatch_model(model)
    elif sequence == "nofreeze":
        patch_model(model, random_rows(), freeze_rest=False)
        unpatch_model(model)
    elif sequence == "twice":
        patch_model(model, random_rows())
        unpatch_model(model)
        patch_model(model, random_rows(), freeze_rest=False)
        unpatch_model(model)
    else:
        patch_model(model.model, random_rows())
        unpatch_model(model)
    assert _flags(model) == flags
    assert not any(isinstance(m, SplitLinear) for m in model.modules())


def test_failed_patch_leaves_flags_and_model_unchanged():
    random.seed(int(torch.randint(0, 2**31, ())))
    model = tiny_model()
    flags = _random_flags(model)
    before = snapshot(model)
    modules = {n: type(m) for n, m in model.named_modules()}
    rows = random_rows()
    rows[-1] = rows[-1] + [HIDDEN + 3]
    with pytest.raises(ValueError, match=f"layer {LAYERS - 1}: row {HIDDEN + 3} is out of range"):
        patch_model(model, rows)
    assert _flags(model) == flags
    assert {n: type(m) for n, m in model.named_modules()} == modules
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model, "_loki_requires_grad")


# ----------------------------------------------------------- 6. patch_model: peft-wrapped down_proj
@pytest.mark.parametrize("which", ["peft", "base"])
def test_patch_refuses_peft_wrapped_down_proj(which):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(target_modules=["down_proj"], r=2))
    target = model if which == "peft" else model.base_model.model
    flags, before = _flags(model), snapshot(model)
    modules = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError) as info:
        patch_model(target, random_rows())
    message = str(info.value)
    assert "before" in message and "loki_kernels.lora" in message and "down_proj" in message
    assert _flags(model) == flags
    assert {n: type(m) for n, m in model.named_modules()} == modules
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


# -------------------------------------------------------------- 7. patch_model: a layer named twice
@pytest.mark.parametrize("keys", [(0, "0"), ("2", 2), (1, " 1")])
def test_patch_refuses_layer_named_twice(keys):
    model = tiny_model()
    flags, before = _flags(model), snapshot(model)
    rows = random_rows()
    layer = int(keys[0])
    with pytest.raises(ValueError, match=f"layer {layer} twice"):
        patch_model(model, {keys[0]: rows[0], keys[1]: rows[1]})
    assert _flags(model) == flags
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------ 8. kva.attribute: bad ids, targets, lengths
@pytest.mark.parametrize("case", ["too_long", "id_too_big", "id_negative", "target_too_big", "target_negative"])
def test_attribute_rejects_bad_input_before_running(case):
    model = tiny_model()
    calls = []
    forward = model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    model.forward = counting
    ids = batch(n=2, length=8)
    target = "argmax"
    if case == "too_long":
        ids = torch.randint(0, VOCAB, (2, 65))
        value = "65 tokens"
    elif case == "id_too_big":
        bad = VOCAB + int(torch.randint(0, 50, ()))
        ids[1, 3] = bad
        value = f"token id {bad}"
    elif case == "id_negative":
        ids[0, 5] = -4
        value = "token id -4"
    elif case == "target_too_big":
        target = [3, VOCAB + 1]
        value = f"target {VOCAB + 1}"
    else:
        target = torch.tensor([-1, 3])
        value = "target -1"
    with pytest.raises(ValueError, match=value):
        attribute(model, ids, target=target, steps=2)
    assert calls == []


# ------------------------------------------------------------------- 9. every --help shows defaults
def _parsers():
    parser = build_parser()
    yield "loki", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from ((f"loki {name}", p) for name, p in action.choices.items())


def test_every_help_shows_defaults():
    checked = 0
    for name, parser in _parsers():
        text = " ".join(parser.format_help().split())  # argparse wraps lines
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            shown = f"(default: {action.default})"
            assert shown in text, f"{name} --help does not show {action.option_strings[0]}'s {shown}"
            checked += 1
    assert checked >= 10


def test_help_output_shows_defaults_end_to_end():
    done = subprocess.run([sys.executable, "-m", "loki.cli", "demo", "--help"], capture_output=True, text=True)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "(default: 400 tiny model; pretrained model: at most 40" in text
    assert "(default: loki_demo, ica_demo or kfac_demo)" in text
    assert "(default: 0)" in text and "(default: None)" not in text
