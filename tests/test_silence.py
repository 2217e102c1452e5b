"""Silenced rows on the split core, the inference-time lesion, and FNSFT's anti-drift as split training.

The oracle is FNSFT's own mechanism (``loki_kernels.reference.fnsft_anti_drift``): ``out * m`` forward hooks
on each MLP and the ``W_eff = frozen + row_mask ⊙ delta`` parametrisation of ``down_proj``. FNSFT's full
fine-tuning leaves every other parameter trainable; the equivalence tests train ONLY ``down_proj`` on both
sides (``patch_model``'s ``freeze_rest`` here, every parameter but ``delta`` frozen in the oracle).
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki_kernels import SplitLinear, find_down_projs, lesion, patch_model, set_silence, unpatch_model
from loki_kernels.arch import row_view
from loki_kernels.reference.fnsft_anti_drift import (
    apply_component_masks, apply_row_parametrizations, remove_row_parametrizations, rows_changed,
    whole_weight_changed,
)
from tests.conftest import DEVICE, TOL, rel_err
from tests.tiny_models import FFN, HIDDEN, LAYERS, batch, logits, random_rows, snapshot, tiny_model, train


def _complement(rows):
    return [sorted(set(range(HIDDEN)) - set(r)) for r in rows]


def _union(empty_layer=None):
    """A per-layer union of ICA channels (random, 8 of 40), one layer optionally empty."""
    union = [sorted(torch.randperm(HIDDEN)[:8].tolist()) for _ in range(LAYERS)]
    if empty_layer is not None:
        union[empty_layer] = []
    return union


def _modes(mode, layers=LAYERS):
    """One FNSFT mode per layer: ``mode`` everywhere, or a list (FNSFT has one global mode; a mixed model
    covers both in one Triton run, each layer behaving as in its own mode)."""
    return [mode] * layers if isinstance(mode, str) else list(mode)


def _trained(union, mode):
    """The rows FNSFT's anti-drift leaves trainable: preserve the union, lesion its complement."""
    return [u if m == "preserve" else _complement([u])[0] for u, m in zip(union, _modes(mode))]


def _fnsft_inputs(union, mode):
    """(target_pos, silence) for FNSFT's mode: the rows FNSFT trains, and the rows it masks (= freezes)."""
    silence = [(_complement([u])[0] if u else []) if m == "preserve" else u  # preserve, empty union: alone
               for u, m in zip(union, _modes(mode))]
    return _trained(union, mode), silence


def _hooks(model, union, mode):
    """FNSFT's forward masks, per layer in that layer's mode."""
    modes = _modes(mode)
    return [h for m in ("preserve", "lesion")
            for h in apply_component_masks(model, {i: u for i, (u, mi) in enumerate(zip(union, modes)) if mi == m}, m)]


def _masked_logits(model, union, mode, ids):
    """Logits with FNSFT's forward hooks (the oracle for silencing)."""
    handles = _hooks(model, union, mode)
    try:
        return logits(model, ids)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------- patch_model
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["preserve", "lesion"])
def test_silenced_logits_equal_fnsft_forward_masks(arch, mode):
    model = tiny_model(arch)
    union = _union(empty_layer=1)
    ids = batch()
    expected = _masked_logits(model, union, mode, ids)
    target_pos, silence = _fnsft_inputs(union, mode)
    patch_model(model, target_pos, silence=silence)
    got = logits(model, ids)
    if arch == "gpt2":  # Conv1D runs addmm on [in, out], the split runs F.linear: not the same bits
        assert rel_err(got, expected) < TOL[torch.float32]
    else:
        assert torch.equal(got, expected)
    assert not torch.equal(got, logits(unpatch_model(model), ids))  # the mask did something


