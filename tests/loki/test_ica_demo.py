"""``loki demo ica`` (src/loki/ica_demo.py) on a reduced budget: the world, the channel sets, the lesion experiment
(zeroes exactly its sets, restores the model bit for bit), the preserve fine-tune (silenced rows output 0 while
training, only the selected down_proj rows change, AdamW state covers them only), end to end and through the CLI."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch

from loki import ica_demo
from loki.cli import main
from loki.demo import Batch, tiny_llama
from loki.ica_demo import (
    IcaDemoArgs,
    complement,
    finetune,
    finetune_methods,
    ica_templates,
    lesion_experiment,
    lesion_sets,
    make_ica_world,
    network_rows,
    random_fraction,
    random_like,
    run_ica_demo,
    run_method,
)
from loki_kernels import find_down_projs, patch_model, unpatch_model
from loki_kernels.ica import ConvergenceWarning

VOCAB = 37
FAST = {"pretrain_steps": 40, "steps": 3, "draws": 2, "template_samples": 16, "batch_size": 8, "progress": False,
        "lrs": {"full": (1e-3,), "rows": (3e-3, 1e-2)}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the demo runs (two threads on a shared two-core machine ran many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_and_templates():
    """A randomly initialised tiny Llama (hidden 128, 4 layers) and ICA templates of it on random tokens."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    model = tiny_llama(VOCAB).eval()
    batches = []
    for _ in range(4):
        ids = torch.randint(4, VOCAB, (24, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[:3, :4] = 0  # some padding, dropped by the capture
        batches.append({"input_ids": ids, "attention_mask": mask})
    with warnings.catch_warnings():  # FastICA on a random model's activations of random tokens: may not converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        sets = ica_templates(model, batches, (99.9, 98.0), n_components=6, seed=1, progress=False)
    return model, sets[99.9], sets[98.0]


def _tasks(n_tasks=3, rows=20, length=9):
    """Random teacher-forced tasks of at most 64 rows (one forward each in ``accuracy``)."""
    tasks = {}
    for t in range(n_tasks):
        ids = torch.randint(4, VOCAB, (rows, length))
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]
        tasks[f"t{t}"] = Batch(ids, torch.ones_like(ids), labels)
    return tasks


def test_world_is_seeded_with_four_distinct_tasks():
    a, b = make_ica_world(5), make_ica_world(5)
    assert [t.pairs for t in a.old] == [t.pairs for t in b.old] and a.new.pairs == b.new.pairs
    assert [t.name for t in a.old] == ["facts", "addition", "reverse", "max"]
    prompts = [{p for p, _ in t.pairs} for t in a.old + [a.new]]
    assert all(not prompts[i] & prompts[j] for i in range(len(prompts)) for j in range(i))
    assert all(len(set(t.pairs)) == len(t.pairs) for t in a.old)
    for prompt, answer in a.old[2].pairs:
        assert answer.split() == prompt.split()[1:-1][::-1]
    for prompt, answer in a.old[3].pairs:
        assert int(answer) == max(int(x) for x in prompt.split()[1:3])
    assert make_ica_world(6).old[2].pairs != a.old[2].pairs


def test_channel_sets(model_and_templates):
    _, small, large = model_and_templates
    hidden = large.hidden_size
    u_small, u_large = network_rows(small), network_rows(large)
    # Same maps, higher threshold: the small networks lie inside the large ones, component by component.
    assert all(small.support(c) <= large.support(c) for c in small.components)
    assert all(len(small.support(c)) == 1 for c in small.components)  # p = 99.9 of 512 features: the peak only
    assert sum(map(len, u_small.values())) <= len(small.components)
    gen = torch.Generator().manual_seed(3)
    rand = random_like(u_large, hidden, gen)
    assert {k: len(v) for k, v in rand.items()} == {k: len(v) for k, v in u_large.items()} and rand != u_large
    frac = random_fraction(large.layers, hidden, 15.0, gen)
    assert sum(map(len, frac.values())) == round(0.15 * len(large.layers) * hidden)
    keep = complement(u_large, hidden)
    for layer, rows in u_large.items():
        assert (set(keep[layer]) | set(rows) == set(range(hidden)) and not set(keep[layer]) & set(rows)) if rows \
            else keep[layer] == []


def test_lesions_zero_exactly_their_sets_and_restore_the_model(model_and_templates):
    model, small, large = model_and_templates
    sets = lesion_sets(small, large, draws=2, random_percent=15.0, seed=0)
    assert [len(group) for _, group in sets] == [1, 1, 2, 1, 2, 2, 1, 2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = _tasks()
    zeros = []  # per forward of each layer: the set of output channels that are exactly 0

    def hook(layer):
        def record(_m, _i, out):
            zeros.append((layer, set(torch.nonzero((out == 0).all(dim=(0, 1))).flatten().tolist())))
        return record

    handles = [d.module.register_forward_hook(hook(d.layer)) for d in find_down_projs(model)]
    try:
        result = lesion_experiment(model, tasks, sets, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # bit for bit
    jobs = [rows for _, group in sets for rows in group]
    layers = len(find_down_projs(model))
    assert len(zeros) == len(jobs) * len(tasks) * layers
    for j, rows in enumerate(jobs):
        for layer, zero in zeros[j * len(tasks) * layers:(j + 1) * len(tasks) * layers]:
            assert zero == set(rows[layer])
    assert list(result) == [name for name, _ in sets]
    for (name, group), runs in zip(sets, result.values()):
        assert [r["channels"] for r in runs] == [sum(map(len, g.values())) for g in group]
        assert all(set(r["accuracy"]) == set(tasks) and all(0 <= a <= 100 for a in r["accuracy"].values())
                   for r in runs)


def test_preserve_training_silences_and_changes_only_the_selected_rows(model_and_templates):
    model, _, large = model_and_templates
    methods = finetune_methods(large, seed=0)
    assert [m[1] for m in methods] == ["full", "rows", "rows", "rows"] and methods[0][2] is None
    assert methods[3][2] == methods[1][2] and methods[3][3] is None  # the network rows, not silenced
    name, _, rows, mask = methods[1]
    assert "preserve" in name and rows == network_rows(large) and mask == complement(rows, large.hidden_size)
    candidate = patch_model(copy.deepcopy(model), rows, silence=mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def hook(layer):
        def check(module, _i, out):
            if module.training and mask[layer]:
                seen.append(bool((out[..., mask[layer]] == 0).all()) and bool(out[..., rows[layer]].ne(0).any()))
        return check

    handles = [d.module.register_forward_hook(hook(d.layer)) for d in find_down_projs(candidate)]
    tasks = _tasks(1, rows=16)
    stats = finetune(candidate, tasks["t0"], steps=4, lr=1e-2, batch_size=8, seed=0, progress=False)
    for h in handles:
        h.remove()
    assert seen and all(seen) and len(seen) == 4 * sum(1 for r in mask.values() if r)
    trainable = [p for p in candidate.parameters() if p.requires_grad]
    step_bytes = torch.tensor(0.0).element_size()
    assert stats["optimizer_bytes"] == sum(2 * p.numel() * p.element_size() + step_bytes for p in trainable)
    assert sum(p.numel() for p in trainable) == sum(map(len, rows.values())) * model.config.intermediate_size
    unpatch_model(candidate)
    names = {d.name + ".weight": d.layer for d in find_down_projs(candidate)}
    for key, value in candidate.state_dict().items():
        if key in names and rows[names[key]]:
            selected = torch.zeros(value.shape[0], dtype=torch.bool)
            selected[rows[names[key]]] = True
            assert torch.equal(value[~selected], before[key][~selected])
            assert bool((value[selected] != before[key][selected]).any(dim=1).all())  # every selected row trained
        else:
            assert torch.equal(value, before[key]), key
    result = run_method(model, name, rows, mask, tasks, {"t0": 50.0}, tasks["t0"], steps=2, lr=1e-2, batch_size=8,
                        seed=0, progress=False)
    assert result.changed_outside == 0 and result.trainable == sum(p.numel() for p in trainable)
    assert result.new_acc_silenced is not None and 0 <= result.new_acc <= 100
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the copy trained, not model


def _check_result(result, seeds):
    assert result["seeds"] == list(range(seeds)) and len(result["per_seed"]) == seeds
    for s in result["per_seed"]:
        assert all(0 <= a <= 100 for a in s["pretraining"]["accuracy"].values())
        union = s["templates"]["union"]
        assert 0 < union["99.9"] <= 10 < union["98"]  # 10 one-channel networks: < 2% of 512 channels
        for runs in s["lesions"].values():
            assert all(0 <= a <= 100 for r in runs for a in r["accuracy"].values())
        full, ica, rand, loud = s["finetune"][1:]
        assert s["finetune"][0]["method"] == "before fine-tuning"
        rows = union["98"] * result["model"]["intermediate_size"]
        assert ica["trainable"] == rand["trainable"] == loud["trainable"] == rows
        assert ica["optimizer_bytes"] == rand["optimizer_bytes"] == loud["optimizer_bytes"]
        assert full["trainable"] > rows and full["optimizer_bytes"] > ica["optimizer_bytes"] > 8 * rows
        assert ica["changed_outside"] == rand["changed_outside"] == loud["changed_outside"] == 0
        assert ica["new_acc_silenced"] is not None and loud["new_acc_silenced"] is None
        for r in s["finetune"]:
            assert 0 <= r["new_acc"] <= 100 and all(0 <= a <= 100 for a in r["old_acc"].values())


def test_demo_end_to_end(tmp_path):
    result = run_ica_demo(IcaDemoArgs(out_dir=tmp_path, seeds=2, **FAST))
    _check_result(result, 2)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    assert len(result["sweep"]) == 7 and {r["seed"] for r in result["sweep"]} == {0}  # the sweep: first seed only
    for i, (method, lr) in enumerate(result["chosen_lr"].items()):
        assert all(s["finetune"][i + 1]["method"] == method and s["finetune"][i + 1]["lr"] == lr
                   for s in result["per_seed"])
    text = (tmp_path / "results.txt").read_text()
    assert "Lesion" in text and "Fine-tuning" in text and "±" in text and "AdamW state" in text
    assert all(name in text for name in result["per_seed"][0]["lesions"])
    assert (tmp_path / "ica_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_the_ica_demo(tmp_path, monkeypatch, capsys):
    fast = {k: v for k, v in FAST.items() if k != "steps"}
    monkeypatch.setattr(ica_demo, "IcaDemoArgs", functools.partial(IcaDemoArgs, **fast))
    out = tmp_path / "demo"
    assert main(["demo", "ica", "--steps", "2", "--seeds", "1", "--out-dir", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["steps"] == 2 and saved["settings"]["seeds"] == 1
    _check_result(saved, 1)
    assert (out / "results.txt").read_text().strip() in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, word", [
    ({"seeds": 0}, "seeds"), ({"steps": 0}, "steps"), ({"percentile": 101.0}, "percentile"),
    ({"draws": 1.5}, "draws"), ({"small_percentile": 98.0}, "small_percentile"), ({"threads": 0}, "threads"),
    ({"lrs": {"full": (1e-3,)}}, "rows"),
])
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        run_ica_demo(IcaDemoArgs(out_dir=tmp_path / "out", **kwargs))
    assert not (tmp_path / "out").exists()
