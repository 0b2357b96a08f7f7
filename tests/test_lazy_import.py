"""`import diffusers_hyperlora` is cheap (no torch, no diffusers) and still installs the pipeline methods."""

from __future__ import annotations

import importlib
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
        "\nfrom diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline\n"
        "names = ('load_hyperlora', 'set_hyperlora_identity', 'hyperlora', 'add_hyperlora_slider')\n"
        "classes = (StableDiffusionXLPipeline, StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline)\n"
        "print(all(hasattr(c, n) for c in classes for n in names))"
    )
    assert _python(code) == "True"


def test_each_lazy_name_is_the_object_its_module_defines():
    """`diffusers_hyperlora.X` is the very object of the module `_LAZY_EXPORTS` names, defined in that subpackage."""
    import diffusers_hyperlora

    lazy = diffusers_hyperlora._LAZY_EXPORTS
    assert set(lazy) <= set(diffusers_hyperlora.__all__), "a lazy name is missing from __all__"
    for name, module_name in lazy.items():
        module = importlib.import_module(module_name, "diffusers_hyperlora")
        value = getattr(diffusers_hyperlora, name)
        assert value is getattr(module, name), name
        assert value.__module__.startswith(module.__name__), f"{name} is defined in {value.__module__}"
        assert value.__name__ == name
        assert diffusers_hyperlora.__dict__[name] is value  # cached: the next access is a plain attribute


def test_every_public_name_is_eager_or_lazy_and_the_eager_ones_are_the_errors():
    import diffusers_hyperlora
    from diffusers_hyperlora import errors

    lazy = set(diffusers_hyperlora._LAZY_EXPORTS)
    eager = set(diffusers_hyperlora.__all__) - lazy
    error_classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.HyperLoRAError)}
    assert eager == error_classes, "only the error classes are imported eagerly (they need neither torch nor diffusers)"
    assert all(getattr(diffusers_hyperlora, n) is getattr(errors, n) for n in eager)
    assert set(diffusers_hyperlora.__all__) <= set(dir(diffusers_hyperlora))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusers_hyperlora.nope  # noqa: B018


def test_a_lazy_name_loads_its_module_on_first_use_only():
    code = (
        "import sys\n"
        "import diffusers_hyperlora\n"
        "before = sorted(m for m in sys.modules if m.startswith('diffusers_hyperlora.'))\n"
        "diffusers_hyperlora.HyperLoRAIdentity\n"
        "after = 'diffusers_hyperlora.identities.identity' in sys.modules, 'torch' in sys.modules\n"
        "print(before, after)"
    )
    before, after = _python(code).split("] ")
    loaded = {name.strip(" '[") for name in before.split(",") if name.strip(" '[")}
    assert loaded <= {
        "diffusers_hyperlora.errors",
        "diffusers_hyperlora.pipeline",
        "diffusers_hyperlora.pipeline.install",
        "diffusers_hyperlora.utils",
        "diffusers_hyperlora.utils.compat",  # names diffusers' LoRA loaders module; standard library only
    }, f"`import diffusers_hyperlora` loads more than the errors and the installer: {sorted(loaded)}"
    assert after == "(True, True)"