def test_silence_only_layers_and_set_silence():
    """A layer with rows to silence but none to train is split (no trainable row); masks can be changed
    and cleared later, and clearing gives the unmasked model back."""
    model = tiny_model()
    ids = batch()
    plain = logits(model, ids)
    rows = random_rows()
    silence = {1: [0, 5, 39]}
    patch_model(model, [rows[0], [], rows[2]], silence=silence)
    projs = find_down_projs(model)
    assert [type(p.module) for p in projs] == [SplitLinear] * 3
    assert projs[1].module.active_pos.numel() == 0 and projs[1].module.silenced_rows == (0, 5, 39)
    assert projs[0].module.silenced is None  # absent layer: no mask
    assert "silenced_rows=3" in repr(projs[1].module)
    masked = logits(model, ids)
    assert torch.equal(masked, _masked_logits(_plain_copy(model), [[], silence[1], []], "lesion", ids))

    set_silence(model, {0: [1, 2]})
    assert projs[0].module.silenced_rows == (1, 2) and projs[1].module.silenced is None
    set_silence(model, None)
    assert all(p.module.silenced is None for p in projs)
    assert torch.equal(logits(model, ids), plain)
    projs[2].module.silence(rows[2])  # silencing every trained row: the layer's update is then invisible
    assert projs[2].module.silenced.sum() == len(rows[2])
    with pytest.raises(ValueError, match=f"silence: row {HIDDEN} is out of range"):
        projs[2].module.silence([HIDDEN])
    assert projs[2].module.silenced_rows == tuple(sorted(rows[2]))  # unchanged


def _plain_copy(patched):
    """A plain copy of a patched model (same weights, no mask), for oracles."""
    return unpatch_model(copy.deepcopy(patched))


def test_set_silence_refuses_unpatched_layers_and_changes_nothing():
    model = tiny_model()
    rows = random_rows()
    patch_model(model, [rows[0], [], rows[2]], silence={0: [3]})
    with pytest.raises(ValueError, match="silence layer 1: model.layers.1.mlp.down_proj is not patched"):
        set_silence(model, {0: [4], 1: [2]})
    assert find_down_projs(model)[0].module.silenced_rows == (3,)
    with pytest.raises(ValueError, match="silence layer 2: row -1 is out of range"):
        set_silence(model, [[4], [], [-1]])
    assert find_down_projs(model)[0].module.silenced_rows == (3,)


BAD = [
    (lambda r: r[:-1], "silence has 2 layers, but the model has 3"),
    (lambda r: [r[0], r[1] + [HIDDEN], r[2]], f"silence layer 1: row {HIDDEN} is out of range"),
    (lambda r: [[5, 5], r[1], r[2]], "silence layer 0: row 5 is listed twice"),
    (lambda r: [r[0], [1.5], r[2]], "silence layer 1: row 1.5 is not an integer"),
    (lambda r: {7: [1]}, "silence layer 7 is out of range"),
    (lambda r: {"x": [1]}, "silence key 'x' is not a layer index"),
    (lambda r: 3, "silence must be a list of row lists"),
    (lambda r: "/nonexistent/silence.json", "silence file '/nonexistent/silence.json' does not exist"),
]


@pytest.mark.parametrize("make_bad, message", BAD, ids=[m for _, m in BAD])
def test_bad_silence_raises_and_changes_nothing(make_bad, message):
    model = tiny_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = snapshot(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        patch_model(model, random_rows(), silence=make_bad(random_rows()))
    assert "\n" not in str(info.value)
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_save_pretrained_is_unmasked(tmp_path, arch="llama"):
    """The mask is a non-persistent buffer: the state dict holds the plain (trained) weights, and a reload
    is a plain model without any mask, whose logits are the unmasked ones."""
    model = tiny_model(arch)
    keys = set(model.state_dict())
    union = _union()
    target_pos, silence = _fnsft_inputs(union, "preserve")
    patch_model(model, target_pos, silence=silence)
    train(model, batch(), steps=2)
    state = model.state_dict()
    assert set(state) == keys  # no mask, no split keys
    twin = copy.deepcopy(model)
    set_silence(twin, None)
    ids = batch()
    unmasked = logits(twin, ids)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in state.items())  # the weights, unmasked

    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert not any(isinstance(m, SplitLinear) for m in plain.modules())
    assert not any("silenced" in name for name, _ in plain.named_buffers())
    assert torch.equal(logits(plain, ids), unmasked)
    assert not torch.equal(logits(model, ids), unmasked)

    unpatch_model(model)  # drops the mask as well
    assert torch.equal(logits(model, ids), unmasked)


