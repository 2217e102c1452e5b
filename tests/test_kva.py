"""KVA engine (loki_kernels.kva.attribute) against straightforward references, on tiny random models.

* ``semantics="last_token"`` against the paper estimator re-implemented below (one layer at a time: the
  prompt repeated m times, a hook overwriting only the last position of that layer's down_proj output with
  ``alpha_k x_l``, a full forward, autograd.grad), for all five quadrature methods;
* ``semantics="captum"`` against Captum's LayerIntegratedGradients, layer by layer (LoKI HEAD);
* padding (left and right) equals one prompt at a time; given targets; layer subsets; chunking; both
  last-token paths (packed rows and expanded caches); the Triton kernels (interpreter on CPU).
"""

import warnings

import pytest
import torch
from torch import nn

import loki_kernels.kva as kva
from loki_kernels import find_down_projs
from loki_kernels.kva import attribute
from loki_kernels.reference import captum_loop, paper_estimator
from loki_kernels.ops.kva_quadrature import METHODS, quadrature
from tests.conftest import DEVICE, rel_err
from tests.tiny_models import LAYERS, HIDDEN, VOCAB, tiny_model

ARCHS = ["llama", "qwen2", "mistral"]
SEQ = 10


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(1234)
    return tiny_model(request.param).to(DEVICE)


def _prompt(n=1, length=SEQ):
    return torch.randint(1, VOCAB, (n, length), device=DEVICE)


def paper_reference(model, ids, method="riemann_left", steps=7, target=None):
    """The paper estimator, written out in the most direct way: one layer at a time, full sequence."""
    alphas, weights = quadrature(method, steps)
    projs = find_down_projs(model)
    xs = {}
    handles = [p.module.register_forward_hook(lambda m, i, o, l=p.layer: xs.__setitem__(l, o[:, -1].detach()))
               for p in projs]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    for h in handles:
        h.remove()
    label = int(logits.argmax()) if target is None else target
    rows = []
    for layer, proj in enumerate(projs):
        x = xs[layer]  # [1, H]
        z = (alphas.to(x)[:, None] * x).requires_grad_()  # [m, H] leaf

        def hook(module, inputs, output):
            output = output.clone()
            output[:, -1] = z
            return output

        handle = proj.module.register_forward_hook(hook)
        prob = torch.softmax(model(input_ids=ids.repeat(steps, 1)).logits[:, -1].float(), -1)[:, label].sum()
        handle.remove()
        (grad,) = torch.autograd.grad(prob, z)
        rows.append(x[0] * (weights.to(grad)[:, None] * grad).sum(0))
    return torch.stack(rows)[None]


# --------------------------------------------------------------------------------------------------
# the two estimators
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_last_token_equals_paper_estimator(model, method):
    ids = _prompt()
    out = attribute(model, ids, method=method)
    ref = paper_reference(model, ids, method)
    assert out.shape == (1, LAYERS, HIDDEN) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    if method == "riemann_left":  # the library's paper estimator (paper arithmetic: step = x/m) agrees too
        assert rel_err(paper_estimator(model, ids), ref) <= 1e-5


@pytest.mark.parametrize("method", ["riemann_left", "gausslegendre"])
def test_last_token_expanded_cache_path(model, method):
    ids = _prompt()
    assert rel_err(attribute(model, ids, method=method, pack_rows=False), paper_reference(model, ids, method)) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_captum_semantics_equals_captum(model, method):
    pytest.importorskip("captum")
    ids = _prompt()
    out = attribute(model, ids, method=method, semantics="captum")
    ref = captum_loop(model, ids, method=method)
    assert out.shape == (1, LAYERS, HIDDEN)
    assert rel_err(out, ref) <= 1e-4


def test_captum_semantics_without_broadcast(model):
    """The fallback that runs the whole prompt at batch m gives the same result."""
    pytest.importorskip("captum")
    ids = _prompt()
    fast = attribute(model, ids, semantics="captum", method="riemann_trapezoid")
    slow = attribute(model, ids, semantics="captum", method="riemann_trapezoid", broadcast_prefix=False)
    assert rel_err(slow, fast) <= 1e-5


def test_semantics_differ(model):
    ids = _prompt()
    a = attribute(model, ids, method="riemann_trapezoid")
    b = attribute(model, ids, method="riemann_trapezoid", semantics="captum")
    assert rel_err(a, b) > 1e-3  # two different estimators (LoKI report §1.4)


@pytest.mark.parametrize("semantics", kva.SEMANTICS)
def test_single_token_prompt(model, semantics):
    ids = _prompt(length=1)
    out = attribute(model, ids, semantics=semantics, method="riemann_middle")
    if semantics == "last_token":
        ref = paper_reference(model, ids, "riemann_middle")
    else:
        pytest.importorskip("captum")
        ref = captum_loop(model, ids, method="riemann_middle")
    assert rel_err(out, ref) <= 1e-4


# --------------------------------------------------------------------------------------------------
# batches, targets, layers, chunks
# --------------------------------------------------------------------------------------------------
def _pad(prompts, side, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl] = p
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("semantics", kva.SEMANTICS)
def test_padded_batch_equals_one_at_a_time(model, side, semantics):
    prompts = [_prompt(length=n)[0] for n in (7, SEQ, 4)]
    ids, mask = _pad(prompts, side, pad_id=5)
    out = attribute(model, ids, mask, semantics=semantics, steps=4, method="riemann_right")
    assert out.shape == (3, LAYERS, HIDDEN)
    for i, p in enumerate(prompts):
        alone = attribute(model, p[None], semantics=semantics, steps=4, method="riemann_right")
        assert rel_err(out[i], alone[0]) <= 1e-5


