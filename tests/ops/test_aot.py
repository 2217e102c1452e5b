"""The ahead-of-time compile check (``loki_kernels.ops.aot``): every Triton kernel, every config its launcher
may pick, compiled for sm_80 and sm_90 without a GPU, must compile without spills, fit in shared memory and
fetch its contiguous GEMM operands with 16-byte loads. It runs in a process of its own (the tests run the
kernels under ``TRITON_INTERPRET=1``, which replaces the autotune configs); about 40 s on 2 cores from a cold
Triton cache.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from loki_kernels.ops.aot import _count, main_loop  # noqa: E402

KERNELS = {"split_linear.forward", "split_linear.grad_input", "split_linear.grad_weight", "kva.interpolate",
           "kva.weighted_grad_sum", "covariance.update"}


def test_every_kernel_and_config_compiles_well_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "loki_kernels.ops.aot", "--full", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)  # the table: pytest -s shows it
    assert out.exists(), proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    failed = [f"{r['kernel']} {r['config']} sm_{r['target']}: {r['problems']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert {r["kernel"].split("/")[0] for r in rows} == KERNELS
    assert {r["target"] for r in rows} == {80, 90}
    assert {r["kernel"].split("/")[1] for r in rows} >= {"bfloat16", "float16", "float32"}
    gemm = [r for r in rows if r["kernel"].startswith("split_linear")]
    assert all(r["mma"] in ("mma", "wgmma") for r in gemm)  # tensor cores, never plain FMAs
    # Hopper's wgmma for the dense-row kernels (grad_weight's 32-row tile is below wgmma's 64 and uses mma).
    assert all(r["mma"] == "wgmma" for r in gemm if r["target"] == 90 and "grad_weight" not in r["kernel"])
    # The check sees what it is meant to see: grad_weight gathers dY's columns element by element.
    assert all(r["narrow_loads"] > 0 for r in gemm if r["kernel"].startswith("split_linear.grad_weight"))
    assert all(r["wide_loads"] >= r["expected_wide"] > 0 for r in gemm)
    # The covariance kernel: tensor cores (wgmma on Hopper), both operand tiles by 16-byte copies, at every
    # d including the token-split (atomic) launch at d = 2048; the pad mask is its only narrow load.
    cov = [r for r in rows if r["kernel"].startswith("covariance.update")]
    assert {r["kernel"].split("/")[2] for r in cov} >= {"d2048", "d4096", "d8192", "d11008", "d4096-nomask"}
    assert all(r["mma"] == ("wgmma" if r["target"] == 90 else "mma") for r in cov)
    assert all(r["wide_loads"] >= r["expected_wide"] > 0 for r in cov)
    assert all((r["narrow_loads"] > 0) != r["kernel"].endswith("nomask") for r in cov)


PTX = """
\tcp.async.cg.shared.global [ %r26 + 0 ], [ %rd32 + 0 ], 0x10, %r27;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
\tcp.async.cg.shared.global [ %r28 + 0 ], [ %rd33 + 0 ], 0x10, %r29;
\t@%p2 cp.async.ca.shared.global [ %r30 + 0 ], [ %rd34 + 0 ], 0x4, %r31;
\t@%p3 cp.async.ca.shared.global [ %r30 + 0 ], [ %rd34 + 0 ], 0x8, %r31;
\t@%p1 ld.global.b16 { %rs1 }, [ %rd25 + 0 ];
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd26 + 0 ];
\tld.global.b64 { %rd23 }, [ %rd25 + 0 ];
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
\t@%p27 bra \t$L__BB0_2;
$L__BB0_3:
\tld.global.b16 { %rs2 }, [ %rd27 + 0 ];
"""


def test_loads_are_counted_in_the_main_loop_only():
    body = main_loop(PTX)
    assert body[0].startswith("$L__BB0_2") and "bra" in body[-1]
    wide, narrow = _count(body)
    assert (wide, narrow) == (2, 2)  # 16-byte copy + v4 load; 4-byte copy + 2-byte load (8-byte index: neither)
