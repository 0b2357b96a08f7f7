#!/usr/bin/env bash
# Run the test suite offline on tiny models built in code. Sets up .venv itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "face,test,train,docs,demo"
bash scripts/install-browser.sh  # Chromium for the demo's browser test
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
.venv/bin/python -m ruff check .
# The full run (no arguments, as in CI) also builds the docs strictly, pictures included (about 30 s).
if [ $# -eq 0 ]; then
  bash scripts/docs.sh
fi
.venv/bin/python -m pytest -q "$@"
