"""`python -m diffusers_hyperlora.cli ...` (e.g. under `accelerate launch -m diffusers_hyperlora.cli train ...`)."""

from . import _entry_point

if __name__ == "__main__":  # importing this module (e.g. to read its docstring) runs nothing
    _entry_point()
