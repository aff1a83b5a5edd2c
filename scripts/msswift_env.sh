#!/usr/bin/env bash
# Build a THROWAWAY venv with ms-swift + gradguard and run the ms-swift tests in it.
#
#   ./scripts/msswift_env.sh                 # venv in /work/venvs/msswift (VENV=... to move it)
#   ./scripts/msswift_env.sh -k healthy      # extra args go to pytest
#   SKIP_TESTS=1 ./scripts/msswift_env.sh    # only build the venv
#
# Never part of CI's default install: ms-swift pins its own transformers / peft / trl.
# As for LLaMA-Factory (scripts/llamafactory_env.sh): the CPU torch goes in first and a constraint file holds it,
# or pip would pull PyPI's CUDA build (several GB). ms-swift 4.6 does not require torchvision/torchaudio.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${VENV:-/work/venvs/msswift}"
PY="${PYTHON:-python3}"
TORCH="${TORCH_VERSION:-2.13.0}"
MSSWIFT="${MSSWIFT_VERSION:-4.6.0}"

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH" >"$CONSTRAINTS"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch==$TORCH"
fi
if ! "$VENV/bin/pip" show --quiet ms-swift >/dev/null 2>&1; then
  "$VENV/bin/pip" install --quiet "ms-swift==$MSSWIFT" -c "$CONSTRAINTS"
fi
# gradguard itself, editable and without its dependency ranges (ms-swift's pins stay); rich and pytest for the tests.
"$VENV/bin/pip" install --quiet --no-deps -e "$REPO"
"$VENV/bin/pip" install --quiet "rich>=13,<16" "pytest>=8,<10" -c "$CONSTRAINTS"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print(" ".join(f"{p}=={md.version(p)}" for p in ("ms-swift", "torch", "transformers", "peft", "trl")))
PY

if [ -z "${SKIP_TESTS:-}" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # Offline: the tests build their model, tokenizer, processor and dataset locally; nothing may reach a hub.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1
  exec "$VENV/bin/python" -m pytest tests/test_msswift.py -p no:cacheprovider "$@"
fi
