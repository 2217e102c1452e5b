"""`loki eval` end to end on a tiny saved model (character tokenizer), and its one-line errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki.cli import main
from loki_kernels import metrics
from loki_kernels.data import pack_text, read_texts
from tests.tiny_models import saved_char_model, tiny_model

SEQ = ["--seq-len", "16", "--max-tokens", "160"]


@pytest.fixture
def setup(tmp_path):
    path, model, tok = saved_char_model(tmp_path, max_positions=64)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(chr(c) for c in torch.randint(33, 127, (400,)).tolist()) + "\n")
    windows = [(torch.randint(4, len(tok), (n,)).tolist(), torch.randint(4, len(tok), (m,)).tolist())
               for n, m in ((6, 5), (3, 5), (9, 4))]
    mem = tmp_path / "windows.jsonl"
    mem.write_text("".join(json.dumps({"prefix_ids": p, "suffix_ids": s}) + "\n" for p, s in windows))
    tokens = pack_text(read_texts(corpus), tok, 16, 160, progress=False)
    return tmp_path, path, model, tok, corpus, mem, tokens


def run(argv, capsys):
    capsys.readouterr()  # what the test itself printed (transformers' bars) is not the command's
    rc = main(["eval"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_baseline_then_edited_model(setup, capsys):
    tmp, path, model, tok, corpus, mem, tokens = setup
    base_file, out_file = tmp / "base.ndcg.safetensors", tmp / "results" / "base.json"
    rc, out, err = run(["--model-path", path, "--memorization", mem, "--ndcg", corpus, "--write-ndcg-baseline",
                        base_file, "--perplexity", corpus, "--batch-size", 3, "--output", out_file] + SEQ, capsys)
    assert rc == 0 and err == ""
    assert "memorisation strict_acc" in out and "perplexity, original formula" in out and "baseline" in out
    results = json.loads(out_file.read_text())
    windows = metrics.load_memorization_windows(mem)
    want = metrics.memorization(model, windows, batch_size=3, progress=False).as_dict()
    got = results["memorization"]
    assert got.pop("file") == str(mem) and got == pytest.approx(want)
    assert results["perplexity"]["perplexity"] == pytest.approx(
        metrics.perplexity(model, tokens, progress=False), rel=1e-6)
    assert results["perplexity"]["mean_batch_perplexity"] == pytest.approx(
        metrics.mean_batch_perplexity(model, tokens, batch_size=3, progress=False), rel=1e-6)
    assert (results["perplexity"]["rows"], results["perplexity"]["seq_len"]) == (10, 16)
    baseline = metrics.load_ndcg_baseline(base_file)
    assert torch.equal(baseline.top_ids, metrics.ndcg_baseline(model, tokens, progress=False).top_ids)
    assert "ndcg" not in results and results["ndcg_baseline_written"]["positions"] == 10 * 15

    edited = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in edited.model.layers:
            layer.mlp.up_proj.weight.add_(0.3 * torch.randn_like(layer.mlp.up_proj.weight))
    edited.save_pretrained(tmp / "edited")
    tok.save_pretrained(tmp / "edited")
    rc, out, err = run(["--model-path", tmp / "edited", "--ndcg", corpus, "--ndcg-baseline", base_file,
                        "--output", tmp / "edited.json"] + SEQ, capsys)
    assert rc == 0 and err == ""
    scored = json.loads((tmp / "edited.json").read_text())["ndcg"]
    want = metrics.ndcg(edited, tokens, baseline, progress=False)
    assert scored["ndcg@10"] == pytest.approx(want, rel=1e-6) and want < 1
    assert scored["same_weights_as_baseline"] is False and "memorization" not in scored

    rc, out, err = run(["--model-path", path, "--ndcg", corpus, "--ndcg-baseline", base_file,
                        "--output", tmp / "self.json"] + SEQ, capsys)
    scored = json.loads((tmp / "self.json").read_text())["ndcg"]
    assert rc == 0 and scored["ndcg@10"] == pytest.approx(1.0) and scored["same_weights_as_baseline"] is True
    assert "1 by construction" in out
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_text_windows_use_the_models_tokenizer(setup, capsys):
    tmp, path, model, tok, *_ = setup
    quotes = tmp / "quotes.jsonl"
    quotes.write_text(json.dumps({"prefix": "To be, or not", "target_suffix": " to be"}) + "\n")
    rc, out, err = run(["--model-path", path, "--memorization", quotes, "--output", tmp / "q.json"], capsys)
    assert rc == 0 and err == ""
    want = metrics.memorization(model, metrics.load_memorization_windows(quotes, tok), progress=False)
    got = json.loads((tmp / "q.json").read_text())["memorization"]
    assert got["generated"] == want.generated and got["suffix_lengths"] == [6]


def make_baseline(setup, capsys):
    tmp, path, _, _, corpus, _, _ = setup
    assert run(["--model-path", path, "--ndcg", corpus, "--write-ndcg-baseline", tmp / "b.st"] + SEQ, capsys)[0] == 0
    return tmp / "b.st"


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to evaluate: pass --memorization, --ndcg and/or --perplexity"),
    (["--ndcg", "{corpus}"], "--ndcg needs exactly one of --ndcg-baseline PATH"),
    (["--ndcg", "{corpus}", "--ndcg-baseline", "{corpus}", "--write-ndcg-baseline", "{tmp}/x"],
     "--ndcg needs exactly one of"),
    (["--ndcg-baseline", "{corpus}", "--perplexity", "{corpus}"], "--ndcg-baseline needs --ndcg"),
    (["--memorization", "{tmp}/nope.jsonl"], "--memorization file not found: {tmp}/nope.jsonl"),
    (["--perplexity", "{corpus}", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--perplexity", "{corpus}", "--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    (["--perplexity", "{corpus}", "--max-tokens", "8"], "--max-tokens (8) must be at least --seq-len (16)"),
    (["--memorization", "{mem}", "--loose", "1.5"], "--loose must be in [0, 1], got 1.5"),
    (["--ndcg", "{corpus}", "--ndcg-baseline", "{tmp}/nope.st"], "--ndcg-baseline file not found: {tmp}/nope.st"),
    (["--ndcg", "{corpus}", "--ndcg-baseline", "{corpus}"], "{corpus}: not an nDCG baseline file"),
    (["--ndcg", "{corpus}", "--write-ndcg-baseline", "{mem}"],
     "--write-ndcg-baseline {mem} exists; pass --overwrite"),
    (["--perplexity", "{tmp}/short.txt"],
     "--perplexity {tmp}/short.txt: the texts hold 5 tokens, fewer than one row"),
    (["--perplexity", "{tmp}/blank.txt"], "{tmp}/blank.txt: empty file"),
    (["--memorization", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl:2: prefix_ids and suffix_ids must be lists"),
    (["--output", "{tmp}", "--perplexity", "{corpus}"], "--output {tmp} is a directory"),
    (["--perplexity", "{corpus}", "--device", "nope"], "--device nope: "),
])
def test_user_errors_are_one_line(setup, capsys, argv, message):
    tmp, path, _, _, corpus, mem, _ = setup
    (tmp / "short.txt").write_text("abcde")
    (tmp / "blank.txt").write_text(" \n\n ")
    (tmp / "bad.jsonl").write_text('{"prefix_ids": [5], "suffix_ids": [6]}\n{"prefix_ids": "x"}\n')
    before = sorted(p.name for p in tmp.iterdir())
    fill = lambda s: s.format(tmp=tmp, corpus=corpus, mem=mem)  # noqa: E731
    rc, out, err = run(["--model-path", path] + SEQ + [fill(a) for a in argv], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("loki eval: error: ") and fill(message) in err
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_baseline_mismatch_is_refused(setup, capsys):
    tmp, path, _, _, corpus, _, _ = setup
    baseline = make_baseline(setup, capsys)
    for argv, message in ((["--seq-len", "8", "--max-tokens", "160"], "was made for seq_len = 16, not 8"),
                          (SEQ + ["--ndcg-k", "5"], "was made for k = 10, not 5"),
                          (["--seq-len", "16", "--max-tokens", "80"], "was made for rows = 10, not 5")):
        rc, _, err = run(["--model-path", path, "--ndcg", corpus, "--ndcg-baseline", baseline] + argv, capsys)
        assert rc == 2 and err.strip() == f"loki eval: error: nDCG baseline {baseline} {message}"
    other = tmp / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    rc, _, err = run(["--model-path", path, "--ndcg", other, "--ndcg-baseline", baseline] + SEQ, capsys)
    assert rc == 2 and f"nDCG baseline {baseline} was made for other tokens" in err
    rc, _, err = run(["--model-path", path, "--ndcg", corpus, "--write-ndcg-baseline", baseline, "--overwrite"]
                     + SEQ, capsys)
    assert rc == 0


def test_missing_model_and_tokenizer(tmp_path, capsys):
    quotes = tmp_path / "quotes.jsonl"
    quotes.write_text(json.dumps({"prefix": "ab", "target_suffix": "cd"}) + "\n")
    rc, _, err = run(["--model-path", tmp_path / "nope", "--memorization", quotes], capsys)
    assert rc == 2 and err.strip() == f"loki eval: error: model not found: {tmp_path / 'nope'}"
    tiny_model().save_pretrained(tmp_path / "bare")  # no tokenizer files
    rc, _, err = run(["--model-path", tmp_path / "bare", "--memorization", quotes], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"loki eval: error: {tmp_path / 'bare'}: no tokenizer to read --memorization {quotes} with" in err
