"""``loki demo`` (src/loki/demo.py) on a reduced step budget: the pipeline runs end to end, every method trains what
it should, the files are written; the ``--model/--data`` path on a local model; the forgetting score."""

import json
import subprocess
import sys

import pytest
import torch

from loki.demo import DemoArgs, forgetting_score, load_jsonl_world, make_world, run_demo, tiny_llama
from tests.tiny_models import LAYERS, char_tokenizer, tiny_model


def test_forgetting_score_is_the_papers():
    assert forgetting_score({"a": 80.0, "b": 50.0}, {"a": 60.0, "b": 50.0}) == pytest.approx(12.5)
    assert forgetting_score({"a": 0.0, "b": 40.0}, {"a": 10.0, "b": 50.0}) == pytest.approx(-25.0)


def test_world_is_seeded_and_disjoint():
    a, b = make_world(3), make_world(3)
    assert a.new.pairs == b.new.pairs and [t.pairs for t in a.old] == [t.pairs for t in b.old]
    old_prompts = {p for t in a.old for p, _ in t.pairs}
    assert not old_prompts & {p for p, _ in a.new.pairs}
    assert make_world(4).new.pairs != a.new.pairs


def test_tiny_demo_end_to_end(tmp_path):
    summary = run_demo(DemoArgs(out_dir=tmp_path, pretrain_steps=250, implant_steps=4, batch_size=8, seeds=2))
    names = [runs[0].method for runs in summary]
    assert names[0] == "before implanting" and len(summary) == 6
    assert all(len(runs) == 2 and [r.seed for r in runs] == [0, 1] for runs in summary)  # every method, every seed
    loki, rand, high, full, lora = (runs[0] for runs in summary[1:])
    assert "LoKI" in loki.method and "random" in rand.method and "highest" in high.method
    assert "full" in full.method and "LoRA" in lora.method
    assert 0 < loki.trainable == rand.trainable == high.trainable < lora.trainable < full.trainable
    target_pos = json.loads((tmp_path / "10.json").read_text())
    d_ff = tiny_llama(10).config.intermediate_size
    assert len(target_pos) == 4 and all(len(rows) == 12 for rows in target_pos)  # floor(128 * 10 / 100) per layer
    assert loki.trainable == sum(len(rows) for rows in target_pos) * d_ff
    saved = json.loads((tmp_path / "results.json").read_text())
    # The sweep ran every learning rate of each method's family on the first seed; the chosen one is reused.
    assert len(saved["sweep"]) == 15 and {r["seed"] for r in saved["sweep"]} == {0}
    for runs in summary[1:]:
        name = runs[0].method
        swept = [r for r in saved["sweep"] if r["method"] == name]
        assert len(swept) == 3 and saved["chosen_lr"][name] in [r["lr"] for r in swept]
        assert all(r.lr == saved["chosen_lr"][name] for r in runs)
        assert all(0 <= r.new_acc <= 100 and r.ms_per_step >= 0 for r in runs)
    table = (tmp_path / "results.txt").read_text()
    assert "forgetting %" in table and "±" in table and all(n in table for n in names)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choose_lr_takes_the_lowest_rate_that_reaches_the_threshold():
    from loki.demo import Result, choose_lr

    def point(lr, acc):
        return Result("m", acc, {}, 0.0, 1, 0.0, lr)

    assert choose_lr([point(1e-3, 50.0), point(3e-3, 95.0), point(1e-2, 99.0)], 90.0).lr == 3e-3
    assert choose_lr([point(1e-3, 50.0), point(3e-3, 70.0), point(1e-2, 60.0)], 90.0).lr == 3e-3  # none: best
    assert choose_lr([point(1e-3, 70.0), point(3e-3, 70.0)], 90.0).lr == 1e-3  # tie: the lower rate


def _local_model(tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = [{"prompt": f"{w} is", "answer": a, "split": "old"} for w, a in [("sky", "blue"), ("grass", "green")]]
    records += [{"prompt": f"{w} sounds", "answer": a, "split": "new"} for w, a in [("cat", "meow"), ("dog", "woof")]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "model", data


def test_demo_on_a_local_model_and_data(tmp_path):
    model, data = _local_model(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "loki.cli", "demo", "--model", str(model), "--data", str(data),
                             "--steps", "2", "--quota", "25", "--out-dir", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    target_pos = json.loads((out / "25.json").read_text())
    assert len(target_pos) == LAYERS and all(len(rows) == 10 for rows in target_pos)  # floor(40 * 25 / 100)
    assert len(json.loads((out / "results.json").read_text())) == 5


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "answer": "b", "split": "later"}', "split must be"),
    ('{"prompt": "a"}', "expected a JSON object"),
    ("not json", "expected a JSON object"),
])
def test_bad_demo_data(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl_world(path)


def test_demo_cli_errors_in_one_line(tmp_path):
    model, data = _local_model(tmp_path)
    for args, message in [(["--data", str(data)], "--data needs --model"), (["--quota", "0"], "--quota"),
                          (["--lr", "0"], "--lr must be positive"), (["--lr", "1e-3", "3e-3"], "one learning rate"),
                          (["--batch-size", "0"], "--batch-size")]:
        result = subprocess.run([sys.executable, "-m", "loki.cli", "demo", *args, "--out-dir", str(tmp_path / "o")],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
