"""patch_model / unpatch_model on tiny random models: exact logits, only selected rows train, checkpoints."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loki_kernels import SplitLinear, count_parameters, find_down_projs, patch_model, unpatch_model
from loki_kernels.reference import LoKILinear, apply_reference_loki
from tests.conftest import DEVICE, TOL, rel_err
from tests.tiny_models import ARCHS, FFN, HIDDEN, LAYERS, batch, logits, random_rows, snapshot, tiny_model, train


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patched_logits_equal_unpatched(arch):
    model = tiny_model(arch)
    ids = batch()
    before = logits(model, ids)
    projs = find_down_projs(model)
    assert len(projs) == LAYERS
    rows = random_rows()
    patch_model(model, rows)
    assert all(isinstance(p.module, SplitLinear) for p in find_down_projs(model))
    assert torch.equal(logits(model, ids), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    suffixes = ("weight_active", "bias_active") if arch == "gpt2" else ("weight_active",)
    assert trainable == {f"{p.name}.{s}" for p in projs for s in suffixes}
    assert count_parameters(model).trainable == sum(len(r) for r in rows) * FFN + (
        sum(len(r) for r in rows) if arch == "gpt2" else 0  # GPT-2's c_proj has a bias
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_training_changes_only_selected_rows(arch):
    model = tiny_model(arch)
    rows = random_rows()
    before = snapshot(model)
    patch_model(model, rows)
    train(model, batch())
    after = snapshot(model)
    assert after.keys() == before.keys()
    projs = {p.name: p.layer for p in find_down_projs(model)}
    for key in before:
        module_name, _, tensor = key.rpartition(".")
        if module_name in projs:
            layer = projs[module_name]
            w_before, w_after = before[key], after[key]
            if tensor == "weight" and arch == "gpt2":  # Conv1D stores [in, out]
                w_before, w_after = w_before.t(), w_after.t()
            changed = (w_before != w_after).reshape(HIDDEN, -1).any(dim=1).nonzero().flatten().tolist()
            assert changed and set(changed) <= set(rows[layer]), f"{key}: rows {changed} changed"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_matches_original_loki_linear(arch):
    """20 steps side by side with the original LoKILinear model on the same data: same loss every step."""
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    rows = random_rows()
    patch_model(model, rows)
    apply_reference_loki(reference, rows)
    ids = batch()
    ours = train(model, ids, steps=20, lr=1e-3)
    theirs = train(reference, ids, steps=20, lr=1e-3)
    assert ours == pytest.approx(theirs, rel=1e-5)
    for proj, ref_proj in zip(find_down_projs(model), find_down_projs(reference)):
        assert isinstance(ref_proj.module, LoKILinear)
        proj.module.write_back_()
        assert rel_err(proj.module.weight, ref_proj.module.full_weight()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_loads_in_plain_transformers(arch, tmp_path):
    model = tiny_model(arch)
    keys = set(model.state_dict())
    patch_model(model, random_rows())
    train(model, batch(), steps=2)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert not any(isinstance(m, SplitLinear) for m in plain.modules())
    ids = batch()
    assert torch.equal(logits(plain, ids), logits(model, ids))


def test_loading_a_standard_state_dict_into_a_patched_model():
    model, other = tiny_model(), tiny_model()
    patch_model(model, random_rows())
    model.load_state_dict(other.state_dict())
    ids = batch()
    assert torch.equal(logits(model, ids), logits(other, ids))
    # the trainable rows came from the loaded weights too: training continues from them
    for proj, plain in zip(find_down_projs(model), find_down_projs(other)):
        assert torch.equal(proj.module.weight_active, plain.module.weight[proj.module.active_pos])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unpatch_is_bit_exact(arch):
    model = tiny_model(arch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patch_model(model, random_rows())
    train(model, batch(), steps=2)
    ids = batch()
    trained = logits(model, ids)
    merged = snapshot(model)
    unpatch_model(model)
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    assert all(type(p.module) is type(find_down_projs(tiny_model(arch))[0].module) for p in find_down_projs(model))
    assert torch.equal(logits(model, ids), trained)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_freeze_rest_false_keeps_other_parameters_trainable():
    model = tiny_model()
    patch_model(model, random_rows(), freeze_rest=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)}


def test_position_formats(tmp_path):
    rows = random_rows()
    path = tmp_path / "10.json"
    path.write_text(json.dumps(rows))
    for target in (rows, str(path), path, {0: rows[0], "2": rows[2]}, [torch.tensor(r) for r in rows]):
        model = tiny_model()
        patch_model(model, target)
        for proj in find_down_projs(model):
            if isinstance(target, dict) and proj.layer == 1:  # layers missing from the dict stay as they are
                assert type(proj.module) is nn.Linear
            else:
                assert proj.module.active_pos.tolist() == sorted(rows[proj.layer])


def test_empty_layer_is_left_alone():
    model = tiny_model()
    rows = random_rows()
    rows[1] = []
    patch_model(model, rows)
    assert [type(p.module) for p in find_down_projs(model)] == [SplitLinear, nn.Linear, SplitLinear]


def test_full_and_single_row_layers():
    model = tiny_model()
    ids = batch()
    before = logits(model, ids)
    patch_model(model, [list(range(HIDDEN)), [HIDDEN - 1], [0]])
    assert torch.equal(logits(model, ids), before)
    train(model, ids, steps=1)


BAD = [
    (lambda r: r[:-1], "has 2 layers, but the model has 3"),
    (lambda r: r + [[0]], "has 4 layers, but the model has 3"),
    (lambda r: [r[0], r[1] + [HIDDEN], r[2]], f"layer 1: row {HIDDEN} is out of range"),
    (lambda r: [r[0], r[1], [-1]], "layer 2: row -1 is out of range"),
    (lambda r: [[5, 5], r[1], r[2]], "layer 0: row 5 is listed twice"),
    (lambda r: [r[0], [1.0], r[2]], "layer 1: row 1.0 is not an integer"),
    (lambda r: [r[0], r[1], ["3"]], "layer 2: row '3' is not an integer"),
    (lambda r: [[True], r[1], r[2]], "layer 0: row True is not an integer"),
    (lambda r: [r[0], 7, r[2]], "layer 1: expected a list of row indices, got int"),
    (lambda r: {5: [1]}, "layer 5 is out of range"),
    (lambda r: {"first": [1]}, "key 'first' is not a layer index"),
    (lambda r: 42, "not int"),
    (lambda r: None, "not NoneType"),
    (lambda r: "/nonexistent/10.json", "does not exist"),
]


@pytest.mark.parametrize("make_bad, message", BAD, ids=[m for _, m in BAD])
def test_bad_target_pos_raises_and_changes_nothing(make_bad, message):
    model = tiny_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = snapshot(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        patch_model(model, make_bad(random_rows()))
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[[1, 2], [3")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        patch_model(tiny_model(), path)


def test_patching_twice_raises():
    model = tiny_model()
    patch_model(model, random_rows())
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, random_rows())


def test_model_without_down_projection():
    with pytest.raises(ValueError, match="has no .config"):
        patch_model(nn.Sequential(nn.Linear(4, 4)), [[0]])


def test_count_parameters_counts_each_weight_once():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    rows = random_rows()
    patch_model(model, rows)
    count = count_parameters(model)
    assert count.total == total
    assert count.trainable == sum(map(len, rows)) * FFN
    assert "trainable params" in str(count) and 0 < count.percent < 100


def test_triton_backend_patched_model():
    """The Triton kernels inside a whole model (interpreter on CPU): same logits, same first step.

    On a GPU this fp32 model runs the PyTorch path whatever the backend (``triton_runs``)."""
    model = tiny_model().to(DEVICE)
    twin = copy.deepcopy(model)
    rows = random_rows()
    patch_model(model, rows, backend="triton")
    patch_model(twin, rows, backend="torch")
    ids = batch(2, 8).to(DEVICE)
    assert rel_err(logits(model, ids), logits(twin, ids)) < TOL[torch.float32]
    assert train(model, ids, steps=2) == pytest.approx(train(twin, ids, steps=2), rel=1e-5)


def test_gradient_checkpointing():
    model = tiny_model()
    patch_model(model, random_rows())
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    losses = train(model, batch(), steps=3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile(backend):
    """torch.compile traces a patched model (Triton launchers are torch.library ops): same loss and grads."""
    model = tiny_model().to(DEVICE)
    twin = copy.deepcopy(model)
    rows = random_rows()
    patch_model(model, rows, backend=backend)
    patch_model(twin, rows, backend=backend)
    ids = batch(2, 8).to(DEVICE)
    loss = torch.compile(model)(input_ids=ids, labels=ids).loss
    ref = twin(input_ids=ids, labels=ids).loss
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for proj, twin_proj in zip(find_down_projs(model), find_down_projs(twin)):
        assert rel_err(proj.module.weight_active.grad, twin_proj.module.weight_active.grad) < TOL[torch.float32]
    torch._dynamo.reset()


def test_bf16_autocast_matches_unpatched():
    """Under CPU bf16 autocast the patched model matches the plain one (bf16 tolerance), in loss and in the
    selected rows' gradients; weight_active stays fp32 and gets an fp32 gradient."""
    plain = tiny_model()
    model = copy.deepcopy(plain)
    rows = random_rows()
    patch_model(model, rows)
    ids = batch(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        ref = plain(input_ids=ids, labels=ids).loss
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=TOL[torch.bfloat16])
    for proj, plain_proj in zip(find_down_projs(model), find_down_projs(plain)):
        grad = proj.module.weight_active.grad
        assert proj.module.weight_active.dtype == grad.dtype == torch.float32
        assert rel_err(grad, plain_proj.module.weight.grad[proj.module.active_pos]) < 2 * TOL[torch.bfloat16]
        assert proj.module.weight.grad is None