def test_given_target(model):
    ids = _prompt(2)
    argmax = attribute(model, ids)
    with torch.no_grad():
        top = model(input_ids=ids).logits[:, -1].argmax(-1)
    assert rel_err(attribute(model, ids, target=top), argmax) <= 1e-6
    other = (top + 1) % VOCAB
    out = attribute(model, ids, target=other)
    for i in range(2):
        assert rel_err(out[i], paper_reference(model, ids[i:i + 1], target=int(other[i]))[0]) <= 1e-5
    assert rel_err(attribute(model, ids, target=other.tolist()), out) <= 1e-6
    pytest.importorskip("captum")
    cap = attribute(model, ids[:1], semantics="captum", target=other[:1], method="gausslegendre")
    assert rel_err(cap, captum_loop(model, ids[:1], target=other[:1], method="gausslegendre")) <= 1e-4


@pytest.mark.parametrize("semantics", kva.SEMANTICS)
def test_layer_subset(model, semantics):
    ids = _prompt()
    full = attribute(model, ids, semantics=semantics)
    sub = attribute(model, ids, semantics=semantics, layers=[2, 0])
    assert sub.shape == (1, 2, HIDDEN)
    assert rel_err(sub, full[:, [2, 0]]) <= 1e-5
    assert rel_err(attribute(model, ids, semantics=semantics, layers=[-1]), full[:, [LAYERS - 1]]) <= 1e-5


@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "expanded"])
def test_chunking_equals_unchunked(model, rows, packed):
    ids = _prompt()
    full = attribute(model, ids, steps=5)
    chunked = attribute(model, ids, steps=5, max_batch_rows=rows, pack_rows=packed)
    assert rel_err(chunked, full) <= 1e-5


@pytest.mark.parametrize("rows", [1, 3])
def test_captum_chunking_equals_unchunked(model, rows):
    ids = _prompt()
    full = attribute(model, ids, semantics="captum", steps=5)
    assert rel_err(attribute(model, ids, semantics="captum", steps=5, max_batch_rows=rows), full) <= 1e-5


def test_triton_backend_equals_torch(model):
    ids = _prompt()
    for semantics in kva.SEMANTICS:
        a = attribute(model, ids, semantics=semantics, backend="torch")
        b = attribute(model, ids, semantics=semantics, backend="triton")
        assert rel_err(b, a) <= 1e-6


# --------------------------------------------------------------------------------------------------
# model state, other architectures, fallbacks, errors
# --------------------------------------------------------------------------------------------------
def test_restores_model_state():
    model = tiny_model("llama").to(DEVICE)
    model.train()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = attribute(model, _prompt(), semantics="captum")
    assert torch.isfinite(out).all()
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "gemma2", "gemma3", "phi3", "qwen3", "olmo2"])
def test_other_architectures(arch):
    torch.manual_seed(0)
    model = tiny_model(arch).to(DEVICE)
    ids = _prompt(length=6)
    assert rel_err(attribute(model, ids, steps=3), paper_reference(model, ids, steps=3)) <= 1e-5
    if arch in ("gpt2", "gemma2"):
        pytest.importorskip("captum")
        out = attribute(model, ids, steps=3, semantics="captum")
        assert rel_err(out, captum_loop(model, ids, steps=3)) <= 1e-4


class _MaskIgnoringLM(nn.Module):
    """A causal LM whose forward drops custom attention masks (as e.g. flash-attention kernels would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        return self.inner(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)


def test_packed_rows_fall_back_when_the_mask_is_ignored():
    torch.manual_seed(0)
    inner = tiny_model("llama").to(DEVICE)
    model = _MaskIgnoringLM(inner)
    ids = _prompt()
    with pytest.warns(UserWarning, match="packed-rows attention mask"):
        out = attribute(model, ids)
    assert rel_err(out, paper_reference(inner, ids)) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(attribute(model, ids), out) <= 1e-6  # remembered for this model: no second warning
    with pytest.warns(UserWarning, match="packed-rows attention mask"):
        attribute(_MaskIgnoringLM(inner), ids)  # another model object checks again


def test_rejects_bad_arguments():
    model = tiny_model("llama").to(DEVICE)
    ids = _prompt()
    with pytest.raises(ValueError, match="semantics"):
        attribute(model, ids, semantics="mean")
    with pytest.raises(ValueError, match="quadrature method"):
        attribute(model, ids, method="simpson")
    with pytest.raises(ValueError, match="out of range"):
        attribute(model, ids, layers=[LAYERS])
    with pytest.raises(ValueError, match="target"):
        attribute(model, ids, target="gold")
    with pytest.raises(ValueError, match="target"):
        attribute(model, ids, target=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="no real tokens"):
        attribute(model, ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="max_batch_rows"):
        attribute(model, ids, max_batch_rows=0)
    with pytest.raises(ValueError, match="backend"):
        attribute(model, ids, backend="cuda")


def test_inference_mode_caller():
    model = tiny_model("llama").to(DEVICE)
    ids = _prompt(2)
    ref = attribute(model, ids)
    with torch.inference_mode():
        out = attribute(model, ids.clone())
        cap = attribute(model, ids.clone(), semantics="captum")
    assert not out.is_inference()
    assert rel_err(out, ref) <= 1e-6
    assert torch.isfinite(cap).all()
