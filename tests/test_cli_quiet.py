"""The CLI hides transformers' "Loading weights" progress bar unless -v, and restores the setting afterwards.

transformers draws that bar from version 5; before 5 there is none, and the CLI leaves transformers alone (importing
its utils there would import torch before the argument checks)."""

import importlib.metadata

import pytest

transformers_logging = pytest.importorskip("transformers.utils.logging")

from diffusers_hyperlora.cli import third_party_output  # noqa: E402

DRAWS_THE_BAR = int(importlib.metadata.version("transformers").split(".")[0]) >= 5


def test_transformers_progress_bar_hidden_then_restored():
    assert transformers_logging.is_progress_bar_enabled()
    with third_party_output(verbose=False):
        assert transformers_logging.is_progress_bar_enabled() is not DRAWS_THE_BAR
    assert transformers_logging.is_progress_bar_enabled()


def test_transformers_progress_bar_shown_with_verbose():
    with third_party_output(verbose=True):
        assert transformers_logging.is_progress_bar_enabled()


def test_an_error_inside_the_quiet_block_passes_through_unchanged():
    with pytest.raises(ValueError, match="boom"), third_party_output(verbose=False):
        raise ValueError("boom")
    assert transformers_logging.is_progress_bar_enabled()
