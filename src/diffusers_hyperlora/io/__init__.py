"""Reading and writing checkpoints (the release's folder layout, the library's own format) and finding files.

io builds predictors; the predictor module knows nothing of files. `hub.Location` is the one resolver for every
file the library reads (checkpoints, the CLIP encoder, the face models), configured by `HubOptions`.
"""

from .checkpoint import load_predictor
from .hub import HubOptions, Location, resolve_location

__all__ = ["HubOptions", "Location", "load_predictor", "resolve_location"]
