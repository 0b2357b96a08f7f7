"""Small internal helpers every layer uses: validators (checks.py), atomic file writes (atomic_files.py) and the
front ends' device and dtype policy (devices.py)."""
