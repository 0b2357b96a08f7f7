#!/usr/bin/env bash
# Print pip constraints that pin every dependency floor declared in pyproject.toml: `name>=X` becomes `name==X`.
# pyproject.toml is the one source of truth; the floor CI job (scripts/ci-floor.sh) installs with these.
#   bash scripts/ci-floor-constraints.sh [EXTRAS] > floors.txt     e.g. EXTRAS=face,test,train
# The core dependencies are always included; a requirement without a floor (`tqdm`) is left free. A name whose floor
# differs between the requirements taken (e.g. an extra raising a core floor) gets the highest one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" - "${1:-}" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [name for name in sys.argv[1].split(",") if name]
unknown = sorted(set(extras) - set(project["optional-dependencies"]))
if unknown:
    sys.exit(f"ci-floor-constraints.sh: no extra(s) {unknown} in pyproject.toml")
requirements = list(project["dependencies"])
for extra in extras:
    requirements += project["optional-dependencies"][extra]


def version_key(version):
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.]", version))


floors = {}
for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*?)\s*(;.*)?", requirement)
    name, specifiers = match.group(1).lower().replace("_", "-"), match.group(2)
    for specifier in specifiers.split(","):
        floor = re.fullmatch(r"\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", specifier)
        if floor and (name not in floors or version_key(floor.group(1)) > version_key(floors[name])):
            floors[name] = floor.group(1)
for name in sorted(floors):
    print(f"{name}=={floors[name]}")
EOF
