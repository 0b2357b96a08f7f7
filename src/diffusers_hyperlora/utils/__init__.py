"""Small internal helpers every layer uses: validators (checks.py) and atomic file writes (atomic_files.py)."""
