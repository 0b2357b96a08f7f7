#!/usr/bin/env bash
# The web demo (Gradio): sets up .venv with the demo extra, then serves http://127.0.0.1:7860.
# No arguments: offline on the built-in tiny default. Arguments go to `diffusers-hyperlora demo` (see docs/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "demo"
export GRADIO_ANALYTICS_ENABLED=False
.venv/bin/diffusers-hyperlora demo "$@"
