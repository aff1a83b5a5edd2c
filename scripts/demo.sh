#!/usr/bin/env bash
# Set up (if needed) and run the demo: the MiniCPM-V `loss 0.0, grad_norm nan` story, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if .venv/bin/gradguard demo --help >/dev/null 2>&1; then
  exec .venv/bin/gradguard demo "$@"
fi
exec .venv/bin/python examples/audit_seed.py
