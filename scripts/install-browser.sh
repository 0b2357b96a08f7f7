#!/usr/bin/env bash
# Install Debian's Chromium for the demo's browser test (tests/test_demo.py), when it is missing.
# Needs root and apt-get; elsewhere it says why and exits 0, and the browser test is skipped with that reason.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser.sh: no chromium and no root apt-get to install it; the browser test will be skipped." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