def test_silenced_rows_get_no_gradient(backend="torch"):
    """Silenced active rows train nothing, the other active rows do (the Triton kernels: tests/ops)."""
    model = tiny_model().to(DEVICE)
    rows = random_rows()
    silence = [r[:2] + [c for c in range(HIDDEN) if c not in r][:3] for r in rows]  # two active, three frozen
    patch_model(model, rows, silence=silence, backend=backend)
    ids = batch(2, 8).to(DEVICE)
    model(input_ids=ids, labels=ids).loss.backward()
    for proj, layer_silence in zip(find_down_projs(model), silence):
        split = proj.module
        grad = split.weight_active.grad
        silenced_active = split.silenced.index_select(0, split.active_pos)
        assert silenced_active.sum() == 2
        assert torch.count_nonzero(grad[silenced_active]) == 0
        assert torch.count_nonzero(grad[~silenced_active], dim=1).all()  # the others do get gradients


def test_meta_device_rebuilds_the_mask():
    rows, silence = random_rows(), {2: [0, 1, 2]}
    with torch.device("meta"):
        meta = tiny_model()
    patch_model(meta, rows, silence=silence)
    meta.to_empty(device="cpu")
    split = find_down_projs(meta)[2].module
    assert split.silenced.device.type == "cpu" and split.silenced.nonzero().flatten().tolist() == [0, 1, 2]


# -------------------------------------------------------------------------------------------------- lesion
def _all_tensors(model):
    """Every parameter and buffer, by name (the split copies included): what a lesion must restore."""
    tensors = {n: t.detach().clone() for n, t in model.named_parameters()}
    tensors.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return tensors


def _assert_bit_exact(model, before):
    after = _all_tensors(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} not restored"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lesion_on_a_plain_model(arch):
    """Inside: zeroed rows and biases, logits as FNSFT's lesion mask gives them; outside: bit-exact."""
    model = tiny_model(arch)
    union = _union(empty_layer=0)
    ids = batch()
    before, plain = _all_tensors(model), logits(model, ids)
    expected = _masked_logits(model, union, "lesion", ids)
    with lesion(model, union) as same:
        assert same is model
        for proj, rows in zip(find_down_projs(model), union):
            assert torch.count_nonzero(row_view(proj.module)[rows]) == 0
            if proj.module.bias is not None:
                assert torch.count_nonzero(proj.module.bias[rows]) == 0
            if rows:
                assert row_view(proj.module).ne(0).any(dim=1).sum() == HIDDEN - len(rows)  # only those
        inside = logits(model, ids)
    if arch == "gpt2":
        assert rel_err(inside, expected) < TOL[torch.float32]
    else:
        assert torch.equal(inside, expected)
    _assert_bit_exact(model, before)
    assert torch.equal(logits(model, ids), plain)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lesion_on_a_patched_model(backend):
    """A patched model: the active rows are zeroed in weight_active (the copy the forward reads), the frozen
    ones in weight; the same logits as the plain model under the same lesion; bit-exact restore of every
    tensor, the stale copies in weight included (the PyTorch path writes weight_active back on every call)."""
    model = tiny_model().to(DEVICE)
    rows = random_rows(0.5)
    union = [sorted(r[:3] + [c for c in range(HIDDEN) if c not in r][:4]) for r in rows]  # active and frozen
    patch_model(model, rows, backend=backend)
    with torch.no_grad():  # "trained" rows: weight_active differs from the copies in weight
        for proj in find_down_projs(model):
            proj.module.weight_active.add_(0.01 * torch.randn_like(proj.module.weight_active))
    ids = batch(2, 8).to(DEVICE)
    reference = _plain_copy(model)
    with lesion(reference, union):
        expected = logits(reference, ids)
    trained = logits(model, ids)  # (the PyTorch path's forward makes the copies in weight current)
    before = _all_tensors(model)
    with lesion(model, union):
        for proj, layer_union in zip(find_down_projs(model), union):
            split = proj.module
            index = torch.tensor(layer_union, device=split.index_map.device)
            slots = split.index_map[index]
            active = slots < split.active_pos.numel()
            assert active.sum() == 3 and (~active).sum() == 4
            assert torch.count_nonzero(split.weight_active[slots[active]]) == 0
            assert torch.count_nonzero(split.full_weight()[index[~active]]) == 0
            assert split.weight_active.ne(0).any(dim=1).sum() == split.active_pos.numel() - 3
        assert rel_err(logits(model, ids), expected) < TOL[torch.float32]
    _assert_bit_exact(model, before)
    assert torch.equal(logits(model, ids), trained)


