"""KVA benchmarks: ``pytest benchmarks/test_kva.py --benchmark-only``.

Per-sample (one prompt) time of :func:`loki_kernels.kva.attribute` against the straightforward estimators
it reproduces (``loki_kernels.reference``), ``steps = 7``:

* group ``<shape>-last_token`` (``method="riemann_left"``, the paper's): ``engine`` =
  ``attribute(semantics="last_token")`` vs ``paper`` = ``paper_estimator`` (LoKI's first commit: per layer,
  the prompt repeated m times, full forward+backward).
* group ``<shape>-captum`` (``method="riemann_trapezoid"``, LoKI HEAD's default): ``engine`` =
  ``attribute(semantics="captum")`` vs ``captum`` = ``captum_loop`` (Captum ``LayerIntegratedGradients``
  per layer).

Shapes: on a CPU-only machine a random fp32 Llama (8 layers, hidden 256, intermediate 688, 8 heads, 4 KV heads,
vocab 1000) and a 256-token prompt; the whole CPU file takes about a minute on 2 cores. On CUDA the
Llama-3.1-8B shapes with random weights (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads,
vocab 128256) in bf16 and a 512-token prompt. There, a reference whose full run would take more than
``MAX_REFERENCE_S`` seconds is timed on ``REFERENCE_LAYERS`` evenly spaced layers only and extrapolated
linearly to all layers; ``extra_info`` then says so (``extrapolated_from_layers``) and its
``per_sample_ms`` is the extrapolated figure, while pytest-benchmark's own columns are the subset's time.

``extra_info`` of every case: provider, semantics, method, steps, shape, dtype, device, ``per_sample_ms``
(median) and, for the references, ``speedup_of_engine`` (reference per-sample time / engine's, when the
engine case of the group ran first, which it does in file order). On CUDA also ``peak_mem_mib`` of one
untimed call (above the memory allocated before it).

Targets: CPU, engine >= 20x faster than ``paper`` (last_token) and >= 2x faster than ``captum`` (captum).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("pytest_benchmark")
transformers = pytest.importorskip("transformers")

from loki_kernels.kva import attribute  # noqa: E402
from loki_kernels.reference import captum_loop, paper_estimator  # noqa: E402

from benchmarks.device import CUDA, DEVICE, DEVICE_NAME, DTYPE  # noqa: E402
STEPS = 7
SEED = 0
MAX_REFERENCE_S = 60.0  # CUDA: a longer reference run is timed on a few layers and extrapolated
REFERENCE_LAYERS = 4
# (rounds, warmup rounds): the engine is fast; a CPU reference round is a few seconds.
ENGINE_ROUNDS = (10, 2) if CUDA else (5, 1)
REFERENCE_ROUNDS = (3, 1) if CUDA else (2, 0)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int


SHAPE = (
    Shape("llama3.1-8b-T512", 4096, 14336, 32, 32, 8, 128256, 512)
    if CUDA
    else Shape("llama-small-T256", 256, 688, 8, 8, 4, 1000, 256)
)

# semantics -> (method, reference provider)
GROUPS = {"last_token": ("riemann_left", "paper"), "captum": ("riemann_trapezoid", "captum")}
CASES = [(sem, prov) for sem, (_, ref) in GROUPS.items() for prov in ("engine", ref)]
_ENGINE_MS: dict[str, float] = {}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=SHAPE.vocab, hidden_size=SHAPE.hidden, intermediate_size=SHAPE.intermediate,
        num_hidden_layers=SHAPE.layers, num_attention_heads=SHAPE.heads, num_key_value_heads=SHAPE.kv_heads,
        max_position_embeddings=max(2048, SHAPE.seq), tie_word_embeddings=False,
    )
    with torch.device(DEVICE):  # random weights, initialised directly on the device
        model = transformers.LlamaForCausalLM._from_config(config, dtype=DTYPE)
    model.eval()
    ids = torch.randint(1, SHAPE.vocab, (1, SHAPE.seq), device=DEVICE)
    yield model, ids
    del model
    if CUDA:
        torch.cuda.empty_cache()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _call(model, ids, semantics: str, provider: str, layers=None):
    method = GROUPS[semantics][0]
    if provider == "engine":
        return lambda: attribute(model, ids, steps=STEPS, method=method, semantics=semantics)
    fn = paper_estimator if provider == "paper" else captum_loop
    return lambda: fn(model, ids, steps=STEPS, method=method, layers=layers)


def _peak_mib(fn) -> float:
    _sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize("semantics,provider", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_kva(benchmark, llama, semantics: str, provider: str):
    if provider == "captum":
        pytest.importorskip("captum")
    model, ids = llama
    layers, scale = None, 1.0
    if provider != "engine" and CUDA:
        # One layer, untimed, to see whether the whole reference fits the time budget.
        one = [SHAPE.layers // 2]
        _call(model, ids, semantics, provider, one)()
        _sync()
        start = time.perf_counter()
        _call(model, ids, semantics, provider, one)()
        _sync()
        if (time.perf_counter() - start) * SHAPE.layers * (sum(REFERENCE_ROUNDS) + 1) > MAX_REFERENCE_S:
            layers = [round(i * (SHAPE.layers - 1) / (REFERENCE_LAYERS - 1)) for i in range(REFERENCE_LAYERS)]
            scale = SHAPE.layers / len(layers)
    fn = _call(model, ids, semantics, provider, layers)

    fn()  # untimed: Triton compilation, allocator warm-up
    peak = _peak_mib(fn) if CUDA else None

    def run():
        fn()
        _sync()

    benchmark.group = f"{SHAPE.name}-{semantics}"
    benchmark.extra_info.update(
        provider=provider, semantics=semantics, method=GROUPS[semantics][0], steps=STEPS, model=SHAPE.name,
        hidden=SHAPE.hidden, intermediate=SHAPE.intermediate, layers=SHAPE.layers, seq=SHAPE.seq,
        dtype=str(DTYPE).removeprefix("torch."), device=DEVICE_NAME,
    )
    if layers is not None:
        benchmark.extra_info["extrapolated_from_layers"] = layers
    if peak is not None:
        benchmark.extra_info["peak_mem_mib"] = round(peak, 1)
    rounds, warmup = ENGINE_ROUNDS if provider == "engine" else REFERENCE_ROUNDS
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        ms = benchmark.stats.stats.median * 1e3 * scale
        benchmark.extra_info["per_sample_ms"] = round(ms, 3)
        if provider == "engine":
            _ENGINE_MS[semantics] = ms
        elif semantics in _ENGINE_MS:
            benchmark.extra_info["speedup_of_engine"] = round(ms / _ENGINE_MS[semantics], 2)
