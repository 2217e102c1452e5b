"""create_loki_model -> load with trust_remote_code -> train -> restore, and the original split format."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import loki
from loki_kernels import SplitLinear, find_down_projs
from tests.tiny_models import batch, logits, save_split_checkpoint, train


def test_create_train_restore(base_dir):
    tmp, base, rows = base_dir
    loki.create_loki_model(model_name=tmp / "base", target_pos_path=tmp / "10.json", save_dir=tmp / "loki",
                           torch_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp / "loki", trust_remote_code=True)
    assert type(model).__name__.startswith("LoKI")
    ids = batch()
    assert torch.equal(logits(model, ids), logits(base, ids))  # the real pretrained weights
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.layers.{i}.mlp.down_proj.weight_active" for i in range(len(rows))]

    train(model, ids, steps=3)
    model.save_pretrained(tmp / "trained")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "trained", trust_remote_code=True)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))  # training can continue from the save

    loki.restore_loki_model(target_pos_path=tmp / "10.json", model_path=tmp / "trained", model_name=tmp / "base",
                            output_path=tmp / "restored", torch_dtype=torch.float32)
    restored = AutoModelForCausalLM.from_pretrained(tmp / "restored")
    assert not any(isinstance(m, SplitLinear) for m in restored.modules())
    assert "target_pos" not in json.loads((tmp / "restored" / "config.json").read_text())
    assert torch.equal(logits(restored, ids), logits(model, ids))
    _assert_only_rows_changed(base, restored, rows)


def _assert_only_rows_changed(base, other, rows):
    before, after = base.state_dict(), other.state_dict()
    down = {f"{p.name}.weight": p.layer for p in find_down_projs(base)}
    for key in before:
        if key in down:
            changed = (before[key] != after[key]).any(dim=1).nonzero().flatten().tolist()
            assert changed and set(changed) <= set(rows[down[key]]), key
        else:
            assert torch.equal(before[key], after[key]), key


def test_original_split_checkpoint_loads_and_restores(base_dir):
    tmp, base, rows = base_dir
    pristine = AutoModelForCausalLM.from_pretrained(tmp / "base")
    reference = save_split_checkpoint(tmp, base, rows)
    ids = batch()
    _, model_cls = loki.model_utils.get_loki_classes(base.config.model_type)
    model = model_cls.from_pretrained(tmp / "split")
    assert torch.allclose(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-6)

    loki.restore_loki_model(target_pos_path=tmp / "10.json", model_path=tmp / "split", model_name=tmp / "base",
                            output_path=tmp / "restored", torch_dtype=torch.float32)
    restored = AutoModelForCausalLM.from_pretrained(tmp / "restored")
    assert torch.allclose(logits(restored, ids), logits(reference, ids), rtol=1e-5, atol=1e-6)
    _assert_only_rows_changed(pristine, restored, rows)


def test_create_rejects_bad_positions_and_writes_nothing(base_dir):
    tmp, _, rows = base_dir
    (tmp / "bad.json").write_text(json.dumps(rows[:-1]))
    with pytest.raises(ValueError, match="bad.json: target_pos has 2 layers, but the model has 3"):
        loki.create_loki_model(model_name=tmp / "base", target_pos_path=tmp / "bad.json", save_dir=tmp / "out")
    assert not (tmp / "out").exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".out")] == []


def test_set_zero_weights(base_dir):
    tmp, base, rows = base_dir
    loki.set_zero_weights(tmp / "10.json", tmp / "zeroed", tmp / "base", torch_dtype=torch.float32)
    zeroed = AutoModelForCausalLM.from_pretrained(tmp / "zeroed")
    for proj, layer_rows in zip(find_down_projs(zeroed), rows):
        weight = proj.module.weight
        assert torch.count_nonzero(weight[layer_rows]) == 0
        keep = [r for r in range(weight.shape[0]) if r not in layer_rows]
        assert torch.count_nonzero(weight[keep]) == weight[keep].numel()