def test_lesion_restores_on_exception():
    model = tiny_model("gpt2")
    before = _all_tensors(model)
    with pytest.raises(RuntimeError, match="inside"):
        with lesion(model, _union()):
            raise RuntimeError("inside")
    _assert_bit_exact(model, before)


@pytest.mark.parametrize("bad, message", [
    ([[0], [HIDDEN], []], f"lesion layer 1: row {HIDDEN} is out of range"),
    ([[0]], "lesion has 1 layers, but the model has 3"),
    (None, "lesion must be a list of row lists"),
    ({0: [2, 2]}, "lesion layer 0: row 2 is listed twice"),
])
def test_bad_lesion_changes_nothing(bad, message):
    model = tiny_model()
    before = _all_tensors(model)
    with pytest.raises(ValueError, match=message):
        with lesion(model, bad):
            pytest.fail("entered the block")
    _assert_bit_exact(model, before)


def test_lesion_refuses_peft_layers():
    peft = pytest.importorskip("peft")
    from loki_kernels.lora import lora_config

    model = patch_model(tiny_model(), random_rows())
    lora = peft.get_peft_model(model, lora_config(model, r=2, lora_alpha=4))
    before = _all_tensors(lora)
    with pytest.raises(ValueError, match="wrapped by peft .*merge_and_unload first"):
        with lesion(lora, {0: [1]}):
            pass
    _assert_bit_exact(lora, before)


# --------------------------------------------------------------------------- anti-drift = split training
def _oracle(model, union, mode):
    """FNSFT's full-FT anti-drift + forward masks, with every parameter but the deltas frozen."""
    modules = apply_row_parametrizations(model, _trained(union, mode))
    _hooks(model, union, mode)
    for p in model.parameters():
        p.requires_grad_(False)
    deltas = [getattr(m.parametrizations, name).original
              for m in modules for name in ("weight", "bias") if hasattr(m.parametrizations, name)]
    for delta in deltas:
        delta.requires_grad_(True)
    return deltas


def _fnsft_plain(model, union, mode):
    """The control: FNSFT's forward masks on a plainly trained down_proj (no anti-drift)."""
    _hooks(model, union, mode)
    for p in model.parameters():
        p.requires_grad_(False)
    for proj in find_down_projs(model):
        proj.module.weight.requires_grad_(True)


def _down_weights(model):
    """Every layer's effective down_proj weight as [out, in] (and bias), as the forward sees them."""
    out = []
    for proj in find_down_projs(model):
        module = proj.module
        if isinstance(module, SplitLinear):
            module.write_back_()
            weight = module.full_weight()
        else:  # plain, or parametrised: .weight is then frozen + row_mask * delta
            weight = row_view(module)
        out.append(weight.detach().clone())
        if module.bias is not None:
            out.append(module.bias.detach().clone())
    return out


