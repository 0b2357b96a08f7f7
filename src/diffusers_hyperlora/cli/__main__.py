"""`python -m diffusers_hyperlora.cli ...` (e.g. under `accelerate launch -m diffusers_hyperlora.cli train ...`)."""

import sys

from . import main

if __name__ == "__main__":  # importing this module (e.g. to read its docstring) runs nothing
    sys.exit(main())
