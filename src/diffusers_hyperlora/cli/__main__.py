"""`python -m diffusers_hyperlora.cli ...` (e.g. under `accelerate launch -m diffusers_hyperlora.cli train ...`)."""

from . import _entry_point

_entry_point()
