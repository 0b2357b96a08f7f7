"""The first hour, as a new user reads the README: its main-job command runs as written (offline, quietly, printing
its timings), and the install instructions list the extras pyproject.toml declares, each with what it installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("torchvision", "Warning", "Traceback", "Error")
STEPS = ("build tiny SDXL pipeline", "pipe.load_hyperlora", "pipe.set_hyperlora_identity", "export kohya LoRA")
ALIASES = {"opencv-python-headless": "opencv (headless)"}  # how the tables name a package
INSTALL_DOCS = ("README.md", "docs/quickstart.md")


def section(path: str, heading: str) -> str:
    """The text of the `## ` section of `path` whose heading starts with `heading`."""
    text = (ROOT / path).read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert found, f"{path} has no section '## {heading}'"
    return found.group(1)


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_the_readme_quickstart_is_the_main_job_then_the_tests():
    assert bash_blocks(section("README.md", "Quickstart"))[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_the_readme_main_job_runs_as_written(tmp_path):
    """`bash scripts/demo.sh`, as the README gives it, in a scratch copy of the scripts and the example it runs (its
    outputs/ land there, not in this checkout), with this checkout's source and this interpreter (DEMO_PYTHON: the
    one step skipped is setting up .venv, which needs the network)."""
    command = bash_blocks(section("README.md", "Quickstart"))[0]
    for folder, name in (("scripts", "demo.sh"), ("examples", "tiny_demo.py")):
        (tmp_path / folder).mkdir(exist_ok=True)
        shutil.copy(ROOT / folder / name, tmp_path / folder / name)
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_VERBOSITY"}
    env.update(DEMO_PYTHON=sys.executable, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    noise = [word for word in NOISE if word in result.stderr]
    assert not noise, f"the main job printed other libraries' noise: {noise}\n{result.stderr[-3000:]}"
    table = result.stdout.split("| step ", 1)[-1]
    for step in STEPS:
        assert re.search(rf"\| {re.escape(step)} +\| +\d+\.\d+ \|", table), (step, result.stdout[-3000:])
    for name in ("tiny_demo.png", "tiny_demo_plain.png", "tiny_identity_lora.safetensors"):
        assert (tmp_path / "outputs" / name).stat().st_size > 0


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def _extras_table(path: str) -> dict[str, set[str]]:
    """`| `extra` | what it installs | ... |` rows of `path`: extra -> the package names listed."""
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", (ROOT / path).read_text(encoding="utf-8"), flags=re.M)
    return {extra: {name.strip() for name in listed.split(",")} for extra, listed in rows}


@pytest.mark.parametrize("path", INSTALL_DOCS)
def test_the_install_docs_list_every_extra_with_what_it_installs(path):
    """Every extra of pyproject.toml, each with its packages (those the core dependencies do not bring already)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_requirement_name(requirement) for requirement in project["dependencies"]}
    table = _extras_table(path)
    assert set(table) == set(project["optional-dependencies"]), path
    for extra, requirements in project["optional-dependencies"].items():
        names = {_requirement_name(requirement) for requirement in requirements} - core
        assert table[extra] == {ALIASES.get(name, name) for name in names}, (path, extra)


@pytest.mark.parametrize("path", INSTALL_DOCS)
def test_the_install_docs_name_the_wheel_the_build_writes(path):
    """The wheel built from a clone is named with this version (tests/test_docs.py checks the other install lines)."""
    install = section(path, "Install")
    assert "not on the Python package index yet" in install
    commands = "\n".join(bash_blocks(install))
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/diffusers_hyperlora/__init__.py").read_text())
    assert f"writes dist/diffusers_hyperlora-{version.group(1)}-py3-none-any.whl" in commands, path
    assert 'pip install "$(ls dist/*.whl)[face]"' in commands, path
