"""Docstrings are the API reference (mkdocstrings renders them): every public name has one with an example, and
every example that is not marked `# doctest: +SKIP` runs."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import diffusers_hyperlora

# The modules of the optional extras in pyproject.toml (face, train, demo): a module that needs one of these may be
# skipped when it is not installed. Any other ImportError (a typo, a moved module) fails the test.
OPTIONAL_DEPENDENCIES = {"gradio", "insightface", "onnxruntime", "cv2", "accelerate", "onnx"}

MODULES = [info.name for info in pkgutil.walk_packages(diffusers_hyperlora.__path__, "diffusers_hyperlora.")]


@pytest.mark.parametrize("name", diffusers_hyperlora.__all__)
def test_public_names_have_a_docstring_with_an_example(name):
    value = getattr(diffusers_hyperlora, name)
    doc = inspect.getdoc(value) or ""
    assert doc, f"diffusers_hyperlora.{name} has no docstring (the API reference is generated from it)"
    if inspect.isclass(value) and issubclass(value, Exception):
        return  # errors: docs/troubleshooting.md says when and how to fix (tests/test_docs.py)
    assert ">>>" in doc, f"diffusers_hyperlora.{name}'s docstring has no short example (an `Example:` section)"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in OPTIONAL_DEPENDENCIES:
            raise  # not an optional extra: a real import error
        pytest.skip(f"{module_name} needs the optional {missing!r}, which is not installed")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} fail: run doctest on it"


def test_only_a_missing_optional_dependency_is_skipped(monkeypatch):
    """The skip above is narrow: a module whose import fails for another reason is an error, not a skip."""
    import sys

    monkeypatch.setitem(sys.modules, "diffusers_hyperlora.face.analyzer", None)  # import of it now fails
    try:
        test_docstring_examples_run("diffusers_hyperlora.face.analyzer")
    except ImportError:
        pass
    except pytest.skip.Exception:
        pytest.fail("an ImportError of our own module was turned into a skip")
    else:
        pytest.fail("the failing import went unnoticed")
    monkeypatch.setitem(sys.modules, "gradio", None)
    monkeypatch.delitem(sys.modules, "diffusers_hyperlora.demo.app", raising=False)
    with pytest.raises(pytest.skip.Exception, match="optional 'gradio'"):
        test_docstring_examples_run("diffusers_hyperlora.demo.app")
