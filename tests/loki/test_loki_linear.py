"""``loki.LoKILinear``: the original project's unit-test cases for ``LoKILinear`` (tests/unit/test_loki_linear.py,
rewritten here from their documented behaviour), then the same class against the original implementation
(``loki_kernels.reference``) on both backends.
"""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loki
from loki_kernels.reference import LoKILinear as OriginalLoKILinear
from tests.conftest import DEVICE, TOL, rel_err

BACKENDS = ["torch", "triton"]


# ----------------------------------------------------------------------------------- the original's cases
def test_initialization():
    layer = loki.LoKILinear(nn.Linear(1024, 2048, bias=False), [0, 10, 20, 30])
    assert layer.in_features == 1024 and layer.out_features == 2048
    assert layer.active.weight.shape == (4, 1024)
    assert layer.frozen.weight.shape == (2048 - 4, 1024)


def test_empty_target_pos():
    layer = loki.LoKILinear(nn.Linear(512, 1024, bias=False), [])
    assert layer.active.weight.shape == (0, 512) and layer.frozen.weight.shape == (1024, 512)


def test_full_target_pos():
    layer = loki.LoKILinear(nn.Linear(512, 1024, bias=False), list(range(1024)))
    assert layer.active.weight.shape == (1024, 512) and layer.frozen.weight.shape == (0, 512)


def test_forward_output_shape():
    layer = loki.LoKILinear(nn.Linear(256, 512, bias=False), [0, 50, 100, 150])
    assert layer(torch.randn(8, 128, 256)).shape == (8, 128, 512)


def test_forward_preserves_output():
    linear = nn.Linear(128, 256, bias=False)
    layer = loki.LoKILinear(linear, [0, 10, 20, 30, 40])
    x = torch.randn(4, 16, 128)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_frozen_weights_no_gradient():
    layer = loki.LoKILinear(nn.Linear(64, 128, bias=False), [0, 10, 20])
    assert not layer.frozen.weight.requires_grad and layer.active.weight.requires_grad


def test_active_weights_receive_gradient():
    layer = loki.LoKILinear(nn.Linear(32, 64, bias=False), [0, 5, 10, 15])
    x = torch.randn(2, 8, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.active.weight.grad is not None and layer.active.weight.grad.shape == layer.active.weight.shape
    assert layer.frozen.weight.grad is None


def test_weight_splitting_correctness():
    linear = nn.Linear(16, 32, bias=False)
    with torch.no_grad():
        linear.weight[:] = torch.arange(32 * 16).reshape(32, 16).float()
    target_pos = [0, 5, 10, 15, 20, 25]
    layer = loki.LoKILinear(linear, target_pos)
    for i, pos in enumerate(target_pos):
        torch.testing.assert_close(layer.active.weight[i], linear.weight[pos])


def test_index_map_correctness():
    target_pos = [1, 3, 5, 7, 9, 11]
    layer = loki.LoKILinear(nn.Linear(8, 16, bias=False), target_pos)
    assert layer.index_map.shape == (16,) and layer.index_map.dtype == torch.long
    # The original's definition: position n of cat([active, frozen]) outputs.
    expected = torch.empty(16, dtype=torch.long)
    frozen = [n for n in range(16) if n not in target_pos]
    expected[target_pos] = torch.arange(6)
    expected[frozen] = 6 + torch.arange(10)
    assert torch.equal(layer.index_map, expected)
    assert layer.active_pos == target_pos and layer.frozen_pos == frozen


def test_duplicate_target_pos():
    with pytest.raises(ValueError, match="duplicate"):
        loki.LoKILinear(nn.Linear(32, 64, bias=False), [0, 10, 10, 20, 20, 20])


def test_out_of_range_positions():
    with pytest.raises(ValueError, match=r"^Target neuron indices must be within \[0, 31\]$"):
        loki.LoKILinear(nn.Linear(16, 32, bias=False), [0, 10, 32])
    with pytest.raises(ValueError, match=r"^Target neuron indices must be within \[0, 31\]$"):
        loki.LoKILinear(nn.Linear(16, 32, bias=False), [-1])


def test_error_wording_is_the_originals():
    """Same message as the original class for the same mistake (out of range wins over duplicates, as there)."""
    for target_pos in ([3, 3], [0, 40], [40, 40]):
        messages = []
        for cls in (loki.LoKILinear, OriginalLoKILinear):
            with pytest.raises(ValueError) as info:
                cls(nn.Linear(8, 32), target_pos)
            messages.append(str(info.value))
        assert messages[0] == messages[1], target_pos


def test_non_integer_positions_are_named():  # the original failed later, while indexing
    with pytest.raises(ValueError, match="must be integers, got 1.5"):
        loki.LoKILinear(nn.Linear(8, 16), [1.5])


# --------------------------------------------------------------------------------- against the original
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", ["none", "some", "all"])
def test_same_as_the_original(backend, bias, rows):
    """Outputs, input gradients and the split parameters' gradients equal the original's, after training too."""
    n, k = 29, 53
    target_pos = {"none": [], "some": torch.randperm(n)[:9].tolist(), "all": list(range(n))}[rows]
    linear = nn.Linear(k, n, bias=bias).to(DEVICE)
    ours, original = loki.LoKILinear(linear, target_pos, backend=backend), OriginalLoKILinear(linear, target_pos)
    assert ours.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    opt_orig = torch.optim.SGD([p for p in original.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        x = torch.randn(3, 7, k, device=DEVICE)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = ours(x1), original(x2)
        dy = torch.randn_like(y_ref)
        y.backward(dy)
        y_ref.backward(dy)
        assert rel_err(y, y_ref) < TOL[torch.float32]
        assert rel_err(x1.grad, x2.grad) < TOL[torch.float32]
        if target_pos:
            assert rel_err(ours.active.weight.grad, original.active.weight.grad) < TOL[torch.float32]
            if bias:
                assert rel_err(ours.active_bias.grad, original.active_bias.grad) < TOL[torch.float32]
        assert ours.frozen.weight.grad is None and (not bias or ours.frozen_bias.grad is None)
        opt_ours.step()
        opt_orig.step()
        opt_ours.zero_grad()
        opt_orig.zero_grad()


def test_state_dict_round_trip_with_the_original():
    """A state dict saved by the original class loads into ours (and back): the keys and meaning are the same."""
    linear = nn.Linear(20, 12, bias=True)
    original = OriginalLoKILinear(linear, [2, 7])
    with torch.no_grad():
        original.active.weight.add_(1.0)  # "trained"
        original.active_bias.add_(1.0)
    ours = loki.LoKILinear(nn.Linear(20, 12, bias=True), [2, 7])
    ours.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 20)
    assert torch.allclose(ours(x), original(x), atol=1e-6)


def test_any_input_shape_and_conv1d():
    linear = nn.Linear(10, 6)
    layer = loki.LoKILinear(linear, [4, 0])
    for shape in ((10,), (5, 10), (2, 3, 4, 10)):
        x = torch.randn(*shape)
        assert torch.allclose(layer(x), linear(x), atol=1e-6)
    conv = Conv1D(6, 10)  # GPT-2 layout: weight [in, out]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = loki.LoKILinear(conv, [1, 5])
    x = torch.randn(3, 10)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
