#!/usr/bin/env bash
# Set up tunelab in ./.venv: PyTorch first (the CPU build on machines without an NVIDIA GPU, so pip
# never pulls several GB of CUDA wheels), then tunelab with its dependencies. Safe to run again.
#   scripts/setup.sh          the library and the `tunelab` command
#   scripts/setup.sh --dev    plus the test and benchmark tools (pytest, ruff, TRL) and the experiment
#                             trackers (TensorBoard, W&B, MLflow client: about 50 MB to download, 210 MB installed)
# TORCH_SPEC overrides the PyTorch requirement, e.g. TORCH_SPEC="torch==2.13.0+cpu".
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,bench,track]"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.4"
  else
    spec="torch==2.13.0"
  fi
  echo "installing $spec ..."
  "${pip[@]}" install "$spec"
fi

# Already-installed requirements are left alone; torch's floor in pyproject never replaces the build above.
"${pip[@]}" install -e ".${extras}"
.venv/bin/python -c "import tunelab, torch; print(f'tunelab {tunelab.__version__} ready (torch {torch.__version__})')"
