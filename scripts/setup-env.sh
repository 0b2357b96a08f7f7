#!/usr/bin/env bash
# Create .venv (once) and install the project with the extras given as arguments, e.g. `face,test`.
# torch is installed first, pinned to 2.13.0, in the build that fits the machine:
# - no NVIDIA GPU (no `nvidia-smi`): exactly the CPU build, `torch==2.13.0+cpu`, so pip never pulls a multi-GB CUDA
#   build. It comes from the indexes pip is configured with (a local wheel cache, a CPU mirror) or else from PyTorch's
#   CPU wheel index ($TORCH_CPU_INDEX).
# - an NVIDIA GPU: `torch==2.13.0` from the package index, whose Linux wheels are CUDA builds. For another CUDA
#   version, install torch yourself into .venv first (docs/quickstart.md): a torch already there is kept.
# A second argument `--torch-only` stops after torch (scripts/ci-floor.sh installs the project itself).
# Environment: VENV (default .venv), TORCH_CPU_INDEX (default PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
torch_version="2.13.0"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch==$torch_version"
  elif ! "${pip[@]}" "torch==$torch_version+cpu" 2>/dev/null; then
    "${pip[@]}" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==$torch_version+cpu"
  fi
fi
if [ "${2:-}" != "--torch-only" ]; then
  "${pip[@]}" -e ".${extras:+[$extras]}"
fi
