"""Reading and writing checkpoints: the public release's folder layout, the library's own format, the Hub."""

from .hub import CheckpointLocation, load_predictor

__all__ = ["CheckpointLocation", "load_predictor"]
