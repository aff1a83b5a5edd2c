#!/usr/bin/env bash
# Build a THROWAWAY venv with LLaMA-Factory + gradguard and run the LLaMA-Factory tests in it.
#
#   ./scripts/llamafactory_env.sh                 # venv in /work/venvs/llamafactory (VENV=... to move it)
#   ./scripts/llamafactory_env.sh -k healthy      # extra args go to pytest
#   SKIP_TESTS=1 ./scripts/llamafactory_env.sh    # only build the venv
#
# Never part of CI's default install: LLaMA-Factory pins its own transformers / peft / trl / datasets, which
# would fight the versions the rest of the suite runs against.
#
# Why the order matters: `pip install llamafactory` resolves `torch` from PyPI, whose Linux wheel is the CUDA
# build (several GB of nvidia-* wheels). Installing the CPU torch first and then holding it with a constraint
# file keeps pip from replacing it; LLaMA-Factory's own pins on transformers/peft are left to win.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${VENV:-/work/venvs/llamafactory}"
PY="${PYTHON:-python3}"
TORCH="${TORCH_VERSION:-2.13.0}"
LLAMAFACTORY="${LLAMAFACTORY_VERSION:-0.9.5}"

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH" >"$CONSTRAINTS"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch==$TORCH"
fi
if ! "$VENV/bin/pip" show --quiet llamafactory >/dev/null 2>&1; then
  "$VENV/bin/pip" install --quiet "llamafactory==$LLAMAFACTORY" -c "$CONSTRAINTS"
fi
# LLaMA-Factory requires torchvision and torchaudio, and PyPI's Linux wheels of both are CUDA builds: against the
# CPU torch they fail at import ("operator torchvision::nms does not exist", "libc10_cuda.so: cannot open shared
# object file"), and transformers imports torchvision whenever it is installed. The CPU builds live only on
# PyTorch's own index, which this set-up does not use. So: torchvision goes (transformers then uses its PIL image
# processors), and torchaudio - imported at the top of llamafactory/data/mm_plugin.py but used only to load and
# resample audio - is replaced by a stub package that raises if anything actually calls it. Our tests feed images
# and text only.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio 2>/dev/null || true
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$SITE/torchaudio"
cat >"$SITE/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio in gradguard's throwaway LLaMA-Factory venv (see scripts/llamafactory_env.sh).

PyPI's torchaudio wheel needs CUDA torch; this venv has CPU torch. LLaMA-Factory imports torchaudio at module
level but only calls it for audio inputs, which gradguard's tests never use.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is a stub in this venv (CPU torch; audio is not supported)")
PY
# gradguard itself, editable; --no-deps so its own ranges cannot move LLaMA-Factory's pins (torch, transformers,
# peft, numpy are already there; rich comes with LLaMA-Factory's deps or below). pytest for the tests.
"$VENV/bin/pip" install --quiet --no-deps -e "$REPO"
"$VENV/bin/pip" install --quiet "rich>=13,<16" "pytest>=8,<10" -c "$CONSTRAINTS"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
print(" ".join(f"{p}=={md.version(p)}" for p in ("llamafactory", "torch", "transformers", "peft", "trl", "datasets")))
EOF

if [ -z "${SKIP_TESTS:-}" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # Offline: the tests build their model, tokenizer, processor and dataset locally; nothing may reach a hub.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  exec "$VENV/bin/python" -m pytest tests/test_llamafactory.py -p no:cacheprovider "$@"
fi
