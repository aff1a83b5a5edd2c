#!/usr/bin/env bash
# Set up .venv with everything gradguard needs to run its demo and tests, from a fresh clone.
# Installs the CPU build of torch first (pip would otherwise pull a multi-GB CUDA build for the range
# in pyproject.toml), then gradguard itself in editable mode with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