def _train(model, ids, *, steps=5, lr=1e-3, weight_decay=0.0):
    """AdamW with eps 1e-6: Adam's first step is lr · g / (|g| + eps), so with the default 1e-8 an element
    whose gradient is ~1e-8 (one in ~10^5 here) turns the ~1e-7 relative difference between two fp32 GEMM
    summation orders into a ~1e-4 difference of its update; eps 1e-6 bounds that amplification at 1e6."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-6)
    losses, weights = [], []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        weights.append(_down_weights(model))
    return losses, weights, opt


MIXED = ("preserve", "preserve", "lesion")  # one Triton run (the interpreter is slow) covers both modes
EQUIVALENCE = [("llama", "torch", "preserve"), ("llama", "torch", "lesion"), ("gpt2", "torch", MIXED),
               ("llama", "triton", MIXED)]


@pytest.mark.parametrize("arch, backend, mode", EQUIVALENCE,
                         ids=[f"{a}-{b}-{m if isinstance(m, str) else 'mixed'}" for a, b, m in EQUIVALENCE])
def test_anti_drift_equals_split_training(arch, backend, mode):
    """patch_model(union, silence=complement) (preserve) or (complement, silence=union) (lesion) trains like
    FNSFT's W0 + row_mask ⊙ delta with its out * m masks: AdamW, weight decay 0, 5 steps, same loss and
    same weights at every step (fp32 error), frozen rows bit-identical to the base on both sides. Layer 1's
    union is empty: preserve leaves it alone (FNSFT: no hook, fully frozen), lesion trains all its rows."""
    base = tiny_model(arch).to(DEVICE)
    union = _union(empty_layer=1)
    target_pos, silence = _fnsft_inputs(union, mode)
    ours = patch_model(copy.deepcopy(base), target_pos, silence=silence, backend=backend)
    oracle = copy.deepcopy(base)
    _oracle(oracle, union, mode)
    ids = batch(2, 8).to(DEVICE)

    our_losses, our_weights, _ = _train(ours, ids)
    their_losses, their_weights, _ = _train(oracle, ids)

    assert our_losses == pytest.approx(their_losses, rel=TOL[torch.float32])
    assert our_losses[-1] < our_losses[0]
    for step, (mine, theirs) in enumerate(zip(our_weights, their_weights)):
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert rel_err(a, b) < TOL[torch.float32], f"step {step}, tensor {i}"
    start = _down_weights(base)
    per_layer = 2 if arch == "gpt2" else 1  # weight (and bias) per layer
    for i, (before, mine, theirs) in enumerate(zip(start, our_weights[-1], their_weights[-1])):
        trained = target_pos[i // per_layer]
        frozen = _complement([trained])[0]
        assert not rows_changed(before, mine, frozen) and not rows_changed(before, theirs, frozen)
        assert rows_changed(before, mine, trained) == bool(trained)
    if _modes(mode)[1] == "preserve":
        assert not isinstance(find_down_projs(ours)[1].module, SplitLinear)  # the empty-union layer: left alone
    # baking FNSFT's parametrisation and unpatching ours give the same plain checkpoints
    remove_row_parametrizations(oracle, bake=True)
    unpatch_model(ours)
    assert set(oracle.state_dict()) == set(base.state_dict()) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert rel_err(value, oracle.state_dict()[key]) < TOL[torch.float32], key


def test_frozen_rows_bit_identical_with_weight_decay(mode=("preserve", "lesion", "preserve")):
    """Weight decay > 0: the frozen rows stay bit-identical (ours and FNSFT's anti-drift); FNSFT's masks without
    anti-drift let decay move them. FNSFT's NoDriftCheck (the whole weight) fires in all three cases, so it
    proves nothing; comparing the frozen rows tells them apart. Both modes, one layer each in its own."""
    base = tiny_model()
    union = _union()
    target_pos, silence = _fnsft_inputs(union, mode)
    ours = patch_model(copy.deepcopy(base), target_pos, silence=silence)
    oracle, control = copy.deepcopy(base), copy.deepcopy(base)
    _oracle(oracle, union, mode)
    _fnsft_plain(control, union, mode)
    ids = batch(2, 8)
    before = _down_weights(base)
    after = {name: _train(model, ids, steps=5, lr=1e-2, weight_decay=0.1)[1][-1]
             for name, model in (("ours", ours), ("oracle", oracle), ("control", control))}
    for layer, trained in enumerate(target_pos):
        frozen = _complement([trained])[0]
        start = before[layer]
        assert all(whole_weight_changed(start, after[name][layer]) for name in after)  # the FNSFT check: always
        assert not rows_changed(start, after["ours"][layer], frozen)
        assert not rows_changed(start, after["oracle"][layer], frozen)
        assert rows_changed(start, after["control"][layer], frozen)  # decay drifted the masked rows
        # decay pulls our rows towards 0 and FNSFT's delta towards W0: the trained rows differ (documented)
        rows = torch.tensor(trained)
        assert rel_err(after["ours"][layer][rows], after["oracle"][layer][rows]) > 1e-3


def _adam_state_elements(opt):
    return sum(v.numel() for state in opt.state.values() for k, v in state.items() if k != "step")


def test_optimizer_state_covers_the_trained_rows_only():
    """Adam state: 2 · (trained rows) · d_ff here; FNSFT's anti-drift keeps full-size delta, state and frozen copy."""
    base = tiny_model()
    union = _union()
    target_pos, silence = _fnsft_inputs(union, "preserve")
    ours = patch_model(copy.deepcopy(base), target_pos, silence=silence)
    oracle = copy.deepcopy(base)
    deltas = _oracle(oracle, union, "preserve")
    ids = batch(2, 8)
    _, _, our_opt = _train(ours, ids, steps=1)
    _, _, their_opt = _train(oracle, ids, steps=1)

    rows = sum(map(len, target_pos))
    assert _adam_state_elements(our_opt) == 2 * rows * FFN
    assert _adam_state_elements(their_opt) == 2 * LAYERS * HIDDEN * FFN
    assert sum(d.numel() for d in deltas) == LAYERS * HIDDEN * FFN  # the trained delta: every row
    frozen_copies = sum(b.numel() for n, b in oracle.named_buffers() if n.endswith("frozen"))
    assert frozen_copies == LAYERS * HIDDEN * FFN
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == rows * FFN


def test_lora_respects_silenced_rows():
    """LoKI + LoRA under a mask: the adapter adds nothing to silenced rows and their B rows get no gradient."""
    peft = pytest.importorskip("peft")
    from loki_kernels.lora import SplitLoraLinear, lora_config

    rows = random_rows(0.3)
    silence = [r[:2] + [c for c in range(HIDDEN) if c not in r][:2] for r in rows]
    model = patch_model(tiny_model(), rows, silence=silence)
    lora = peft.get_peft_model(model, lora_config(model, r=2, lora_alpha=4, init_lora_weights=False))
    layers = [m for m in lora.modules() if isinstance(m, SplitLoraLinear)]
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in layers]
    ids = batch(2, 8)
    lora(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    for layer, out, layer_silence in zip(layers, outputs, silence):
        assert torch.count_nonzero(out[..., layer_silence]) == 0
        split = layer.base_layer
        silenced_active = split.silenced.index_select(0, split.active_pos)
        grad_b = layer.lora_B["default"].weight.grad
        assert silenced_active.sum() == 2
        assert torch.count_nonzero(grad_b[silenced_active]) == 0
        assert torch.count_nonzero(grad_b[~silenced_active], dim=1).all()
