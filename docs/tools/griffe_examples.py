"""Griffe extension for the API reference: read a Google-style `Example:` section like `Examples:`.

Griffe treats the singular heading as an admonition (its `>>>` lines would render as prose); the library's
docstrings use the singular, so this turns it into the examples section mkdocstrings renders as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExamplesSection(griffe.Extension):
    """Rewrite `Example:` headings to `Examples:` before the docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
