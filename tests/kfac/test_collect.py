"""K-FAC factor collection and row scores against float64 oracles.

Two oracles, both on a float64 copy of the model:

* the original's collection (:func:`loki_kernels.reference.collect_factors_original`: backward hooks, mean
  loss, one pass per layer) for ``normalize="original"``;
* ``direct``, below: a plain summed-loss computation that captures every module's input and output with
  forward hooks and takes the output gradients with ``torch.autograd.grad`` (no tensor hooks, no detached
  leaf), for ``normalize="sum"`` and the row scores.

Batches are left-padded and ragged, with random token ids at the pads (so a leak would show).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from loki_kernels.arch import find_mlps
from loki_kernels.kfac import Factors, collect_factors, row_scores
from loki_kernels.reference import collect_factors_original
from loki_kernels.selection import target_pos_from_scores
from tests.conftest import TOL, rel_err
from tests.tiny_models import FFN, HIDDEN, LAYERS, VOCAB, tiny_model

FP32 = TOL[torch.float32]


# --------------------------------------------------------------------------------------------- helpers
def ragged(n_batches=2, size=3, length=9, pad_first=True):
    """Left-padded batches: every sequence has 2..length real tokens, the first one of a batch the fewest."""
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (size, length))
        real = torch.randint(2, length + 1, (size,))
        if pad_first:
            real[0] = min(int(real[0]), length - 3)
        mask = (torch.arange(length) >= length - real[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def modules_of(arch):
    return ("up", "down") if arch in ("gpt2", "phi3") else ("gate", "up", "down")


def direct(model, batches, layers, modules, fisher="empirical", seed=0, scale="sum"):
    """Float64 K-FAC factors and row scores from captured per-token inputs and output gradients."""
    model = copy.deepcopy(model).double()
    mlps = find_mlps(model)
    generator = torch.Generator().manual_seed(seed)
    parts = {(layer, name): getattr(mlps[layer], name).module for layer in layers for name in modules}
    A, G, coupled, diag = {}, {}, {}, {}
    n = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        valid = torch.zeros_like(real)
        valid[:, :-1] = real[:, :-1] & real[:, 1:]
        seen = {}
        handles = [m.register_forward_hook(lambda mod, args, out, key=key: seen.__setitem__(key, (args[0], out)))
                   for key, m in parts.items()]
        try:
            position_ids = (real.long().cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=real.long(), position_ids=position_ids).logits[valid]
        finally:
            for h in handles:
                h.remove()
        if fisher == "empirical":
            labels = ids[:, 1:][valid[:, :-1]]
        else:
            probs = torch.softmax(logits.detach().float(), -1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        if scale == "original":
            loss = loss / int(valid.sum())
        keys = list(seen)
        grads = torch.autograd.grad(loss, [seen[k][1] for k in keys])
        reads_mlp = [name for name in modules if name != "down"]
        for (layer, name), g in zip(keys, grads):
            a, g = seen[layer, name][0][valid], g[valid]
            if name == "down" or name == reads_mlp[0]:  # gate and up read one input: counted once
                akey = f"{layer}.{'down' if name == 'down' else 'mlp'}"
                A[akey] = A.get(akey, 0) + a.t() @ a
            G[f"{layer}.{name}"] = G.get(f"{layer}.{name}", 0) + g.t() @ g
            if name == "down":
                coupled[layer] = coupled.get(layer, 0) + (g * g).t() @ (a * a).sum(1)
                diag[layer] = diag.get(layer, 0) + (g * g).sum(0)
        n += int(valid.sum())
    return ({k: v / n for k, v in A.items()}, {k: v / n for k, v in G.items()},
            {k: v / n for k, v in coupled.items()}, {k: v / n for k, v in diag.items()}, n)


def assert_factors(factors: Factors, A, G, tol=FP32):
    assert set(factors.A) == set(A) and set(factors.G) == set(G)
    for key in A:
        assert factors.A[key].dtype == torch.float32
        assert rel_err(factors.A[key], A[key]) < tol, ("A", key, rel_err(factors.A[key], A[key]))
    for key in G:
        assert factors.G[key].dtype == torch.float32
        assert rel_err(factors.G[key], G[key]) < tol, ("G", key, rel_err(factors.G[key], G[key]))


def state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()])


def assert_state(model, before):
    weights, flags, training = before
    after = state(model)
    assert after[0].keys() == weights.keys()
    assert all(torch.equal(after[0][k], weights[k]) for k in weights)
    assert [(n, r) for n, r, _ in after[1]] == [(n, r) for n, r, _ in flags]
    assert all(g is None for _, _, g in after[1])
    assert after[2] == training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


# --------------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "olmo2", "gpt2"])
def test_factors_match_float64_oracles(arch, fisher):
    model = tiny_model(arch)
    batches = ragged()
    layers, modules = [0, 2], modules_of(arch)
    seed = int(torch.randint(0, 2**31, ()))

    ours = collect_factors(model, batches, layers=layers, modules=modules, fisher=fisher, seed=seed,
                           normalize="original", progress=False)
    original = collect_factors_original(copy.deepcopy(model).double(), batches, layers=layers, layers_per_pass=1,
                                        sample_labels=fisher == "mc", seed=seed, dtype=torch.float64)
    A = {f"{k[3:].split('.')[0]}.{'down' if k.endswith('down') else 'mlp'}": v["A"] for k, v in original.items()}
    G = {k[3:]: v["G"] for k, v in original.items()}
    assert_factors(ours, A, G)
    assert all(v["n_tokens"] == ours.n_tokens[k[3:].split(".")[0]] for k, v in original.items())

    summed = collect_factors(model, batches, layers=layers, modules=modules, fisher=fisher, seed=seed,
                             progress=False)
    A, G, _, _, n = direct(model, batches, layers, modules, fisher, seed)
    assert_factors(summed, A, G)
    assert summed.n_tokens == {"0": n, "2": n}
    assert summed.settings["fisher"] == fisher and summed.settings["normalize"] == "sum"


def test_phi3_fused_gate_up():
    model = tiny_model("phi3")
    batches = ragged(1)
    factors = collect_factors(model, batches, layers=[1], modules=("up", "down"), fisher="empirical",
                              progress=False)
    A, G, _, _, _ = direct(model, batches, [1], ("up", "down"))
    assert_factors(factors, A, G)
    assert factors.g(1, "up").shape == (2 * FFN, 2 * FFN)


def test_original_relation_without_and_with_pads():
    """normalize="original" is the summed-loss G scaled by 1/N_b² per batch; pad_aware=False is the original."""
    model = tiny_model("llama")
    full = [{"input_ids": torch.randint(0, VOCAB, (3, 7))}]
    summed = collect_factors(model, full, layers=[1], fisher="empirical", progress=False)
    mean = collect_factors(model, full, layers=[1], fisher="empirical", normalize="original", progress=False)
    for key in summed.G:
        assert rel_err(mean.G[key], summed.G[key] / (3 * 6) ** 2) < FP32
        assert torch.equal(mean.A[key.split(".")[0] + ".down"], summed.A[key.split(".")[0] + ".down"])

    model64 = copy.deepcopy(model).double()
    for sample in (False, True):  # without pads the original's own handling and the pad-aware one agree
        as_original = collect_factors_original(model64, full, layers=[1], sample_labels=sample, seed=5,
                                               dtype=torch.float64, pad_aware=False)
        aware = collect_factors_original(model64, full, layers=[1], sample_labels=sample, seed=5,
                                         dtype=torch.float64)
        for key in as_original:
            assert rel_err(as_original[key]["G"], aware[key]["G"]) < TOL[torch.float64]
            assert as_original[key]["n_tokens"] == aware[key]["n_tokens"] == 18

    padded = ragged(1)  # with pads the original keeps pad rows in A and n (documented difference)
    as_original = collect_factors_original(model64, padded, layers=[1], dtype=torch.float64, pad_aware=False)
    ours = collect_factors(model, padded, layers=[1], fisher="empirical", normalize="original", progress=False)
    assert as_original["blk1.down"]["n_tokens"] == 3 * 8 > ours.n_tokens["1"]
    assert rel_err(ours.a(1, "down"), as_original["blk1.down"]["A"]) > 1e-3


# --------------------------------------------------------------------------------------------- passes
def test_one_pass_equals_per_layer_passes():
    model = tiny_model("qwen2")
    batches = ragged()
    seed = int(torch.randint(0, 2**31, ()))
    together = collect_factors(model, batches, layers=[2, 0, 1], fisher="mc", seed=seed, progress=False)
    assert together.layers() == [0, 1, 2]
    for layer in range(LAYERS):
        alone = collect_factors(model, batches, layers=[layer], fisher="mc", seed=seed, progress=False)
        for module in ("gate", "up", "down"):
            assert rel_err(together.g(layer, module), alone.g(layer, module)) < FP32
            assert rel_err(together.a(layer, module), alone.a(layer, module)) < FP32
        assert together.n_tokens[str(layer)] == alone.n_tokens[str(layer)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_summed_scale_is_batch_size_independent(side):
    """One batch of 4 ragged (padded) sequences gives the factors of 4 batches of 1 (no pads)."""
    model = tiny_model("llama")
    (batch,) = ragged(1, size=4)
    if side == "right":
        batch = {key: value.flip(1) for key, value in batch.items()}
    singles = [{"input_ids": ids[mask.bool()][None]} for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    one = collect_factors(model, [batch], layers=[0, 2], fisher="empirical", progress=False)
    four = collect_factors(model, singles, layers=[0, 2], fisher="empirical", progress=False)
    count = sum(single["input_ids"].shape[1] - 1 for single in singles)
    assert one.n_tokens == four.n_tokens == {"0": count, "2": count}
    for key in one.G:
        assert rel_err(one.G[key], four.G[key]) < FP32
    for key in one.A:
        assert rel_err(one.A[key], four.A[key]) < FP32


def test_mc_labels_are_seeded():
    model = tiny_model("llama")
    batches = ragged()
    a = collect_factors(model, batches, layers=[1], modules="down", seed=3, progress=False)
    b = collect_factors(model, batches, layers=[1], modules="down", seed=3, progress=False)
    c = collect_factors(model, batches, layers=[1], modules="down", seed=4, progress=False)
    assert torch.equal(a.g(1, "down"), b.g(1, "down"))
    assert rel_err(a.g(1, "down"), c.g(1, "down")) > 1e-3
    assert torch.equal(a.a(1, "down"), c.a(1, "down"))  # labels change G only


def test_bf16_model_gives_fp32_factors_close_to_fp32():
    bf16 = tiny_model("llama").bfloat16()
    fp32 = copy.deepcopy(bf16).float()  # the same (bf16-representable) weights
    batches = ragged(2, size=4, length=12)
    low = collect_factors(bf16, batches, layers=[0, 2], fisher="empirical", progress=False)
    high = collect_factors(fp32, batches, layers=[0, 2], fisher="empirical", progress=False)
    assert_factors(low, high.A, high.G, tol=TOL[torch.bfloat16])
    assert low.settings["model_dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------- model state
def test_model_unchanged_after_and_on_error(monkeypatch):
    model = tiny_model("olmo2")
    model.train()
    model.model.layers[1].eval()  # mixed training flags and requires_grad flags must come back as they were
    model.lm_head.weight.requires_grad_(False)
    before = state(model)
    collect_factors(model, ragged(1), layers=[1, 2], progress=False)
    row_scores(model, ragged(1), progress=False)
    assert_state(model, before)

    import loki_kernels.kfac.collect as collect

    calls = []

    def failing(out, x, mask=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return out.addmm_(x[mask].t().to(out.dtype), x[mask].to(out.dtype))

    monkeypatch.setattr(collect, "covariance_", failing)
    with pytest.raises(RuntimeError, match="boom"):
        collect_factors(model, ragged(1), layers=[1, 2], progress=False)
    assert_state(model, before)


def test_gate_and_up_share_one_a():
    model = tiny_model("llama")
    batches = ragged(1)
    factors = collect_factors(model, batches, layers=[1], fisher="empirical", progress=False)
    assert set(factors.A) == {"1.mlp", "1.down"} and set(factors.G) == {"1.gate", "1.up", "1.down"}
    assert factors.a(1, "gate") is factors.a(1, "up")
    assert factors.modules() == [(1, "gate"), (1, "up"), (1, "down")]
    for modules in (("gate",), ("down",), ("up", "down")):  # subsets: the same factors
        part = collect_factors(model, batches, layers=[1], modules=modules, fisher="empirical", progress=False)
        assert {m for _, m in part.modules()} == set(modules)
        for module in modules:
            assert rel_err(part.g(1, module), factors.g(1, module)) < FP32
            assert rel_err(part.a(1, module), factors.a(1, module)) < FP32


# --------------------------------------------------------------------------------------------- row scores
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_scores_match_direct_computation(arch):
    model = tiny_model(arch)
    batches = ragged()
    seed = int(torch.randint(0, 2**31, ()))
    scores = row_scores(model, batches, fisher="mc", seed=seed, progress=False)
    _, _, coupled, diag, n = direct(model, batches, list(range(LAYERS)), ("down",), "mc", seed)
    assert scores.layers == [0, 1, 2] and scores.n_tokens == n
    assert scores.coupled.shape == scores.diag_g.shape == (LAYERS, HIDDEN)
    assert rel_err(scores.coupled, torch.stack([coupled[i] for i in range(LAYERS)])) < FP32
    assert rel_err(scores.diag_g, torch.stack([diag[i] for i in range(LAYERS)])) < FP32

    some = row_scores(model, batches, layers=[2], fisher="mc", seed=seed, progress=False)
    assert some.layers == [2] and rel_err(some.coupled[0], scores.coupled[2]) < FP32
    factors = collect_factors(model, batches, layers=[2], modules="down", fisher="mc", seed=seed, progress=False)
    assert rel_err(some.diag_g[0], factors.g(2, "down").diagonal()) < FP32

    rows = target_pos_from_scores(scores.coupled, 10, "layer_lowest")
    k = HIDDEN // 10
    assert [len(r) for r in rows] == [k] * LAYERS
    for layer, chosen in enumerate(rows):
        assert chosen == torch.argsort(scores.coupled[layer])[:k].tolist()


# --------------------------------------------------------------------------------------------- selection
def test_target_pos_from_scores_strategies_and_ties():
    scores = torch.randn(3, 20).round(decimals=1)  # rounding makes ties
    scores[1, 5] = scores[1, 7] = scores[1].min() - 1  # a tie at the very front
    for strategy, descending in (("layer_lowest", False), ("layer_highest", True)):
        rows = target_pos_from_scores(scores, 25, strategy)
        for layer in range(3):
            ranked = sorted(range(20), key=lambda j: ((-1 if descending else 1) * scores[layer, j].item(), j))
            assert rows[layer] == ranked[:5]
    assert target_pos_from_scores(scores, 25)[1][:2] == [5, 7]
    for strategy, descending in (("global_lowest", False), ("global_highest", True)):
        rows = target_pos_from_scores(scores.numpy(), 10, strategy)
        flat = scores.reshape(-1)
        ranked = sorted(range(60), key=lambda f: ((-1 if descending else 1) * flat[f].item(), f))[:6]
        expected = [[f % 20 for f in ranked if f // 20 == layer] for layer in range(3)]
        assert rows == expected
    assert target_pos_from_scores(scores, 100, "layer_highest")[0] == \
        sorted(range(20), key=lambda j: (-scores[0, j].item(), j))


@pytest.mark.parametrize("scores, quota, strategy, match", [
    (torch.randn(2, 10), 10, "layer_balanced", "unknown score selection strategy"),
    (torch.randn(2, 10), 0, "layer_lowest", "quota"),
    (torch.randn(2, 10), 5, "layer_lowest", "selects no row"),
    (torch.randn(10), 10, "layer_lowest", "2-D"),
    (torch.tensor([[0.0, float("nan")]]), 50, "global_lowest", "layer 0, row 1 is nan"),
])
def test_target_pos_from_scores_bad_input(scores, quota, strategy, match):
    with pytest.raises(ValueError, match=match):
        target_pos_from_scores(scores, quota, strategy)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch, kwargs, batches, match", [
    ("llama", {"layers": [3]}, None, "unknown layer index 3"),
    ("llama", {"layers": [-1]}, None, "unknown layer index -1"),
    ("llama", {"layers": []}, None, "layers is empty"),
    ("llama", {"layers": [1, 1]}, None, "layer 1 is listed twice"),
    ("llama", {"layers": [0], "modules": ("gate", "proj")}, None, "unknown MLP module 'proj'"),
    ("phi3", {"layers": [0]}, None, "Phi3ForCausalLM layer 0 has no gate projection"),
    ("gpt2", {"layers": [0], "modules": ("gate",)}, None, "GPT2LMHeadModel layer 0 has no gate"),
    ("llama", {"layers": [0], "fisher": "true"}, None, "unknown fisher 'true'"),
    ("llama", {"layers": [0], "normalize": "mean"}, None, "unknown normalize 'mean'"),
    ("llama", {"layers": [0], "seed": -1}, None, "seed must be"),
    ("llama", {"layers": [0]}, [], "no batches"),
    ("llama", {"layers": [0]}, [{"ids": torch.zeros(1, 4, dtype=torch.long)}], "batch 0 has no 'input_ids'"),
    ("llama", {"layers": [0]}, [{"input_ids": torch.zeros(4, dtype=torch.long)}], "batch 0: input_ids must be"),
    ("llama", {"layers": [0]}, [{"input_ids": torch.full((1, 4), VOCAB)}], r"token ids must be in \[0, 97\)"),
    ("llama", {"layers": [0]}, [{"input_ids": torch.zeros(2, 4, dtype=torch.long),
                                 "attention_mask": torch.ones(2, 3)}], "attention_mask has shape"),
    ("llama", {"layers": [0]}, [{"input_ids": torch.zeros(1, 1, dtype=torch.long)}], "no loss position"),
])
def test_bad_input_fails_before_any_forward(arch, kwargs, batches, match):
    model = tiny_model(arch)
    good = [{"input_ids": torch.randint(0, VOCAB, (2, 5))}]
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=match):
        collect_factors(model, good if batches is None else batches, progress=False, **kwargs)
    assert forwards == []


@pytest.mark.parametrize("kwargs, batches, match", [
    ({"layers": [5]}, None, "unknown layer index 5"),
    ({"fisher": "gauss"}, None, "unknown fisher 'gauss'"),
    ({}, [], "no batches"),
    ({}, [{"attention_mask": torch.ones(1, 4)}], "batch 0 has no 'input_ids'"),
])
def test_row_scores_bad_input(kwargs, batches, match):
    model = tiny_model("llama")
    good = [{"input_ids": torch.randint(0, VOCAB, (2, 5))}]
    with pytest.raises(ValueError, match=match):
        row_scores(model, good if batches is None else batches, progress=False, **kwargs)
