"""``loki analyse`` (src/loki/analyse.py): MMLU-format loading, the original prompt, the HDF5 run against the
KVA engine on each prompt alone, resume after an interruption, and a 2-process (gloo) run equal to one process.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from loki.analyse import (AnalyseArgs, Question, answer_token, load_questions, prompt_ids, run_analysis,
                          user_turn)
from loki_kernels import kva
from loki_kernels.formats import read_attributions, read_metadata
from tests.conftest import rel_err
from tests.tiny_models import HIDDEN, LAYERS, char_tokenizer, saved_char_model

SUBJECTS = ("high_school_physics", "anatomy")


def _records(n=6, seed=0):
    rng = np.random.default_rng(seed)
    words = ["mass", "force", "bone", "cell", "wave", "heart", "speed", "nerve"]
    out = []
    for i in range(n):
        out.append({
            "subject": SUBJECTS[i % 2],
            "question": " ".join(rng.choice(words, size=int(rng.integers(2, 6)))) + "?",
            "choices": [str(w) for w in rng.choice(words, size=4, replace=False)],
            "answer": int(rng.integers(0, 4)),
        })
    return out


def _write(records, path):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":  # choices as JSON text, answers as letters (both forms are accepted)
        pd.DataFrame([{**r, "choices": json.dumps(r["choices"]), "answer": "ABCD"[r["answer"]]} for r in records]
                     ).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path)
    else:  # a datasets dataset saved with save_to_disk (the [data] extra; CI installs it)
        Dataset = pytest.importorskip("datasets").Dataset

        Dataset.from_list(records).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", ["mmlu.jsonl", "mmlu.json", "mmlu.csv", "mmlu.parquet", "mmlu_dataset"])
def test_load_questions_every_format(tmp_path, name):
    records = _records()
    questions = load_questions(_write(records, tmp_path / name))
    assert questions == [Question(r["subject"], r["question"], tuple(r["choices"]), r["answer"]) for r in records]


def test_max_samples_per_subset_keeps_the_first(tmp_path):
    records = _records(7)
    questions = load_questions(_write(records, tmp_path / "d.jsonl"), max_samples_per_subset=2)
    assert [q.question for q in questions] == [r["question"] for r in records[:4]]


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "answer": 0}, "choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 3}, "answer 3"),
    ({"question": "q", "choices": ["a", "b"], "answer": "Z"}, "record 0"),
])
def test_bad_records_name_the_record(tmp_path, record, message):
    path = _write([record], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=message):
        load_questions(path)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_questions(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_questions(tmp_path / "d.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no questions"):
        load_questions(tmp_path / "empty.jsonl")


def test_original_prompt_text():
    q = Question("high_school_physics", "What is F?", ("ma", "mv", "m/a", "a/m"), 0)
    assert user_turn(q) == (
        "There is a single choice question about High School Physics. Answer the question by replying A, B, C or D.\n"
        "Question: What is F?\nChoices:\nA. ma\nB. mv\nC. m/a\nD. a/m\nAnswer: \n"
    )


def test_prompt_uses_the_chat_template_and_shots():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    q, shot = Question("anatomy", "Q1?", ("a", "b", "c", "d"), 1), Question("anatomy", "S?", ("w", "x", "y", "z"), 2)
    text = lambda s: s.replace("\n", "<unk>")  # noqa: E731  (the character vocabulary has no newline)
    assert tok.decode(prompt_ids(tok, q)) == text(f"<user>{user_turn(q)}<assistant>")
    expected = f"<user>{user_turn(shot)}<assistant>C<user>{user_turn(q)}<assistant>"
    assert tok.decode(prompt_ids(tok, q, [shot])) == text(expected)


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama with a character tokenizer saved locally, and a small MMLU-format file."""
    root = tmp_path_factory.mktemp("analyse")
    _, model, tok = saved_char_model(root)
    data = _write(_records(5, seed=1), root / "mmlu.jsonl")
    dev = _write(_records(10, seed=2), root / "dev.jsonl")
    return root, model, tok, data, dev


def _args(setup, output, **kw):
    root, _, _, data, dev = setup
    base = dict(model_path=root / "model", data=data, dev_data=dev, output=output, steps=3, batch_size=2)
    return AnalyseArgs(**{**base, **kw})


@pytest.mark.parametrize("shots", [0, 2])
def test_run_equals_engine_on_each_prompt(setup, tmp_path, shots):
    root, model, tok, data, dev = setup
    out = run_analysis(_args(setup, tmp_path / "kva.h5", shots=shots, method="gausslegendre"), model, tok)
    scores = read_attributions(out)
    assert scores.shape == (5, LAYERS, HIDDEN) and scores.dtype == np.float32
    dev_questions = load_questions(dev)
    for i, q in enumerate(load_questions(data)):
        shots_q = [d for d in dev_questions if d.subject == q.subject][:shots]
        ids = torch.tensor([prompt_ids(tok, q, shots_q)])
        alone = kva.attribute(model, ids, steps=3, method="gausslegendre")[0]
        assert rel_err(torch.from_numpy(scores[i]), alone) <= 1e-5
    meta = read_metadata(out)
    assert meta["ig_steps"] == 3 and meta["ig_method"] == "gausslegendre" and meta["num_samples"] == 5
    assert meta["num_samples_processed"] == 5 and "completed_at" in meta


