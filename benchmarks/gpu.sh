#!/usr/bin/env bash
# One call on a machine with a GPU: the CUDA tests, the ahead-of-time compile check, then the benchmarks
# with JSON output.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]        # default: benchmarks/results/run-<date>
#
# Writes, in RESULTS_DIR: env.txt, tests.log, aot.txt, split_linear.json, training.json, kva.json, bench.log.
# Each step has its own time limit (TESTS_S, AOT_S, SPLIT_S, TRAIN_S, KVA_S seconds; 0 skips the step), so the
# whole script stays under ~10 minutes and a slow step cannot take the others' JSON with it. TESTS names the
# test files (default: those that run on the GPU; the CLI and file-format tests only repeat CPU work there).
# No network is needed: the package is put on PYTHONPATH; tests whose optional dependencies are missing there
# skip themselves. Then: python benchmarks/choose_backends.py RESULTS_DIR/split_linear.json (see README).
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/run-$(date -u +%Y-%m-%d)}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$RESULTS/env.txt"

step() {  # step SECONDS NAME COMMAND...: run with a limit, log, never stop the script
    local limit=$1 name=$2; shift 2
    if [ "$limit" = 0 ]; then echo "== $name: skipped"; return; fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: rc $? in $((SECONDS - start))s"
}

TESTS=${TESTS:-"tests/ops tests/test_patching.py tests/test_kva.py tests/test_lora.py tests/loki/test_loki_linear.py"}
# shellcheck disable=SC2086
step "${TESTS_S:-210}" tests $PY -m pytest $TESTS -q --maxfail=40 -p no:cacheprovider -n 8 2>&1 \
    | grep -v -e PytestBenchmarkWarning -e "warner(" | tee "$RESULTS/tests.log"
step "${AOT_S:-60}" aot $PY -m loki_kernels.ops.aot --full 2>&1 | tee "$RESULTS/aot.txt" | tail -3
{
    step "${SPLIT_S:-150}" split_linear $PY -m pytest benchmarks/test_split_linear.py --benchmark-only -q \
        -p no:cacheprovider --benchmark-json="$RESULTS/split_linear.json" --benchmark-columns=median,rounds
    step "${TRAIN_S:-50}" training $PY -m pytest benchmarks/test_training.py --benchmark-only -q \
        -p no:cacheprovider --benchmark-json="$RESULTS/training.json" --benchmark-columns=median,rounds
    step "${KVA_S:-120}" kva $PY -m pytest benchmarks/test_kva.py --benchmark-only -q \
        -p no:cacheprovider --benchmark-json="$RESULTS/kva.json" --benchmark-columns=median,rounds
} 2>&1 | tee "$RESULTS/bench.log"
