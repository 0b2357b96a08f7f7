#!/usr/bin/env bash
# The GPU check, in one command (about 5 minutes on one CUDA GPU, 8 at most):
#   1. the CUDA paths' tests: `pytest -m cuda` (tests/test_cuda.py: pinned-memory bank streaming with
#      offload_bank=True, 16-bit switches and generation, the compiled 16-bit kernel on the GPU, per-sample
#      batches, fused switching, model CPU offload);
#   2. benchmarks/run.py's GPU table (switch vs the bandwidth bound, naive path, diffusers hotswap, fused
#      overhead, photo -> weights, per-sample batch, low-VRAM streamed mix and peak memory), written to
#      docs/benchmarks-gpu.md (+ .json).
# Without a CUDA GPU, or with --dry-run, it is a dry run (CI): the CUDA tests are collected and skip, and the
# benchmark runs every section on the tests' tiny models, written to a temporary file.
# Uses .venv (scripts/setup-env.sh; on a GPU machine that installs the CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  bash scripts/setup-env.sh "face,test,train"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
dry=0
if [ "${1:-}" = "--dry-run" ] || ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  dry=1
fi
start=$SECONDS
if [ "$dry" = 1 ]; then
  echo "gpu-check: dry run (no CUDA GPU, or --dry-run)"
  "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  out="$(mktemp -d "${TMPDIR:-/tmp}/hyperlora-gpu-check.XXXXXX")"
  trap 'rm -rf "$out"' EXIT
  timeout 900 "$python" benchmarks/run.py --dry-run --sections switch,serving,generation,photo \
    --output "$out/benchmarks-gpu.md" >"$out/run.log" 2>&1 || { tail -50 "$out/run.log"; exit 1; }
  for kind in switch naive hotswap cached serving photo_total offload; do  # every row of the GPU table ran
    grep -q "\"kind\": \"$kind\"" "$out/benchmarks-gpu.json" || { echo "gpu-check: no $kind row"; exit 1; }
  done
  echo "gpu-check: dry run passed in $((SECONDS - start)) s (benchmark table: every section ran at tiny sizes)"
else
  "$python" -c "import torch; print('gpu-check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
  timeout 240 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  timeout 360 "$python" benchmarks/run.py --repeats 5 --output docs/benchmarks-gpu.md
  echo "gpu-check: passed in $((SECONDS - start)) s; table in docs/benchmarks-gpu.md"
fi
