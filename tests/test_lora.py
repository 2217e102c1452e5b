"""LoKI + LoRA (loki_kernels.lora): peft LoRA adapters on the selected down_proj rows only."""

import copy

import pytest
import torch

import loki_kernels
from loki_kernels import find_down_projs
from tests.conftest import DEVICE, rel_err
from tests.tiny_models import LAYERS, pattern_batch, random_rows, tiny_model

peft = pytest.importorskip("peft")
from loki_kernels.lora import SplitLoraLinear, lora_config  # noqa: E402

R, ALPHA = 4, 8


def _setup(arch="llama", backend="auto"):
    torch.manual_seed(0)
    base = tiny_model(arch).to(DEVICE)
    rows = random_rows()
    rows[1] = []  # an unpatched layer gets no adapter
    model = loki_kernels.patch_model(copy.deepcopy(base), rows, backend=backend)
    # init_lora_weights=False: B is random too, so the adapter changes the output from the first step
    lora = peft.get_peft_model(model, lora_config(model, r=R, lora_alpha=ALPHA, init_lora_weights=False))
    return base, rows, lora


def _down_projs(lora):
    return [layer.mlp.down_proj for layer in lora.base_model.model.model.layers]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adapter_output_equals_dense_reference(backend):
    base, rows, lora = _setup(backend=backend)
    ids = pattern_batch(2, 8).to(DEVICE)
    # Reference: the base model with W[rows] += scale * B A written into each patched layer's dense weight.
    ref_model = copy.deepcopy(base).double()
    with torch.no_grad():
        for layer, ref_proj in zip(_down_projs(lora), find_down_projs(ref_model)):
            i = ref_proj.layer
            if not rows[i]:
                assert not isinstance(layer, SplitLoraLinear)
                continue
            assert isinstance(layer, SplitLoraLinear)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            ref_proj.module.weight[layer.base_layer.active_pos] += (b.double() @ a.double()) * (ALPHA / R)
        out = lora(input_ids=ids).logits
        ref = ref_model(input_ids=ids).logits
    assert rel_err(out, ref) <= 1e-5


def test_train_merge_restore_changes_only_selected_rows():
    base, rows, lora = _setup()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert lora.get_nb_trainable_parameters()[0] == sum(R * (104 + len(r)) for r in rows if r)  # A [R, d_ff], B [k, R]
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = pattern_batch().to(DEVICE)
    losses = []
    for _ in range(5):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in lora.named_parameters():  # the base model and weight_active are untouched while training
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    with torch.no_grad():
        trained = lora(input_ids=ids).logits

    merged = lora.merge_and_unload()
    assert not any(isinstance(m, SplitLoraLinear) for m in merged.modules())
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).logits, trained) <= 1e-5
    plain = loki_kernels.unpatch_model(merged)
    changed = {}
    base_state = base.state_dict()
    for key, value in plain.state_dict().items():
        diff = (value != base_state[key])
        if diff.any():
            changed[key] = diff.any(dim=1).nonzero().flatten().tolist()
    expected = {f"model.layers.{i}.mlp.down_proj.weight": sorted(r) for i, r in enumerate(rows) if r}
    assert changed == expected
    with torch.no_grad():
        assert rel_err(plain(input_ids=ids).logits, trained) <= 1e-5


def test_merge_unmerge_and_disable():
    base, rows, lora = _setup()
    ids = pattern_batch(2, 8).to(DEVICE)
    actives = [m.base_layer.weight_active.detach().clone() for m in _down_projs(lora) if isinstance(m, SplitLoraLinear)]
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        with lora.disable_adapter():
            assert rel_err(lora(input_ids=ids).logits, base(input_ids=ids).logits) <= 1e-6
        lora.merge_adapter()
        assert rel_err(lora(input_ids=ids).logits, adapted) <= 1e-5
        lora.unmerge_adapter()
        assert rel_err(lora(input_ids=ids).logits, adapted) <= 1e-5
    after = [m.base_layer.weight_active for m in _down_projs(lora) if isinstance(m, SplitLoraLinear)]
    for a, b in zip(after, actives):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_configs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="patch_model first"):
        lora_config(model, r=R)
    loki_kernels.patch_model(model, random_rows())
    with pytest.raises(ValueError, match="target_modules"):
        lora_config(model, r=R, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="plain LoRA"):
        lora_config(model, r=R, use_dora=True)
    config = lora_config(model, r=R)
    assert len(config.target_modules) == LAYERS


def test_adapter_save_and_load(tmp_path):
    """The adapter alone round-trips through PeftModel.save_pretrained / from_pretrained given lora_config."""
    base, rows, lora = _setup()
    ids = pattern_batch(2, 8).to(DEVICE)
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    fresh = loki_kernels.patch_model(copy.deepcopy(base), rows)
    config = lora_config(fresh, r=R, lora_alpha=ALPHA)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter", config=config)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
