"""K-FAC curvature benchmarks (issue 13): ``pytest benchmarks/test_kfac.py --benchmark-only``.

One section per part of :mod:`loki_kernels.kfac`; each says what it times and against what.

**Pair selection** (``test_select_pairs``): which eigenpairs ``(i, j)`` of ``G ⊗ A`` the product edit keeps
(the smallest top set by ``λ_i·μ_j`` holding ρ of ``Σλ·Σμ``), on the CPU in float64 at the OLMo-2-1B
(2048 × 8192) and OLMo-2-7B (4096 × 11008) MLP shapes: ``λ`` (G's spectrum) hidden-long and ``μ`` (A's)
d_ff-long, as for ``down_proj`` (gate/up are the transpose). The spectra are decaying power laws (``i^-1.2``
and ``i^-1.0``, with 5 % log-normal noise, sorted, the last 1 % zero as clamped eigenvalues are), seed 0.
Providers:

* ``vectorised``: :func:`loki_kernels.kfac.select_pairs` (bisection on the threshold, then a sort and a
  sequential float64 cumsum of the staircase it finds);
* ``heap``: the original's heap loop, :func:`loki_kernels.reference.top_pairs_by_product` (one ``.item()`` per
  pair), timed once (``pedantic(rounds=1, iterations=1)``); its set is asserted identical to ours.

ρ = 0.6 (the paper's; ~1.6e4 and ~2.3e4 pairs on these spectra) and ρ = 0.9, where the kept set is ~5.7e5
(1B shape) and ~1.0e6 (7B shape) pairs, which is what caps the heap loop's time here (8-30 µs per pair on
a shared 2-core CPU: 4-17 s and 8-32 s; larger sets are not timed). ``extra_info``: provider, m, n, rho,
``pairs`` (the kept-set size), ``fraction`` of all pairs, ``median_ms``, and on the heap case
``speedup_of_vectorised`` (heap time / the vectorised median, when the vectorised case of the group ran first,
as it does in file order).

**Collection** (``test_collect``): tokens/s of gathering the K-FAC factors of gate, up and down of N layers
(MC Fisher, sampled labels, seed 0), over one batch of random tokens, on a random Llama: on a CPU-only machine
fp32, hidden 256, d_ff 688, 8 layers, 8 heads (4 KV), vocab 1000, 4 × 128 tokens; on CUDA bf16 with the
OLMo-2-1B MLP shape (hidden 2048, d_ff 8192), 16 layers, 16 heads (8 KV), vocab 32000, 8 × 512 tokens.
N = 1 (layer 0) and N = 4 (layers 0, 2, 4, 6 on the CPU; 0, 4, 8, 12 on CUDA): the lowest layer is always
included, so our backward gets no early stop it would not get in the original (the conservative case).
Providers:

* ``ours``: :func:`loki_kernels.kfac.collect_factors` (one pass for all layers, backward from the loss to the
  lowest layer's MLP input, no weight gradient);
* ``original``: :func:`loki_kernels.reference.collect_factors_original` with ``layers_per_pass=1`` (the
  original's default: one forward and full backward per layer, with the targets' weight gradients).

``extra_info``: provider, layers, tokens, ``tokens_per_s`` (data tokens per second, median) and, on the
original's case, ``speedup_of_ours`` (when ours ran first, as it does in file order). Targets (CPU):
ours >= the original at one layer, >= 2x at four.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from loki_kernels.kfac import collect_factors, pair_mask, select_pairs  # noqa: E402
from loki_kernels.reference import collect_factors_original, top_pairs_by_product  # noqa: E402

from benchmarks.device import CUDA, DEVICE, DEVICE_NAME, DTYPE  # noqa: E402

SEED = 0


# ------------------------------------------------------------------------------------------- pair selection
SELECT_SHAPES = [(2048, 8192), (4096, 11008)]
SELECT_RHOS = [0.6, 0.9]
SELECT_CASES = [(m, n, rho, provider) for m, n in SELECT_SHAPES for rho in SELECT_RHOS
                for provider in ("vectorised", "heap")]
SELECT_ROUNDS, SELECT_WARMUP = 10, 1
_VECTORISED_MS: dict[tuple[int, int, float], float] = {}


def _decaying_spectrum(n: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    i = torch.arange(1, n + 1, dtype=torch.float64)
    noise = torch.exp(0.05 * torch.randn(n, dtype=torch.float64, generator=generator))
    values = (i ** -exponent * noise).sort(descending=True).values
    values[n - max(1, n // 100):] = 0.0
    return values


def _spectra(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    return _decaying_spectrum(m, 1.2, generator), _decaying_spectrum(n, 1.0, generator)


@pytest.mark.parametrize("m,n,rho,provider", SELECT_CASES,
                         ids=[f"{m}x{n}-rho{rho:g}-{p}" for m, n, rho, p in SELECT_CASES])
def test_select_pairs(benchmark, m: int, n: int, rho: float, provider: str):
    lam, mu = _spectra(m, n)
    ours = select_pairs(lam, mu, rho)  # untimed: the set both providers must return
    pairs = int(ours.sum())
    benchmark.group = f"select_pairs-{m}x{n}-rho{rho:g}"
    benchmark.extra_info.update(provider=provider, m=m, n=n, rho=rho, pairs=pairs, fraction=pairs / (m * n),
                                dtype="float64", device="cpu")
    if provider == "vectorised":
        k = benchmark.pedantic(select_pairs, args=(lam, mu, rho), rounds=SELECT_ROUNDS,
                               warmup_rounds=SELECT_WARMUP, iterations=1)
        assert torch.equal(k, ours)
    else:
        selected = benchmark.pedantic(top_pairs_by_product, args=(lam, mu, rho), rounds=1, iterations=1)
        heap = torch.zeros(m, n, dtype=torch.bool)
        index = torch.tensor(selected, dtype=torch.int64).reshape(-1, 2)
        heap[index[:, 0], index[:, 1]] = True
        assert len(selected) == pairs and torch.equal(heap, pair_mask(ours, n)), "sets differ"

    if benchmark.stats is not None:  # None under --benchmark-disable
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["median_ms"] = round(ms, 3)
        if provider == "vectorised":
            _VECTORISED_MS[m, n, rho] = ms
        elif (m, n, rho) in _VECTORISED_MS:
            benchmark.extra_info["speedup_of_vectorised"] = round(ms / _VECTORISED_MS[m, n, rho], 1)


# ------------------------------------------------------------------------------------------- collection
# (name, hidden, d_ff, layers, heads, kv heads, vocab, batch, seq, layer sets)
COLLECT_SHAPE = (
    ("olmo2-1b-mlp", 2048, 8192, 16, 16, 8, 32000, 8, 512, [(0,), (0, 4, 8, 12)]) if CUDA
    else ("llama-small", 256, 688, 8, 8, 4, 1000, 4, 128, [(0,), (0, 2, 4, 6)])
)
COLLECT_CASES = [(layers, provider) for layers in COLLECT_SHAPE[-1] for provider in ("ours", "original")]
COLLECT_ROUNDS = {"ours": (10, 2), "original": (5, 1)}
_OURS_MS: dict[tuple[int, ...], float] = {}


@pytest.fixture(scope="module")
def collect_model():
    transformers = pytest.importorskip("transformers")
    name, hidden, d_ff, layers, heads, kv_heads, vocab, batch, seq, _ = COLLECT_SHAPE
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(2048, seq),
        tie_word_embeddings=False,
    )
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=DTYPE)
    model.eval()
    batches = [{"input_ids": torch.randint(0, vocab, (batch, seq), device=DEVICE)}]
    yield model, batches
    del model
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("layers,provider", COLLECT_CASES,
                         ids=[f"{len(layers)}layer{'s' if len(layers) > 1 else ''}-{p}" for layers, p in COLLECT_CASES])
def test_collect(benchmark, collect_model, layers: tuple[int, ...], provider: str):
    model, batches = collect_model
    if provider == "ours":
        def fn():
            return collect_factors(model, batches, layers=list(layers), fisher="mc", seed=SEED, progress=False)
    else:
        def fn():
            return collect_factors_original(model, batches, layers=list(layers), layers_per_pass=1,
                                            sample_labels=True, seed=SEED)

    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    tokens = sum(b["input_ids"].numel() for b in batches)
    benchmark.group = f"collect-{COLLECT_SHAPE[0]}-{len(layers)}layers"
    benchmark.extra_info.update(provider=provider, layers=list(layers), tokens=tokens, model=COLLECT_SHAPE[0],
                                dtype=str(DTYPE).removeprefix("torch."), device=DEVICE_NAME)
    rounds, warmup = COLLECT_ROUNDS[provider]
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["median_ms"] = round(ms, 3)
        benchmark.extra_info["tokens_per_s"] = round(tokens / (ms * 1e-3), 1)
        if provider == "ours":
            _OURS_MS[layers] = ms
        elif layers in _OURS_MS:
            benchmark.extra_info["speedup_of_ours"] = round(ms / _OURS_MS[layers], 2)
