"""Install the pipeline methods when diffusers' LoRA loaders load, so `import diffusers_hyperlora` stays cheap.

`import diffusers_hyperlora` promises `pipe.load_hyperlora(...)` on every SD, SDXL, SD3 and FLUX pipeline. Those
methods live on diffusers' `StableDiffusionXLLoraLoaderMixin`, `StableDiffusionLoraLoaderMixin`,
`SD3LoraLoaderMixin` and `FluxLoraLoaderMixin`, defined in `diffusers.loaders.lora_pipeline`, which every such
pipeline class imports. Importing diffusers (and torch) just
to set them would make every `import diffusers_hyperlora` (and the command line's `--help`) take seconds, so:

- if that module is already imported, the methods are installed at once;
- otherwise a one-shot import hook (the standard `sys.meta_path` finder protocol) installs them right after the
  module has run, before any pipeline class can use it.

Standard library only; nothing heavy is imported here (`utils/compat.py`, which names the module, is light too).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

from ..utils.compat import LORA_LOADERS_MODULE


def install_now() -> None:
    """Put the methods on diffusers' LoRA loader mixins (imports the library's pipeline module)."""
    from .mixin import install_pipeline_methods

    install_pipeline_methods()


class _InstallAfterExec(importlib.abc.Loader):
    """Wraps the real loader of the LoRA loaders' module: run it, then install the methods."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        install_now()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _InstallWhenImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for the LoRA loaders' module it wraps the spec the other finders return."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None):
        if fullname != LORA_LOADERS_MODULE:
            return None
        remove_hook()  # one shot, and lets the normal finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfterExec(spec.loader)
        return spec


def remove_hook() -> None:
    """Take the import hook out of `sys.meta_path` (no-op when it is not there)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _InstallWhenImported)]


def install_when_diffusers_loads() -> None:
    """Install the pipeline methods now if diffusers' LoRA loaders are imported, else as soon as they are."""
    if LORA_LOADERS_MODULE in sys.modules:
        install_now()
    elif not any(isinstance(finder, _InstallWhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallWhenImported())
