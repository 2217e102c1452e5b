"""Benchmark setup (pytest-benchmark 5.x).

Run with ``pytest benchmarks --benchmark-only`` (see ``benchmarks/README.md``). The default ``pytest`` run
collects only ``tests/`` (``testpaths`` in ``pyproject.toml``), so nothing here runs there.

Unlike ``tests/conftest.py`` this file does *not* set ``TRITON_INTERPRET``: the benchmarks time real
kernels, so the Triton provider runs on CUDA only and is skipped on a CPU-only machine.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform

import pytest
import torch


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


@pytest.hookimpl(optionalhook=True)  # only called when pytest-benchmark is installed
def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark records no GPU fields on its own: add them, plus the library versions."""
    import loki_kernels

    machine_info["torch_version"] = torch.__version__
    machine_info["triton_version"] = _triton_version()
    machine_info["loki_kernels_version"] = loki_kernels.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    machine_info["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        machine_info["gpu_name"] = props.name
        machine_info["gpu_count"] = torch.cuda.device_count()
        machine_info["gpu_capability"] = f"{props.major}.{props.minor}"
        machine_info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        machine_info["gpu_sm_count"] = props.multi_processor_count
    else:
        machine_info["gpu_name"] = None


def pytest_report_header(config):
    if torch.cuda.is_available():
        where = f"cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})"
    else:
        where = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"loki-kernels benchmarks: device={where}, torch={torch.__version__}, triton={_triton_version()}"


@pytest.fixture(autouse=True)
def _release_memory():
    """Each test builds its own layer and inputs; free them before the next one is measured."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
