"""Small internal helpers every layer uses: validators (checks.py), atomic file writes (atomic_files.py), quieter
third-party output (quiet.py), the front ends' device and dtype policy (devices.py), and every internal of another
library HyperLoRA relies on (compat.py, the only place for them)."""
