"""`import diffusers_hyperlora` is cheap (no torch, no diffusers) and still installs the pipeline methods."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_import_and_cli_help_load_neither_torch_nor_diffusers():
    code = (
        "import sys, contextlib, io\n"
        "import diffusers_hyperlora\n"
        "from diffusers_hyperlora.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['train', '--help'])\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    assert _python(code) == "[]", "the package import / CLI start-up must stay light (slow --help)"


@pytest.mark.parametrize("diffusers_first", [False, True])
def test_pipeline_methods_are_installed_whichever_is_imported_first(diffusers_first):
    imports = ["import diffusers_hyperlora", "from diffusers import StableDiffusionXLPipeline"]
    if diffusers_first:
        imports.reverse()
    code = "\n".join(imports) + (
        "\nfrom diffusers import StableDiffusionPipeline\n"
        "names = ('load_hyperlora', 'set_hyperlora_identity', 'hyperlora', 'add_hyperlora_slider')\n"
        "print(all(hasattr(c, n) for c in (StableDiffusionXLPipeline, StableDiffusionPipeline) for n in names))"
    )
    assert _python(code) == "True"


def test_public_names_resolve_lazily():
    import diffusers_hyperlora

    for name in diffusers_hyperlora.__all__:
        assert getattr(diffusers_hyperlora, name) is not None
    assert set(diffusers_hyperlora.__all__) <= set(dir(diffusers_hyperlora))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusers_hyperlora.nope  # noqa: B018
