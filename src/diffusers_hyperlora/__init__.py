"""diffusers-hyperlora: HyperLoRA (photos -> LoRA in one forward pass) as a first-class diffusers citizen.

>>> import diffusers_hyperlora  # installs pipe.load_hyperlora & co. on diffusers' SD/SDXL pipelines
"""

__version__ = "0.1.0"

from .config import HyperLoRAConfig
from .controller import HyperLoRAController
from .errors import (
    AdapterNameConflictError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    FaceModelsNotFoundError,
    FaceSelectionError,
    FeatureShapeError,
    HyperLoRAError,
    HyperLoRANotLoadedError,
    HyperLoRAWriteError,
    IdentityFormatError,
    IdentityMismatchError,
    ImageInputError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NoFaceDetectedError,
    NonFiniteValueError,
    TargetMismatchError,
    TrainingConfigError,
    TrainingDataError,
)
from .features import FeatureExtractor, HyperLoRAFeatures
from .identity import HyperLoRAIdentity
from .io import HubOptions, load_predictor
from .io.convert import convert_checkpoint
from .io.release import save_release_checkpoint
from .pipeline import (
    HyperLoRAMixin,
    add_hyperlora_slider,
    install_pipeline_methods,
    load_hyperlora,
    predict_hyperlora_identity,
    preview_hyperlora_inputs,
    remove_hyperlora_slider,
    set_hyperlora_identity,
    unload_hyperlora,
)
from .predictor import HyperLoRAPredictor
from .sliders import HyperLoRASlider

install_pipeline_methods()

__all__ = [
    "AdapterNameConflictError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "FaceModelsNotFoundError",
    "FaceSelectionError",
    "FeatureExtractor",
    "FeatureShapeError",
    "HubOptions",
    "HyperLoRAConfig",
    "HyperLoRAController",
    "HyperLoRAError",
    "HyperLoRAFeatures",
    "HyperLoRAIdentity",
    "HyperLoRAMixin",
    "HyperLoRANotLoadedError",
    "HyperLoRAPredictor",
    "HyperLoRAWriteError",
    "HyperLoRASlider",
    "IdentityFormatError",
    "IdentityMismatchError",
    "ImageInputError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "NoFaceDetectedError",
    "NonFiniteValueError",
    "TargetMismatchError",
    "TrainingConfigError",
    "TrainingDataError",
    "load_hyperlora",
    "add_hyperlora_slider",
    "convert_checkpoint",
    "load_predictor",
    "predict_hyperlora_identity",
    "preview_hyperlora_inputs",
    "remove_hyperlora_slider",
    "save_release_checkpoint",
    "set_hyperlora_identity",
    "unload_hyperlora",
]
