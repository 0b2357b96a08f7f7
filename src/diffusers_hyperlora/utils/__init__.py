"""Small internal helpers every layer uses: validators (checks.py), atomic file writes (atomic_files.py), quieter
third-party output (quiet.py) and the front ends' device and dtype policy (devices.py)."""
