#!/usr/bin/env bash
# Build the documentation strictly: draw the pictures with the library (docs/make_pictures.py), then
# `mkdocs build --strict` (mkdocstrings reads the docstrings). Sets up .venv itself; output in site/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/mkdocs ]; then
  bash scripts/setup-env.sh "face,test,docs"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 NO_MKDOCS_2_WARNING=1
.venv/bin/python docs/make_pictures.py
.venv/bin/python -m mkdocs build --strict --quiet --site-dir "${SITE_DIR:-site}"
echo "docs: built ${SITE_DIR:-site}/ (strict)"
