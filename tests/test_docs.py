"""The documentation stays true: every Python block runs (tiny models) or says it needs real weights.

Every ```python block in README.md and docs/*.md is compiled. Blocks right after the line
`<!-- needs real weights -->` are only compiled (they download SDXL, the release, CLIP or AntelopeV2). All other
blocks run, page by page in one namespace, in a world where the network parts are replaced by tiny stand-ins:

- `StableDiffusionXLPipeline.from_pretrained(...)` gives the built-in tiny SDXL pipeline;
- the Hugging Face cache holds a tiny checkpoint as `org/hyperlora` (the docs' placeholder repo id) and as
  `bytedance-research/HyperLoRA` (subfolder `sdxl_hyper_id_lora_v1_fidelity`), and a tiny CLIP encoder as
  `openai/clip-vit-large-patch14`; `$INSIGHTFACE_HOME` holds tiny AntelopeV2-shaped models;
- the photos the docs name (`me1.jpg`, ...) are skimage's astronaut with a face marker the tiny detector finds;
- names a fragment uses without defining (`pipe` with `org/hyperlora` loaded, `identity`, `alice`,
  `arcface_embeddings`, ...) are predefined.

Also checked: every error class has a section in troubleshooting.md, pipelines.md names every installed
pipeline method, and the pages of `train` and `demo` name every option of the command.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_features

import diffusers_hyperlora
from diffusers_hyperlora import errors

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS_WEIGHTS = "<!-- needs real weights -->"
BLOCK = re.compile(r"^(?P<mark><!-- needs real weights -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)
FAST = {"num_inference_steps": 2, "height": 64, "width": 64}
PHOTOS = ["me.jpg", "me1.jpg", "me2.jpg", "me3.jpg", "me_1.jpg", "me_2.png", "me_aged.jpg", "new_photo.jpg"]


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """`(line, code, needs_weights)` for every python block of a page."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text[: match.start("code")].count("\n") + 1
        found.append((line, match.group("code"), bool(match.group("mark"))))
    return found


ALL_BLOCKS = [(page, *block) for page in PAGES for block in python_blocks(page)]
TINY_PAGES = sorted({page for page, _, _, needs in ALL_BLOCKS if not needs}, key=str)


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page,line,code,needs", ALL_BLOCKS, ids=[f"{_name(p)}:{n}" for p, n, _, _ in ALL_BLOCKS])
def test_every_block_is_python(page, line, code, needs):
    compile(code, f"{_name(page)}:{line}", "exec")


# ------------------------------------------------------------------------------------------------ the tiny world
def _add_snapshot(cache: Path, repo_id: str, folder: Path, subfolder: str = "") -> None:
    """Put `folder`'s files into the Hugging Face cache as the `main` revision of `repo_id` (in `subfolder`)."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    target = repo / "snapshots" / commit / subfolder
    target.mkdir(parents=True)
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders, caches and photos for the tiny stand-ins (see the module docstring)."""
    pytest.importorskip("insightface")
    from PIL import Image
    from skimage.data import astronaut

    from diffusers_hyperlora.testing.tiny_face import (
        ASTRONAUT_FACE,
        draw_face_marker,
        export_tiny_antelopev2,
        tiny_clip_encoder,
    )
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

    root = tmp_path_factory.mktemp("docs_world")
    tiny_hyperlora_predictor(seed=0).save_pretrained(root / "checkpoint")
    encoder = tiny_clip_encoder()
    encoder.model.save_pretrained(root / "clip")
    encoder.processor.save_pretrained(root / "clip")
    _add_snapshot(root / "hub", "org/hyperlora", root / "checkpoint")
    _add_snapshot(root / "hub", "openai/clip-vit-large-patch14", root / "clip")
    # the real release's repo id and subfolder, holding the tiny checkpoint
    _add_snapshot(root / "hub", "bytedance-research/HyperLoRA", root / "checkpoint", "sdxl_hyper_id_lora_v1_fidelity")
    export_tiny_antelopev2(root / "insightface" / "models" / "antelopev2")
    work = root / "work"
    work.mkdir()
    photo = draw_face_marker(astronaut(), ASTRONAUT_FACE)
    for index, name in enumerate(PHOTOS):
        shifted = np.roll(photo, 4 * index, axis=1)  # a slightly different photo each
        Image.fromarray(shifted).save(work / name, format="PNG")  # lossless: the marker keeps its colour
    return root


