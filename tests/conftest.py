"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; the variable must be
set before triton is first imported, so it is set here, before anything imports loki_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64, on the CPU (``out`` may live on the GPU, ``ref`` is built on the CPU)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# Relative-error bounds against a float64 reference, per operand dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


# Fresh random data on every run; LOKI_TEST_SEED=<n> replays a run (the seed is in the report header).
SEED = int(os.environ.get("LOKI_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    return f"loki-kernels: LOKI_TEST_SEED={SEED}, device={DEVICE}, TRITON_INTERPRET={interpret}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)
    yield


@pytest.fixture(params=["llama", "qwen2"])
def base_dir(request, tmp_path):
    """A tiny random model saved to ``tmp_path / "base"``, and a position JSON for it in ``tmp_path / "10.json"``."""
    import json

    from tests.tiny_models import random_rows, tiny_model

    model = tiny_model(request.param)
    model.save_pretrained(tmp_path / "base")
    rows = random_rows()
    (tmp_path / "10.json").write_text(json.dumps(rows))
    return tmp_path, model, rows
