"""diffusers-hyperlora: HyperLoRA (photos -> LoRA in one forward pass) as a first-class diffusers citizen.

>>> import diffusers_hyperlora  # installs pipe.load_hyperlora & co. on diffusers' SD/SDXL pipelines
"""

__version__ = "0.1.0"

from .config import HyperLoRAConfig
from .errors import (
    AdapterNameConflictError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    FeatureShapeError,
    HyperLoRAError,
    HyperLoRANotLoadedError,
    IdentityMismatchError,
    NoFaceDetectedError,
    TargetMismatchError,
)
from .features import FeatureExtractor, HyperLoRAFeatures
from .identity import HyperLoRAIdentity
from .io import load_predictor
from .pipeline import (
    HyperLoRAMixin,
    install_pipeline_methods,
    load_hyperlora,
    predict_hyperlora_identity,
    set_hyperlora_identity,
    unload_hyperlora,
)
from .predictor import HyperLoRAPredictor

install_pipeline_methods()

__all__ = [
    "AdapterNameConflictError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "FeatureExtractor",
    "FeatureShapeError",
    "HyperLoRAConfig",
    "HyperLoRAError",
    "HyperLoRAFeatures",
    "HyperLoRAIdentity",
    "HyperLoRAMixin",
    "HyperLoRANotLoadedError",
    "HyperLoRAPredictor",
    "IdentityMismatchError",
    "NoFaceDetectedError",
    "TargetMismatchError",
    "load_hyperlora",
    "load_predictor",
    "predict_hyperlora_identity",
    "set_hyperlora_identity",
    "unload_hyperlora",
]
