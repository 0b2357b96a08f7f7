"""Docstrings are the API reference (mkdocstrings renders them): every public name has one with an example, and
every example that is not marked `# doctest: +SKIP` runs."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import diffusers_hyperlora

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
    except ImportError as error:  # an optional extra that is not installed (e.g. gradio for the demo)
        pytest.skip(f"{module_name}: {error}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} fail: run doctest on it"
