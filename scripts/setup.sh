#!/usr/bin/env bash
# Set up .venv with everything gradguard needs to run its demo and tests, from a fresh clone.
# Installs the CPU build of torch first (pip would otherwise pull a multi-GB CUDA build for the range
# in pyproject.toml), then gradguard itself in editable mode with its dev extras.
#
# --no-compile: pip would byte-compile every file of torch and transformers at install (half the install's
# time here); Python compiles the modules a run imports, once, on first import.
# The install is skipped when pyproject.toml has not changed since the last one (.venv/.setup-stamp): the
# install is editable, so source changes need none, and ./scripts/demo.sh then starts at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --no-compile "torch==2.13.0"
fi
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c "import gradguard" 2>/dev/null; then
  .venv/bin/pip install --quiet --no-compile -e ".[dev]"
  echo "$stamp" >.venv/.setup-stamp
fi
