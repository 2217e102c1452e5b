"""`loki ica build-templates|positions` end to end on a tiny saved model (character tokenizer): each command writes
what the library computes on the same inputs, and every mistake is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from loki.cli import main
from loki_kernels.data import batches, read_records, tokenize_records
from loki_kernels.ica import Templates, build_templates, load_templates, positions, save_templates, silenced
from loki_kernels.target_pos import check_target_pos
from tests.tiny_models import HIDDEN, LAYERS, saved_char_model

BUILD = ["--seq-len", "24", "--batch-size", "3", "--components", "4", "--percentile", "90", "--max-pca-components",
         "30", "--samples-per-file", "6", "--max-sequences", "10", "--seed", "3"]


def text(n):
    return "".join(chr(c) for c in torch.randint(33, 127, (n,)).tolist())


@pytest.fixture
def setup(tmp_path):
    path, model, tok = saved_char_model(tmp_path, max_positions=64)
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": text(9), "input": "", "output": text(12)}) + "\n"
                              for _ in range(8)))
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": text(10), "answer": text(8)} for _ in range(5)]))
    return tmp_path, path, model, tok, [alpaca, qa]


def run(argv, capsys):
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random tiny model's FastICA need not converge
        rc = main(["ica"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def expected_templates(model, tok, files):
    """What BUILD does, through the library: sample and tokenize per file, pool, shuffle, cut, batch, build."""
    rng = random.Random(3)
    seqs = []
    for path in files:
        rows = read_records(path)
        seqs += tokenize_records(rng.sample(rows, 6) if len(rows) > 6 else rows, tok, max_length=24,
                                 progress=False)
    rng.shuffle(seqs)
    seqs = seqs[:10]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_templates(model, batches(seqs, 3, tok.pad_token_id), n_components=4, percentile=90.0,
                               max_pca_components=30, seed=3, progress=False), len(seqs)


def test_build_templates_writes_what_the_library_builds(setup, capsys):
    tmp, path, model, tok, files = setup
    out_file = tmp / "out" / "global_templates.json"
    rc, out, err = run(["build-templates", "--model-path", path, "--data", *files, "--output", out_file, *BUILD],
                       capsys)
    assert rc == 0, err
    assert err == ""
    assert "4 ICA templates" in out and str(out_file) in out
    got = load_templates(out_file)
    want, n_seqs = expected_templates(model, tok, files)
    assert got.components == want.components
    assert got.layers == list(range(LAYERS)) and got.hidden_size == HIDDEN
    assert got.meta["sequences"] == n_seqs == 10 and got.meta["mode"] == "stream"
    assert got.meta["data"] == [str(f) for f in files]
    data = json.loads(out_file.read_text())
    assert data["name"] == "global_templates_v1" and set(data["templates"]) == {"0", "1", "2", "3"}


def test_build_templates_layers_exact_mode_and_cache(setup, capsys):
    tmp, path, _, _, files = setup
    out_file = tmp / "t.json"
    rc, _, err = run(["build-templates", "--model-path", path, "--data", files[0], "--output", out_file,
                      "--layers", "2", "0", "--mode", "exact", "--components", "3", "--seq-len", "20"], capsys)
    assert rc == 0, err
    got = load_templates(out_file)
    assert got.layers == [0, 2] and got.meta["mode"] == "exact" and len(got.components) == 3
    rc, _, err = run(["build-templates", "--model-path", path, "--data", *files, "--output", tmp / "c.json",
                      *BUILD, "--cache-activations"], capsys)
    assert rc == 0, err
    assert load_templates(tmp / "c.json").meta["cache_activations"]


@pytest.mark.parametrize("extra, message", [
    (["--layers", "7"], "--layers 7: the model has 3 decoder layers"),
    (["--layers", "1", "1"], "--layers 1 is listed twice"),
    (["--components", "0"], "--components must be a positive integer"),
    (["--percentile", "120"], "--percentile must be in"),
    (["--power-iterations", "-1"], "--power-iterations and --oversample"),
    (["--components", "500"], "n_components = 500 exceeds the PCA dimension"),
])
def test_build_templates_mistakes(setup, capsys, extra, message):
    tmp, path, _, _, files = setup
    before = listing(tmp)
    rc, out, err = run(["build-templates", "--model-path", path, "--data", *files, "--output", tmp / "x.json",
                        *BUILD, *extra], capsys)
    assert rc == 2
    assert err.startswith("loki ica build-templates: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert listing(tmp) == before


def test_build_templates_file_mistakes(setup, capsys):
    tmp, path, _, _, files = setup
    before = listing(tmp)
    cases = [
        (["--data", tmp / "missing.jsonl"], "--data file not found"),
        (["--model-path", tmp / "nomodel"], "model not found"),
    ]
    bad = tmp / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    before = listing(tmp)
    cases.append((["--data", bad], str(bad)))
    existing = tmp / "exists.json"
    existing.write_text("{}")
    before = listing(tmp)
    for argv, message in cases:
        args = {"--model-path": path, "--data": files[0], "--output": tmp / "x.json"}
        for i in range(0, len(argv), 2):
            args[argv[i]] = argv[i + 1]
        flat = [str(v) for kv in args.items() for v in kv]
        rc, _, err = run(["build-templates", *flat], capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert listing(tmp) == before
    rc, _, err = run(["build-templates", "--model-path", path, "--data", files[0], "--output", existing], capsys)
    assert rc == 2 and "exists; pass --overwrite" in err
    assert existing.read_text() == "{}"


# ------------------------------------------------------------------------------------------------ positions
def hand_templates(tmp):
    t = Templates("hand", [0, 2], HIDDEN, {0: {0: [1, 5]}, 1: {0: [5, 7], 2: [3]}, 2: {}})
    save_templates(t, tmp / "t.json")
    return t


@pytest.mark.parametrize("mode", ["preserve", "lesion"])
def test_positions_writes_target_pos(setup, capsys, mode):
    tmp, path, *_ = setup
    t = hand_templates(tmp)
    rc, out, err = run(["positions", "--templates", tmp / "t.json", "--components", "0", "1", "--mode", mode,
                        "--output", tmp / "pos" / "10.json", "--silenced", tmp / "zero.json",
                        "--model-path", path], capsys)
    assert rc == 0, err
    rows = json.loads((tmp / "pos" / "10.json").read_text())
    zero = json.loads((tmp / "zero.json").read_text())
    want, want_zero = positions(t, [0, 1], mode), silenced(t, [0, 1], mode)
    assert rows == [want[0], [], want[2]]  # layer 1 is not captured: no rows
    assert zero == [want_zero[0], [], want_zero[2]]
    check_target_pos(rows, LAYERS, HIDDEN)
    assert mode in out and "rows train" in out


def test_positions_without_model_uses_the_captured_layers(setup, capsys):
    tmp = setup[0]
    hand_templates(tmp)
    rc, _, err = run(["positions", "--templates", tmp / "t.json", "--components", "1", "--mode", "preserve",
                      "--output", tmp / "p.json"], capsys)
    assert rc == 0, err
    assert json.loads((tmp / "p.json").read_text()) == [[5, 7], [], [3]]


def test_positions_mistakes(setup, capsys, tmp_path):
    tmp, path, *_ = setup
    hand_templates(tmp)
    wide = Templates("wide", [0, 1], HIDDEN + 2, {0: {0: [1]}})
    save_templates(wide, tmp / "wide.json")
    deep = Templates("deep", [0, 5], HIDDEN, {0: {5: [1]}})
    save_templates(deep, tmp / "deep.json")
    (tmp / "bad.json").write_text('{"layout": {}}')
    (tmp / "taken.json").write_text("[]")
    base = ["--mode", "preserve", "--output", tmp / "out.json"]
    cases = [
        (["--templates", tmp / "t.json", "--components", "9", *base], "unknown component id 9"),
        (["--templates", tmp / "t.json", "--components", "0", "0", *base], "lists a component twice"),
        (["--templates", tmp / "none.json", "--components", "0", *base], "--templates file not found"),
        (["--templates", tmp / "bad.json", "--components", "0", *base], "missing key 'templates'"),
        (["--templates", tmp / "wide.json", "--components", "0", *base, "--model-path", path],
         f"hidden size {HIDDEN + 2}"),
        (["--templates", tmp / "deep.json", "--components", "0", *base, "--model-path", path], "capture layer 5"),
        (["--templates", tmp / "t.json", "--components", "0", "--mode", "lesion", "--output", tmp / "taken.json"],
         "exists; pass --overwrite"),
        (["--templates", tmp / "t.json", "--components", "0", *base, "--silenced", tmp / "out.json"],
         "name the same file"),
    ]
    before = listing(tmp)
    for argv, message in cases:
        rc, out, err = run(["positions", *argv], capsys)
        assert rc == 2, argv
        assert err.startswith("loki ica positions: error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and out == ""
        assert listing(tmp) == before
    assert (tmp / "taken.json").read_text() == "[]"
