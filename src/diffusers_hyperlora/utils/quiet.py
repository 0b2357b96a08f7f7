"""Quieter output from other libraries: transformers' "Loading weights" progress bar, hidden for a block.

transformers draws that bar from version 5; before 5 there is none, and nothing is touched (importing
`transformers.utils` would also import torch, which the command line's argument checks must not wait for).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from typing import Any


def _transformers_logging() -> Any:
    """transformers' logging module where transformers draws a "Loading weights" bar (>= 5), else None."""
    try:
        if int(importlib.metadata.version("transformers").split(".")[0]) < 5:
            return None
        from transformers.utils import logging as transformers_logging
    except (ImportError, ValueError):
        return None
    return transformers_logging


@contextlib.contextmanager
def no_transformers_progress_bar() -> Iterator[None]:
    """Hide transformers' progress bars inside the block (our own tqdm bars stay); restore the setting afterwards."""
    transformers_logging = _transformers_logging()
    if transformers_logging is None:
        yield
        return
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
