#!/usr/bin/env bash
# One-shot GPU check, run on the device machine from the repo root:
#
#     OUT=/some/folder bash scripts/gpu_check.sh
#
# 1. the machine: nvidia-smi -L, Python / torch / CUDA / transformers / peft / accelerate versions, and whether
#    gradguard imports (from src/, not installed: PYTHONPATH)            -> $OUT/env.log
# 2. tests/test_gpu.py on CUDA (GRADGUARD_TEST_DEVICE=cuda: no GPU is a failure, not a skip)
#                                                                        -> $OUT/gpu-tests.log
# 3. the CUDA benchmark, bounded (--quick, --budget-s)                   -> $OUT/cuda.json, cuda.md, bench.log
#
# Each step has its own timeout, so one hang cannot eat the others' time; a failed step does not stop the next.
# Worst case (every step hitting its timeout) under 7 minutes; expected 3-5.
# Exit status: the number of steps that failed (0: all passed).
#
# Simulation without a GPU (checks the script, not the GPU): GG_GPU_CHECK_SIMULATE=cpu runs the same steps on
# CPU with tiny benchmark settings, e.g.  OUT=/tmp/gpuout PYTHON=.venv/bin/python GG_GPU_CHECK_SIMULATE=cpu bash scripts/gpu_check.sh
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 99
OUT="${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SIMULATE="${GG_GPU_CHECK_SIMULATE:-}"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # gradguard from this checkout, not installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no internet there: fail fast, never wait
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled MPLBACKEND=Agg

T0=$(date +%s)
FAILED=0
SUMMARY=()

step() {  # step NAME LOGFILE TIMEOUT_S COMMAND...: run with a timeout, tee into LOGFILE, record the outcome
    local name="$1" log="$2" limit="$3"
    shift 3
    local start rc
    start=$(date +%s)
    echo "=== $name (timeout ${limit}s) $(date -u +%H:%M:%S) UTC ===" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    local took=$(($(date +%s) - start))
    local verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED (exit $rc)"
    fi
    [ "$verdict" = "ok" ] || FAILED=$((FAILED + 1))
    echo "=== $name: $verdict in ${took}s ===" | tee -a "$log"
    SUMMARY+=("$name: $verdict in ${took}s")
}

# -- 1. the machine ---------------------------------------------------------------------------------------
: >"$OUT/env.log"
if command -v nvidia-smi >/dev/null 2>&1; then
    step "nvidia-smi" "$OUT/env.log" 20 bash -c 'nvidia-smi -L && { nvidia-smi \
        --query-gpu=name,driver_version,memory.total,memory.used,mig.mode.current --format=csv || true; }'
else
    echo "nvidia-smi: not found" | tee -a "$OUT/env.log"
fi
step "versions and imports" "$OUT/env.log" 60 "$PY" - <<'EOF'
import importlib.metadata
import platform
import sys

import torch

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
          "| count", torch.cuda.device_count(), "| bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "accelerate", "rich", "numpy", "pytest", "pytest-timeout", "jsonschema", "trl"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
import gradguard
import gradguard.testing.models  # every tiny model class of this transformers version
from gradguard import GradGuard, Guard  # noqa: F401

print("gradguard", gradguard.__version__, "from", gradguard.__file__)
EOF

# -- 2. the GPU tests -------------------------------------------------------------------------------------
: >"$OUT/gpu-tests.log"
PYTEST_ARGS=(-q -p no:cacheprovider -rA --durations=10)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST_ARGS+=(--timeout=90)  # per test: a hang fails that test, not the whole step
fi
TEST_DEVICE=cuda
[ "$SIMULATE" = "cpu" ] && TEST_DEVICE=cpu
# CUBLAS_WORKSPACE_CONFIG: cuBLAS's deterministic workspace setting (the bitwise test compares two runs)
step "pytest tests/test_gpu.py ($TEST_DEVICE)" "$OUT/gpu-tests.log" 130 \
    env GRADGUARD_TEST_DEVICE="$TEST_DEVICE" CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_gpu.py

# -- 3. the CUDA benchmark --------------------------------------------------------------------------------
: >"$OUT/bench.log"
if [ "$SIMULATE" = "cpu" ]; then
    BENCH_ARGS=(--device cpu --smoke --workloads llama_full,llama_lora --h2h-steps 2 --h2h-repeats 1 --memory-reps 1)
else
    # side by side: 7 arms x (5 + 30) steps on llama_full and llama_lora; head-to-head in 2 fresh processes;
    # host syncs with the sync-debug mode; peak CUDA memory (3 processes); the meta-device audit.
    BENCH_ARGS=(--device cuda --quick --warmup 5 --steps 30 --h2h-steps 30 --h2h-repeats 2)
fi
step "benchmark" "$OUT/bench.log" 200 \
    "$PY" benchmarks/run.py "${BENCH_ARGS[@]}" --no-wandb --budget-s 130 --out "$OUT/cuda.json" --doc "$OUT/cuda.md"

# -- summary ----------------------------------------------------------------------------------------------
{
    echo "gpu_check: $((${#SUMMARY[@]} - FAILED)) of ${#SUMMARY[@]} steps ok in $(($(date +%s) - T0))s"
    printf '  %s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
ls -la "$OUT"
exit "$FAILED"
