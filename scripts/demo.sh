#!/usr/bin/env bash
# The main job, offline, on the built-in tiny default: tiny SDXL + tiny HyperLoRA -> identity -> image.
# Prints how the identity changes the image and a timing table of one un-warmed run (shares of the total too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "face"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
.venv/bin/python examples/tiny_demo.py "$@"
