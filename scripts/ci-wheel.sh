#!/usr/bin/env bash
# CI's package job: the wheel as users install it, not the editable source tree.
# Builds the sdist and the wheel (from a clean copy of the tree), checks both with `twine check --strict`, installs
# the wheel into a fresh virtual environment (torch first, as scripts/setup-env.sh does), then adds the extras one
# at a time: after the core install and after each extra, `pip check` and tests/test_packaging.py run against that
# environment (the tiny main job, the CLI's offline commands, what each extra brings). Uses .venv for pytest and
# the build (scripts/setup-env.sh "test"). Everything it makes lives in a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${CI_PYTHON:-.venv/bin/python}"  # runs the build, twine and pytest
if [ -z "${CI_PYTHON:-}" ] && ! .venv/bin/python -c "import build, twine" 2>/dev/null; then
  bash scripts/setup-env.sh "face,test"
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/hyperlora-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' name; do
  if [ -f "$name" ] && [ ! -L "$name" ]; then
    mkdir -p "$work/tree/$(dirname "$name")" && cp "$name" "$work/tree/$name"
  fi
done
"$python" -m build --outdir "$work/dist" "$work/tree" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$python" -m twine check --strict "$work"/dist/*
wheel="$(ls "$work"/dist/*.whl)"
echo "package job: built $(cd "$work/dist" && ls | tr '\n' ' ')"

# The wheel's environment sees nothing of this tree or of the caller's PYTHONPATH.
VENV="$work/venv" env -u PYTHONPATH bash scripts/setup-env.sh "" --torch-only
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
installed=""
for extra in "" face train demo docs; do
  env -u PYTHONPATH "$work/venv/bin/python" -m pip install -q "$wheel${extra:+[$extra]}"
  env -u PYTHONPATH "$work/venv/bin/python" -m pip check
  installed="${installed:+$installed,}$extra"
  echo "package job: wheel installed with extras [${installed#,}]"
  case "$extra" in  # the core job and commands first and last (all extras in); each extra's own test after it
    "" | docs) tests="installed" ;;
    *) tests="installed_${extra}_extra" ;;
  esac
  HYPERLORA_WHEEL_PYTHON="$work/venv/bin/python" HYPERLORA_WHEEL_EXTRAS="${installed#,}" \
    "$python" -m pytest -q -p no:cacheprovider tests/test_packaging.py -k "$tests"
done
