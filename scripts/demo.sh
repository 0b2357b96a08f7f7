#!/usr/bin/env bash
# The main job, offline, on the built-in tiny default: tiny SDXL + tiny HyperLoRA -> identity -> image.
# Prints how the identity changes the image and a timing table of one un-warmed run (shares of the total too).
# Arguments go to examples/tiny_demo.py (--output-dir, --steps, --size, --seed). DEMO_PYTHON=/path/to/python runs
# with an interpreter that already has this package instead of setting up .venv (tests/test_cli_readme.py).
# Other libraries' notices (transformers' "requires torchvision") are hidden: TRANSFORMERS_VERBOSITY=warning shows them.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${DEMO_PYTHON:-}"
if [ -z "$python" ]; then
  bash scripts/setup-env.sh "face"
  python=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
"$python" examples/tiny_demo.py "$@"
