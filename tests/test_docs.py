"""The documentation stays true: every Python block runs (tiny models) or says it needs real weights.

Every ```python block in README.md and docs/*.md is compiled. Blocks right after the line
`<!-- needs real weights -->` are only compiled (they download SDXL, the release, CLIP or AntelopeV2). All other
blocks run the way a reader runs them: page by page, in the page's order, in one fresh namespace per page.
Nothing is predefined. A page that says it continues from the quickstart's setup (a link to
`quickstart.md#setup`) starts from that block, run first; every name a block uses must be defined by an earlier
block of its page or by that setup (checked statically too, for the blocks that only compile).

Real checkpoints and photos are not available offline, so the blocks run in a world where the downloads are
tiny stand-ins, as the quickstart's section "Trying the examples offline" (`quickstart.md#offline`) says, and
every page that relies on it links there:

- `StableDiffusionXLPipeline.from_pretrained(...)` gives the built-in tiny SDXL pipeline (2 steps at 64 px);
- the Hugging Face cache holds a tiny checkpoint as `org/hyperlora` (the docs' placeholder repo id) and as
  `bytedance-research/HyperLoRA` (subfolder `sdxl_hyper_id_lora_v1_fidelity`), and a tiny CLIP encoder as
  `openai/clip-vit-large-patch14`; `$INSIGHTFACE_HOME` holds tiny AntelopeV2-shaped models;
- the photos the docs name (`me1.jpg`, ...) are written by the quickstart's photo block, run as written.

Also checked: every error class has a section in troubleshooting.md, pipelines.md names every installed
pipeline method, and the pages of `train` and `demo` name every option of the command.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import re
from pathlib import Path

import pytest

from diffusers_hyperlora import errors

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS_WEIGHTS = "<!-- needs real weights -->"
BLOCK = re.compile(r"^(?P<mark><!-- needs real weights -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)
FAST = {"num_inference_steps": 2, "height": 64, "width": 64}
QUICKSTART = ROOT / "docs" / "quickstart.md"
SETUP_LINK = "quickstart.md#setup"  # "the examples on this page continue from the setup"
OFFLINE_LINK = "quickstart.md#offline"  # "... and run offline on the tiny stand-ins"
# what a block that runs on the stand-ins touches: a download, a Hub id or a photo the test provides
USES_STAND_INS = re.compile(r"from_pretrained\(|load_hyperlora\(\s*\"|\w\.(jpg|png)\b")


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


def section_blocks(page: Path, anchor: str) -> list[str]:
    """The python blocks of the section of `page` whose heading ends with `{#anchor}`."""
    text = page.read_text()
    heading = re.search(r"^(#+) .*\{#" + re.escape(anchor) + r"\}\s*$", text, re.M)
    assert heading, f"{_name(page)} has no section with the anchor {{#{anchor}}}"
    level = len(heading.group(1))
    fences = [match.span() for match in re.finditer(r"^```.*?^```", text, re.S | re.M)]
    ends = [
        match.start()
        for match in re.finditer(r"^#{1,LEVEL} ".replace("LEVEL", str(level)), text[heading.end() :], re.M)
        if not any(start <= heading.end() + match.start() < end for start, end in fences)
    ]
    section = text[heading.end() : heading.end() + ends[0] if ends else len(text)]
    return [match.group("code") for match in BLOCK.finditer(section)]


def continues_from_setup(page: Path) -> bool:
    return page != QUICKSTART and SETUP_LINK in page.read_text()


def defined_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def used_names(tree: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def undefined_names(page: Path) -> list[tuple[int, list[str]]]:
    """`(line, names)` for every block that uses a name no earlier block of its page (or the setup) defines."""
    known = set(dir(builtins))
    if continues_from_setup(page):
        for code in section_blocks(QUICKSTART, "setup"):
            known |= defined_names(ast.parse(code))
    found = []
    for line, code, _ in python_blocks(page):
        tree = ast.parse(code)
        defined = defined_names(tree)
        missing = sorted(used_names(tree) - known - defined)
        if missing:
            found.append((line, missing))
        known |= defined
    return found


@pytest.mark.parametrize("page", PAGES, ids=[_name(p) for p in PAGES])
def test_blocks_use_only_names_the_page_defines(page):
    problems = [f"line {line}: {', '.join(names)}" for line, names in undefined_names(page)]
    assert not problems, (
        f"{_name(page)}: python blocks use names that no earlier block of the page defines ({'; '.join(problems)}). "
        f"Define them in the block, or say in the page's text that its examples continue from the quickstart's setup "
        f"([the setup]({SETUP_LINK})) if that block defines them."
    )


def test_undefined_names_are_found(tmp_path):
    """The check above fails for a fragment that uses `pipe` without defining it (as quickstart.md once did)."""
    page = tmp_path / "page.md"
    page.write_text("```python\nimport torch\n```\n\n```python\npipe.set_hyperlora_identity(torch.zeros(1))\n```\n")
    assert undefined_names(page) == [(6, ["pipe"])]
    page.write_text(page.read_text() + f"\nContinues from [the setup]({SETUP_LINK}).\n")
    assert undefined_names(page) == []


@pytest.mark.parametrize("page", TINY_PAGES, ids=[_name(p) for p in TINY_PAGES])
def test_pages_that_run_on_stand_ins_say_so(page):
    text = page.read_text()
    runs = [code for _, code, needs in python_blocks(page) if not needs]
    uses = any(USES_STAND_INS.search(re.sub(r"#.*", "", code)) for code in runs)  # code, not comments
    if page == QUICKSTART or not (continues_from_setup(page) or uses):
        return
    assert OFFLINE_LINK in text, (
        f"{_name(page)} has blocks that the docs test runs on tiny stand-ins (downloads, Hub ids or photos): say so "
        f"in the page with a link to [the offline stand-ins]({OFFLINE_LINK})"
    )


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
    pytest.importorskip("skimage")
    from diffusers_hyperlora.testing.tiny_face import export_tiny_antelopev2, tiny_clip_encoder
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
    photos = section_blocks(QUICKSTART, "offline")[0]  # the photo block of the page, as a reader runs it
    with contextlib.chdir(work):
        exec(compile(photos, "docs/quickstart.md#offline (the photos)", "exec"), {})
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


def _run(code: str, where: str, namespace: dict) -> None:
    try:
        exec(compile(code, where, "exec"), namespace)
    except Exception as error:
        pytest.fail(
            f"{where}: the python block fails on the tiny stand-ins: {type(error).__name__}: {error}. Fix the block, "
            f"or put `{NEEDS_WEIGHTS}` on the line above it if it needs real weights."
        )


@pytest.mark.parametrize("page", TINY_PAGES, ids=[_name(p) for p in TINY_PAGES])
def test_blocks_run_on_tiny_models(page, tiny_world):
    namespace: dict = {}  # nothing predefined: what the page (or the setup it names) defines
    if continues_from_setup(page):
        for code in section_blocks(QUICKSTART, "setup"):
            _run(code, f"docs/quickstart.md#setup (which {_name(page)} continues from)", namespace)
    for line, code, needs in python_blocks(page):
        if not needs:
            _run(code, f"{_name(page)}, the python block at line {line},", namespace)


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


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_install_instructions_list_every_extra(page):
    """The extras tables name every extra of pyproject.toml, and nothing that is not one."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    text = (ROOT / page).read_text()
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", text[text.index("## Install") :], re.M))
    assert listed == extras, f"{page}'s table of extras lists {sorted(listed)}; pyproject.toml has {sorted(extras)}"
    assert 'pip install -e ".[face]"' in text and "python -m build" in text, f"{page}: how to install from a clone"
