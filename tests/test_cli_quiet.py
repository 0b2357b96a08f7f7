"""The CLI hides transformers' "Loading weights" progress bar unless -v, and restores the setting afterwards."""

import pytest

transformers_logging = pytest.importorskip("transformers.utils.logging")

from diffusers_hyperlora.cli import third_party_output  # noqa: E402


def test_transformers_progress_bar_hidden_then_restored():
    assert transformers_logging.is_progress_bar_enabled()
    with third_party_output(verbose=False):
        assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled()


def test_transformers_progress_bar_shown_with_verbose():
    with third_party_output(verbose=True):
        assert transformers_logging.is_progress_bar_enabled()
