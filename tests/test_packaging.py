"""The package as users get it: an sdist and a wheel built from this tree, checked, then installed and run.

The first tests build both (as `python -m build` does for a release) and check what they hold: every file the
package reads at run time, one version number, metadata that `twine check` accepts.

The tests marked `installed` run the tiny main job and the CLI's offline commands with an installed wheel (not
the editable source): `scripts/ci-wheel.sh` builds the wheel, installs it into a fresh virtual environment, adds
the extras one at a time, and runs this file after each with `HYPERLORA_WHEEL_PYTHON` (that environment's python)
and `HYPERLORA_WHEEL_EXTRAS` (the extras installed so far). Without those variables they are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffusers_hyperlora"
WHEEL_PYTHON = os.environ.get("HYPERLORA_WHEEL_PYTHON")
WHEEL_EXTRAS = {name for name in os.environ.get("HYPERLORA_WHEEL_EXTRAS", "").split(",") if name}
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
OFFLINE.pop("PYTHONPATH", None)  # the installed wheel, never this tree's src/


def _version() -> str:
    """`__version__` as written in the package (the one place the number lives)."""
    match = re.search(r'^__version__ = "([^"]+)"', (PACKAGE / "__init__.py").read_text(), re.M)
    assert match, "src/diffusers_hyperlora/__init__.py must assign __version__ a string literal"
    return match.group(1)


def _copy_clean_tree(tree: Path) -> None:
    """The files git sees (tracked, or new and not ignored), as a clean clone has them: a build in this tree would
    also read leftovers such as src/*.egg-info/SOURCES.txt, which can list files package-data no longer names."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    if listed.returncode != 0:
        pytest.skip("the package build test needs the git checkout (git ls-files)")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from this tree (the wheel is built from the sdist, as pip would)."""
    pytest.importorskip("build", reason="the test extra is not installed: pip install -e '.[test]'")
    out, tree = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("tree")
    _copy_clean_tree(tree)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(tree)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_wheel_holds_every_file_the_package_reads(dists):
    """Package data: every non-Python file under src/diffusers_hyperlora (io/model_card_template.md, ...)."""
    data = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert "diffusers_hyperlora/io/model_card_template.md" in data
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    assert data <= names, f"missing from the wheel: {sorted(data - names)}; add them to package-data in pyproject.toml"
    modules = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"diffusers_hyperlora", f"diffusers_hyperlora-{_version()}.dist-info"}


def test_one_version_number(dists):
    """pyproject.toml reads the version from `__version__`; the CHANGELOG has a section for it."""
    metadata = zipfile.ZipFile(dists["wheel"]).read(f"diffusers_hyperlora-{_version()}.dist-info/METADATA").decode()
    assert re.search(rf"^Version: {re.escape(_version())}$", metadata, re.M)
    assert dists["sdist"].name == f"diffusers_hyperlora-{_version()}.tar.gz"
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
    assert f"## [{_version()}]" in (ROOT / "CHANGELOG.md").read_text()


def test_wheel_metadata_declares_extras_and_the_command(dists):
    wheel = zipfile.ZipFile(dists["wheel"])
    metadata = wheel.read(f"diffusers_hyperlora-{_version()}.dist-info/METADATA").decode()
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert {"face", "face-gpu", "train", "docs", "demo", "test"} <= extras
    entry_points = wheel.read(f"diffusers_hyperlora-{_version()}.dist-info/entry_points.txt").decode()
    assert "diffusers-hyperlora = diffusers_hyperlora.cli:main" in entry_points


def test_sdist_builds_the_same_package(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "src/diffusers_hyperlora/io/model_card_template.md"} <= names


def test_twine_accepts_both(dists):
    pytest.importorskip("twine", reason="the test extra is not installed: pip install -e '.[test]'")
    files = [str(dists["sdist"]), str(dists["wheel"])]
    argv = [sys.executable, "-m", "twine", "check", "--strict", *files]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------- installed
def _installed(extra: str | None = None) -> Path:
    if WHEEL_PYTHON is None:
        pytest.skip("needs an installed wheel: run scripts/ci-wheel.sh (sets HYPERLORA_WHEEL_PYTHON)")
    if extra is not None and extra not in WHEEL_EXTRAS:
        pytest.skip(f"the wheel's environment does not have the {extra} extra yet")
    return Path(WHEEL_PYTHON)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _cli(python: Path) -> Path:
    return python.parent / "diffusers-hyperlora"


SAVE_TINY = "import sys; from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor as t; " \
    "t(seed=0).save_pretrained(sys.argv[1])"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint saved by the installed wheel (with its model card, rendered from the packaged template)."""
    python = _installed()
    out = tmp_path_factory.mktemp("wheel_checkpoint")
    where = _run([python, "-c", "import diffusers_hyperlora as d; print(d.__file__, d.__version__)"], out).stdout
    location, version = where.split()
    assert not Path(location).is_relative_to(ROOT) and "site-packages" in location, location
    assert version == _version()
    _run([python, "-c", SAVE_TINY, out / "tiny-hyperlora"], out)
    card = (out / "tiny-hyperlora" / "README.md").read_text()
    assert "HyperLoRA" in card and "{{" not in card
    return out / "tiny-hyperlora"


def test_installed_wheel_runs_the_tiny_main_job(tmp_path):
    """examples/tiny_demo.py with the installed wheel: checkpoint, identity, image, LoRA file."""
    python = _installed()
    demo = [python, ROOT / "examples" / "tiny_demo.py", "--output-dir", tmp_path, "--steps", "1", "--size", "64"]
    _run(demo, tmp_path)
    assert (tmp_path / "tiny_demo.png").stat().st_size > 0
    assert (tmp_path / "tiny_identity_lora.safetensors").stat().st_size > 0
    assert (tmp_path / "tiny-hyperlora" / "README.md").stat().st_size > 0


IDENTITIES = """
import sys, torch
from diffusers_hyperlora import load_predictor
predictor = load_predictor(sys.argv[1])
for seed, name in ((1, "alice"), (2, "bob")):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
    states = torch.randn(2, 17, predictor.config.image_embed_dim, generator=g)
    predictor.predict(id_embeds=embeds, clip_hidden_states=states).save(f"{name}.safetensors")
from diffusers_hyperlora.io.release import save_release_checkpoint
save_release_checkpoint(predictor, "release", dtype="fp16")
"""


def test_installed_cli_offline_commands(checkpoint, tmp_path):
    python = _installed()
    cli = _cli(python)
    _run([python, "-c", IDENTITIES, checkpoint], tmp_path)
    assert "identity" in _run([cli, "--help"], tmp_path).stdout
    _run([cli, "export", "alice.safetensors", "-o", "alice_lora.safetensors", "--model", checkpoint], tmp_path)
    _run([cli, "mix", "alice.safetensors", "bob.safetensors", "--weights", "1", "2", "-o", "mix.safetensors"], tmp_path)
    _run([cli, "convert", "release", "converted", "--dtype", "fp32"], tmp_path)
    converted = ["--model", "converted", "--format", "diffusers"]
    _run([cli, "export", "mix.safetensors", "-o", "mix_lora.safetensors", *converted], tmp_path)
    for name in ("alice_lora.safetensors", "mix.safetensors", "converted/config.json", "mix_lora.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_installed_face_extra_makes_an_identity_from_photos(checkpoint, tmp_path):
    python = _installed("face")
    face_models = pytest.importorskip("face_models")  # tiny models made here (onnx, skimage: the test extra)
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    encoder = face_models.tiny_clip_encoder()
    encoder.model.save_pretrained(tmp_path / "clip")
    encoder.processor.save_pretrained(tmp_path / "clip")
    pack = face_models.export_tiny_antelopev2(tmp_path / "antelopev2")
    photo = face_models.draw_face_marker(skimage_data.astronaut(), face_models.ASTRONAUT_FACE)
    Image.fromarray(photo).save(tmp_path / "me.png")
    options = ["--model", checkpoint, "--image-encoder", tmp_path / "clip", "--face-models", pack]
    _run([_cli(python), "identity", "me.png", "-o", "me.safetensors", *options, "--device", "cpu"], tmp_path)
    assert (tmp_path / "me.safetensors").stat().st_size > 0


def test_installed_train_extra(tmp_path):
    python = _installed("train")
    _run([python, "-c", "import accelerate, diffusers_hyperlora.training"], tmp_path)
    assert "--steps" in _run([_cli(python), "train", "--help"], tmp_path).stdout


def test_installed_demo_extra(tmp_path):
    python = _installed("demo")
    _run([python, "-c", "import gradio, onnx, diffusers_hyperlora.demo.app"], tmp_path)
    assert "demo" in _run([_cli(python), "demo", "--help"], tmp_path).stdout


def test_installed_docs_extra(tmp_path):
    python = _installed("docs")
    _run([python, "-c", "import mkdocs, mkdocstrings, material, skimage, insightface"], tmp_path)