def test_float16_storage(setup, tmp_path):
    root, model, tok, *_ = setup
    out = run_analysis(_args(setup, tmp_path / "kva16.h5", dtype="float16"), model, tok)
    assert read_attributions(out).dtype == np.float16


def test_resume_after_interruption(setup, tmp_path, monkeypatch):
    root, model, tok, *_ = setup
    full = read_attributions(run_analysis(_args(setup, tmp_path / "full.h5"), model, tok))

    calls = {"n": 0}
    real = kva.attribute

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(kva, "attribute", interrupted)
    part = tmp_path / "part.h5"
    with pytest.raises(KeyboardInterrupt):
        run_analysis(_args(setup, part), model, tok)
    assert read_attributions(part).shape[0] == 2  # the first batch of 2 is kept, the second never written
    assert "completed_at" not in read_metadata(part)
    monkeypatch.setattr(kva, "attribute", real)

    run_analysis(_args(setup, part), model, tok)
    resumed = read_attributions(part)
    assert resumed.shape == full.shape
    np.testing.assert_allclose(resumed, full, rtol=1e-5, atol=1e-7)
    run_analysis(_args(setup, part), model, tok)  # complete: nothing more is added
    assert read_attributions(part).shape == full.shape

    with pytest.raises(ValueError, match="ig_steps"):  # other settings would mix incomparable rows
        run_analysis(_args(setup, part, steps=5), model, tok)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(setup, output_dir, nproc):
    root, _, _, data, _ = setup
    args = ["analyse", "--model-path", str(root / "model"), "--data", str(data), "--output-dir", str(output_dir),
            "--steps", "3", "--batch-size", "2", "--torch-dtype", "float32"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "loki.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", "-m", "loki.cli", *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir / "kva_mmlu.h5"


def test_cli_two_processes_equal_one(setup, tmp_path):
    one = _cli(setup, tmp_path / "one", 1)
    two = _cli(setup, tmp_path / "two", 2)
    a, b = read_attributions(one), read_attributions(two)
    assert a.shape == b.shape == (5, LAYERS, HIDDEN)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)  # every rank's samples, in sample order
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["kva_mmlu.h5"]  # parts merged and removed
    assert read_metadata(two)["world_size"] == 2


def test_cli_reports_bad_data_in_one_line(setup, tmp_path):
    root, *_ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "loki.cli", "analyse", "--model-path", str(root / "model"),
                             "--data", str(bad), "--output-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "record 0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "kva_mmlu.h5").exists()


# ------------------------------------------------------------------------------------------ --target
def _top_tokens(model, prompts):
    """The model's own top next token after each prompt (what ``--target predicted`` attributes)."""
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]


def _letter_ids(tok):
    return {letter: tok.convert_tokens_to_ids(letter) for letter in "ABCD"}


def test_answer_token_is_the_bare_letter_after_the_prompt():
    """Without a chat template the prompt ends with "assistant: ", with one after its generation prompt: either way
    the token is the letter's own (the character tokenizer has one token per character)."""
    tok = char_tokenizer()
    q, shot = Question("anatomy", "Q1?", ("a", "b", "c", "d"), 2), Question("anatomy", "S?", ("w", "x", "y", "z"), 1)
    assert tok.decode(prompt_ids(tok, q)).endswith("assistant: ")
    assert answer_token(tok, q) == answer_token(tok, q, [shot]) == _letter_ids(tok)["C"]
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert answer_token(tok, q) == answer_token(tok, q, [shot]) == _letter_ids(tok)["C"]


def test_answer_target_equals_engine_on_the_correct_token(setup, tmp_path):
    """Every sample's row is the engine's attribution of its correct letter's token, and, where the model's top
    prediction is another token (made so for every sample here: the answers are not in the prompt), differs from
    the ``predicted`` row."""
    root, model, tok, _, _ = setup
    records = _records(5, seed=3)
    prompts = [prompt_ids(tok, Question(r["subject"], r["question"], tuple(r["choices"]), 0)) for r in records]
    top = _top_tokens(model, prompts)
    letters = _letter_ids(tok)
    for r, t in zip(records, top):  # an answer the model does not predict
        r["answer"] = next(i for i, letter in enumerate("ABCD") if letters[letter] != t and i != r["answer"])
    data = _write(records, tmp_path / "wrong.jsonl")

    answer = read_attributions(run_analysis(_args(setup, tmp_path / "answer.h5", data=data, target="answer"),
                                            model, tok))
    predicted = read_attributions(run_analysis(_args(setup, tmp_path / "predicted.h5", data=data), model, tok))
    assert answer.shape == predicted.shape == (5, LAYERS, HIDDEN)
    for i, (r, ids, t) in enumerate(zip(records, prompts, top)):
        correct = letters["ABCD"[r["answer"]]]
        assert correct != t  # the premise: the model's top prediction is not the correct answer
        ids = torch.tensor([ids])
        expected = kva.attribute(model, ids, steps=3, target=[correct])[0]
        assert rel_err(torch.from_numpy(answer[i]), expected) <= 1e-5
        assert rel_err(torch.from_numpy(answer[i]), kva.attribute(model, ids, steps=3, target=[t])[0]) > 1e-2
        assert rel_err(torch.from_numpy(predicted[i]), torch.from_numpy(answer[i])) > 1e-2
    assert read_metadata(tmp_path / "answer.h5")["target"] == "answer"
    assert read_metadata(tmp_path / "predicted.h5")["target"] == "predicted"


