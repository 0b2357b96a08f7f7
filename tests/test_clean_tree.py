"""Running an example leaves the repository as it was: `git status` (ignored files included) does not change.

`examples/tiny_demo.py` (what `scripts/demo.sh` runs) is run as a reader runs it, from a scratch folder, with
its outputs sent there; the check is that nothing appears or changes in the working tree, not even in ignored
places such as `outputs/` (Python's `__pycache__` folders aside).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tree_state() -> list[str]:
    """`git status --porcelain --ignored` of the checkout, file by file, without `.venv/` and the caches."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".", ":!.venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    caches = ("__pycache__", ".pytest_cache", ".ruff_cache")
    return sorted(line for line in result.stdout.splitlines() if not any(cache in line for cache in caches))


@pytest.fixture
def git_checkout():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of the repository")


def run_example(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_tiny_demo_leaves_the_tree_clean(git_checkout, tmp_path):
    before = tree_state()
    result = run_example("examples/tiny_demo.py", tmp_path, "--output-dir", "out", "--steps", "1", "--size", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_state() == before, "examples/tiny_demo.py wrote into the repository (see `git status --ignored`)"
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert "tiny_demo.png" in written and "tiny_identity_lora.safetensors" in written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"], "the example wrote outside --output-dir"
    assert "the identity vs. another one" in result.stdout and "un-warmed" in result.stdout


def test_tree_state_sees_a_new_file(git_checkout):
    """The check above can fail: a file the example would leave in the tree (even an ignored one) shows up."""
    before = tree_state()
    stray = ROOT / "outputs" / "test_clean_tree_probe.txt"
    created_folder = not stray.parent.exists()
    stray.parent.mkdir(exist_ok=True)
    try:
        stray.write_text("probe")
        assert tree_state() != before
    finally:
        stray.unlink()
        if created_folder:
            stray.parent.rmdir()
    assert tree_state() == before