@pytest.fixture
def tiny_world(world, monkeypatch):
    """Run inside the world: offline cache, tiny face models, the tiny SDXL pipeline for any repo id."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline

    monkeypatch.setenv("HF_HUB_CACHE", str(world / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(world / "hub"))
    monkeypatch.setenv("INSIGHTFACE_HOME", str(world / "insightface"))
    monkeypatch.setattr(
        StableDiffusionXLPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_sdxl_pipeline())
    )
    generate = StableDiffusionXLPipeline.__call__
    monkeypatch.setattr(  # tiny mode: 2 denoising steps at 64 px
        StableDiffusionXLPipeline, "__call__", lambda self, *a, **k: generate(self, *a, **{**k, **FAST})
    )
    monkeypatch.chdir(world / "work")
    return world


def _namespace() -> dict:
    """Names the docs' fragments use without defining them."""
    from PIL import Image

    from diffusers_hyperlora import HyperLoRAIdentity, HyperLoRASlider
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

    predictor = tiny_hyperlora_predictor(seed=0)  # the checkpoint saved as `org/hyperlora`
    pipe = tiny_sdxl_pipeline()
    pipe.load_hyperlora("org/hyperlora")
    people = {
        name: predictor.predict(*random_features(batch=2, seed=seed))
        for seed, name in enumerate(["identity", "alice", "bob", "carol"])
    }
    for name, person in people.items():
        if name != "identity":
            person.save(f"{name}.safetensors")
    people["identity"].save("me.safetensors")
    HyperLoRAIdentity.merge([people["alice"]]).save("alice_2019.safetensors")
    people["alice"].save("alice_2024.safetensors")
    arcface_embeddings, clip_states = random_features(batch=2, seed=9)
    predictor.export_lora(people["carol"], "style_lora.safetensors")  # "your own LoRA"
    return {
        "torch": torch,
        "diffusers_hyperlora": diffusers_hyperlora,
        "arcface_embeddings": arcface_embeddings,
        "clip_states": clip_states,
        "img1": Image.open("me1.jpg"),
        "img2": Image.open("me2.jpg"),
        "pipe": pipe,
        "prompt": "fcsks fxhks fhyks, a photo of a person",
        "slider": HyperLoRASlider(neutral=people["alice"], edited=people["bob"]),
        "predictor": predictor,
        **people,
    }


@pytest.mark.parametrize("page", TINY_PAGES, ids=[_name(p) for p in TINY_PAGES])
def test_blocks_run_on_tiny_models(page, tiny_world):
    namespace = _namespace()
    for line, code, needs in python_blocks(page):
        if needs:
            continue
        try:
            exec(compile(code, f"{_name(page)}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(
                f"{_name(page)}, the python block at line {line} fails on the tiny stand-ins: {type(error).__name__}: "
                f"{error}. Fix the block, or put `{NEEDS_WEIGHTS}` on the line above it if it needs real weights."
            )


# ------------------------------------------------------------------------------------------------ drift checks
def test_troubleshooting_covers_every_error():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    classes = [
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.HyperLoRAError)
    ]
    missing = [name for name in classes if f"### `{name}`" not in text]
    assert classes and not missing, f"docs/troubleshooting.md has no section for {missing}: when, and how to fix it"


def test_pipelines_page_names_every_installed_member():
    from diffusers_hyperlora import HyperLoRAMixin

    members = [name for name in vars(HyperLoRAMixin) if not name.startswith("_") and name != "hyperlora_denoiser_name"]
    text = (ROOT / "docs" / "pipelines.md").read_text()
    intro = text[text.index("## Which pipelines") : text.index("```")]
    missing = [name for name in members if f"`{name}`" not in intro]
    assert members and not missing, f"docs/pipelines.md's list of installed methods lacks {missing}"


def _command_options(command: str) -> list[str]:
    import argparse

    from diffusers_hyperlora.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = commands.choices[command]._actions
    return [flag for action in actions for flag in action.option_strings if flag not in ("-h", "--help", "-v")]


@pytest.mark.parametrize(
    "command, page, start, end",
    [("train", "cli.md", "## `train", "## `demo"), ("demo", "demo.md", "## Options", "## The tiny default")],
)
def test_command_pages_name_every_option(command, page, start, end):
    text = (ROOT / "docs" / page).read_text()
    section = text[text.index(start) : text.index(end)]
    named = [flag for flag in _command_options(command) if flag != "--verbose"]
    missing = [flag for flag in named if not re.search(re.escape(flag) + r"(?![\w-])", section)]
    assert not missing, f"docs/{page}, section {start!r}, does not name the `{command}` options {missing}"