def test_answer_target_without_a_token_names_the_question(setup, tmp_path):
    """A tokenizer that cannot spell the letter: one line naming the question, before any file is made."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root, model, _, _, _ = setup
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        if chr(code) != "C":
            vocab[chr(code)] = len(vocab)
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    inner.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    records = _records(4, seed=4)
    for i, r in enumerate(records):
        r["answer"] = 2 if i == 2 else 3  # only question 2's answer is C
    data = _write(records, tmp_path / "d.jsonl")
    output = tmp_path / "out" / "kva.h5"
    with pytest.raises(ValueError) as e:
        run_analysis(_args(setup, output, data=data, target="answer"), model, tok)
    message = str(e.value)
    assert message.startswith(f"--target answer: question 2 ({SUBJECTS[0]}): no token of the tokenizer appends "
                              f"the answer 'C' to the prompt's text") and "\n" not in message
    assert not output.exists()
    run_analysis(_args(setup, output, data=data), model, tok)  # predicted needs no answer token
    assert read_attributions(output).shape[0] == 4


def _cli_argv(setup, output, *extra):
    root, _, _, data, _ = setup
    return ["analyse", "--model-path", str(root / "model"), "--data", str(data), "--output-dir", str(output.parent),
            "--result-file", output.name, "--steps", "3", "--batch-size", "2", "--torch-dtype", "float32", *extra]


def test_resume_refuses_another_target(setup, tmp_path, monkeypatch, capsys):
    from loki.cli import main

    root, model, tok, *_ = setup
    output = tmp_path / "out" / "kva.h5"
    real, calls = kva.attribute, {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(kva, "attribute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(_args(setup, output, target="answer"), model, tok)
    monkeypatch.setattr(kva, "attribute", real)
    assert read_attributions(output).shape[0] == 2 and read_metadata(output)["target"] == "answer"
    before = output.read_bytes()

    for argv in (_cli_argv(setup, output), _cli_argv(setup, output, "--target", "predicted")):  # default, explicit
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (f"loki analyse: error: cannot resume {output}: it was written with target='answer', this run "
                       f"has target='predicted'; use another --output-dir/--result-file or delete the file\n")
        assert output.read_bytes() == before  # the refused run changed nothing
        assert sorted(p.name for p in output.parent.iterdir()) == ["kva.h5"]  # and left no lock file
    with pytest.raises(ValueError, match="target='answer', this run has target='predicted'"):
        run_analysis(_args(setup, output), model, tok)

    assert main(_cli_argv(setup, output, "--target", "answer")) == 0  # the same mode resumes
    assert read_attributions(output).shape == (5, LAYERS, HIDDEN) and read_metadata(output)["target"] == "answer"


def test_file_without_target_was_written_as_predicted(setup, tmp_path):
    """Files written before ``--target`` existed have no ``target``: they resume as ``predicted`` only."""
    import h5py

    root, model, tok, *_ = setup
    output = tmp_path / "old.h5"
    run_analysis(_args(setup, output), model, tok)
    with h5py.File(output, "r+") as f:
        del f["dataset"].attrs["metadata_target"]
    assert "target" not in read_metadata(output)
    before = output.read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"cannot resume {output}: it was written with target='predicted', "
                                                   f"this run has target='answer'")):
        run_analysis(_args(setup, output, target="answer"), model, tok)
    assert output.read_bytes() == before
    run_analysis(_args(setup, output), model, tok)  # complete, and the same mode: accepted, nothing added
    assert read_attributions(output).shape == (5, LAYERS, HIDDEN)


def test_default_target_is_predicted(setup, tmp_path, capsys):
    from loki.cli import build_parser, main

    assert build_parser().parse_args(_cli_argv(setup, tmp_path / "x.h5")).target == "predicted"
    assert AnalyseArgs(model_path=tmp_path, data=tmp_path, output=tmp_path / "x.h5").target == "predicted"
    default, explicit = tmp_path / "default" / "kva.h5", tmp_path / "explicit" / "kva.h5"
    assert main(_cli_argv(setup, default)) == 0
    assert main(_cli_argv(setup, explicit, "--target", "predicted")) == 0
    assert np.array_equal(read_attributions(default), read_attributions(explicit))
    times = ("created_at", "completed_at")
    meta_default, meta_explicit = read_metadata(default), read_metadata(explicit)
    assert meta_default["target"] == "predicted"
    assert {k: v for k, v in meta_default.items() if k not in times} == \
        {k: v for k, v in meta_explicit.items() if k not in times}
