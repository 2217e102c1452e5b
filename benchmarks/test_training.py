"""End-to-end training-step benchmarks: ``pytest benchmarks/test_training.py --benchmark-only``.

One timed round is one full optimizer step of a randomly initialised Qwen2-architecture causal LM (built
from a ``Qwen2Config``, nothing downloaded): forward with ``labels`` (the model's own causal-LM loss),
``loss.backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``. Providers:

* ``loki``: ``patch_model(model, rows)`` with q = 10%: a random ``int(0.1 * hidden)`` rows of every
  layer's ``down_proj`` train, everything else is frozen; AdamW over the trainable parameters only.
  ``backend="auto"``: the Triton kernels on CUDA, the PyTorch path on CPU.
* ``full``: full fine-tuning, AdamW over every parameter.
* ``lora``: peft ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)`` on q/k/v/o/gate/up/down_proj via
  ``get_peft_model``; AdamW over the trainable (adapter) parameters.

Shapes: on CUDA the Qwen2.5-0.5B config (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads,
vocab 151936, tied embeddings) in bf16, batch 4 x 1024 tokens; on a CPU-only machine a small fp32 model
(hidden 256, intermediate 688, 4 layers, 4 heads, 2 KV heads, vocab 1000), batch 2 x 256 tokens, kept
short enough for CI (the whole CPU file takes ~15 s on 2 idle cores).

On CUDA every parameter is bf16 and AdamW keeps its state in bf16 too (``model.to(torch.bfloat16)``, no
fp32 master weights). That is fine for a speed benchmark, not for real training. The LoRA adapters are
bf16 as well (``get_peft_model(..., autocast_adapter_dtype=False)``; peft would otherwise upcast them to
fp32), so all three providers train parameters of the same dtype with the same optimizer.

Each provider's model, optimizer and batch are built outside the timed region (same seed, so the same
weights, rows and tokens for every provider), then two untimed steps run so that AdamW's state exists
and the Triton kernels are autotuned before anything is timed. The one shape is one benchmark group, so
the providers sit side by side. ``extra_info`` holds the provider, tokens per step, ``tokens_per_s``
(from the median), trainable and total parameters (``count_parameters``), the optimizer state size and,
on CUDA, ``peak_mem_mib``: ``torch.cuda.max_memory_allocated()`` over one untimed step after
``reset_peak_memory_stats()``, an absolute peak that includes the model, the optimizer state, the
gradients and the activations.

Targets (CUDA, Qwen2.5-0.5B, bf16, medians of this group):

* the LoKI step reaches >= 1.3x the tokens/s of full fine-tuning, and at least LoRA r=16's tokens/s;
* LoKI's peak memory is below LoRA's peak plus q * |W_down| of optimizer state (AdamW's two moments
  for the trainable rows: 2 * q * sum over layers of hidden * intermediate elements).
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark")
transformers = pytest.importorskip("transformers")

from loki_kernels import count_parameters, patch_model  # noqa: E402
from loki_kernels.backend import resolve_backend  # noqa: E402

from benchmarks.device import CUDA, DEVICE, DEVICE_NAME, DTYPE  # noqa: E402
HAS_PEFT = importlib.util.find_spec("peft") is not None

# A CUDA step at the 0.5B shape is tens of ms; a CPU step of the small model is ~50-90 ms on 2 idle cores.
ROUNDS, WARMUP_ROUNDS = (20, 3) if CUDA else (10, 2)
UNTIMED_STEPS = 2  # before anything is timed: AdamW state exists, Triton autotuning is done
SEED = 0
Q = 0.1
LR = 1e-4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    model: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def active(self) -> int:
        return int(Q * self.hidden)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.batch}x{self.seq}"

    def config(self):
        return transformers.Qwen2Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq, 2048),
            tie_word_embeddings=self.tie,
            use_cache=False,  # training: no KV cache is built in forward
        )


CUDA_SHAPES = [Shape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, True, 4, 1024)]
CPU_SHAPES = [Shape("small", 256, 688, 4, 4, 2, 1000, True, 2, 256)]
SHAPES = CUDA_SHAPES if CUDA else CPU_SHAPES

PROVIDERS = [
    "loki",
    "full",
    pytest.param("lora", marks=pytest.mark.skipif(not HAS_PEFT, reason="the lora provider needs peft")),
]


# --------------------------------------------------------------------------------------------- building
def _build(shape: Shape, provider: str):
    """``(model, optimizer, step)``: ``step`` runs one full optimizer step (no sync)."""
    torch.manual_seed(SEED)  # same weights, rows and tokens for every provider
    with torch.device(DEVICE):  # initialise on the device: the 0.5B model's CPU init alone takes seconds
        model = transformers.Qwen2ForCausalLM(shape.config())
    model.to(DTYPE).train()
    # Rows and tokens are drawn on the CPU generator, so they do not depend on the device.
    rows = [torch.randperm(shape.hidden)[: shape.active].sort().values.tolist() for _ in range(shape.layers)]
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq)).to(DEVICE)

    if provider == "loki":
        patch_model(model, rows)  # freeze_rest=True: only the active down_proj rows train
    elif provider == "full":
        pass
    elif provider == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        # bf16 adapters, like the other providers' parameters (peft upcasts them to fp32 by default).
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
        model.train()
    else:
        raise ValueError(provider)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _peak_mib(step: Callable[[], None]) -> float:
    """Absolute peak CUDA memory of one untimed step (model, optimizer state, gradients, activations)."""
    _sync()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync()
    return torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_training_step(benchmark, shape: Shape, provider: str):
    gc.collect()  # the previous provider's model and optimizer must not count towards this one's peak
    if CUDA:
        torch.cuda.empty_cache()
    model, optimizer, step = _build(shape, provider)
    params = count_parameters(model)

    for _ in range(UNTIMED_STEPS):
        step()
    _sync()
    peak_mib = _peak_mib(step) if CUDA else None
    steady_mib = torch.cuda.memory_allocated() / 2**20 if CUDA else None  # model + optimizer state

    def run():
        step()
        _sync()  # time the kernels, not their launch

    benchmark.group = f"train-step-{shape.id}"  # must be set before pedantic() creates the stats
    benchmark.extra_info.update(
        provider=provider,
        model=shape.model,
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        layers=shape.layers,
        vocab=shape.vocab,
        batch=shape.batch,
        seq=shape.seq,
        tokens_per_step=shape.tokens,
        q=Q if provider == "loki" else None,
        active_rows=shape.active if provider == "loki" else None,
        backend=resolve_backend("auto", DEVICE) if provider == "loki" else None,
        lora_r=16 if provider == "lora" else None,
        trainable_params=params.trainable,
        total_params=params.total,
        trainable_percent=round(params.percent, 4),
        optimizer_state_mib=round(_optimizer_state_bytes(optimizer) / 2**20, 2),
        dtype=str(DTYPE).removeprefix("torch."),
        attn_implementation=getattr(getattr(model, "config", None), "_attn_implementation", None),
        device=DEVICE_NAME,
    )
    if CUDA:
        benchmark.extra_info["peak_mem_mib"] = round(peak_mib, 1)
        benchmark.extra_info["steady_mem_mib"] = round(steady_mib, 1)

    benchmark.pedantic(run, setup=_sync, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = round(median * 1e3, 3)
        benchmark.extra_info["tokens_per_s"] = round(shape.tokens / median, 1)
