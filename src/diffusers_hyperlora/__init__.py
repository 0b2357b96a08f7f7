"""diffusers-hyperlora: HyperLoRA (photos -> LoRA in one forward pass) as a first-class diffusers citizen.

>>> import diffusers_hyperlora  # installs pipe.load_hyperlora & co. on diffusers' SD/SDXL pipelines
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

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
    IdentityCountError,
    IdentityFormatError,
    IdentityMismatchError,
    IdentityNotFoundError,
    ImageInputError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    MissingDependencyError,
    NoFaceDetectedError,
    NonFiniteValueError,
    PerSampleFusedError,
    TargetMismatchError,
    TrainingConfigError,
    TrainingDataError,
    UnsupportedPipelineError,
)
from .pipeline.install import install_when_diffusers_loads

# Public names -> the module that defines them. They are imported on first use, so `import diffusers_hyperlora`
# (and the command line's `--help`) stays fast: torch and diffusers load only when something needs them.
_LAZY_EXPORTS = {
    "HyperLoRAConfig": ".model.config",
    "HyperLoRAController": ".pipeline.controller",
    "FeatureExtractor": ".identities.features",
    "HyperLoRAFeatures": ".identities.features",
    "HyperLoRAIdentity": ".identities.identity",
    "HubOptions": ".io",
    "load_predictor": ".io",
    "convert_checkpoint": ".io.convert",
    "save_release_checkpoint": ".io.release",
    "HyperLoRAMixin": ".pipeline.mixin",
    "add_hyperlora_slider": ".pipeline.mixin",
    "install_pipeline_methods": ".pipeline.mixin",
    "load_hyperlora": ".pipeline.mixin",
    "predict_hyperlora_identity": ".pipeline.mixin",
    "preview_hyperlora_inputs": ".pipeline.mixin",
    "remove_hyperlora_slider": ".pipeline.mixin",
    "set_hyperlora_identities": ".pipeline.mixin",
    "set_hyperlora_identity": ".pipeline.mixin",
    "unload_hyperlora": ".pipeline.mixin",
    "HyperLoRAPredictor": ".model.predictor",
    "HyperLoRASlider": ".adapters.sliders",
}

if TYPE_CHECKING:  # type checkers and the API reference (mkdocstrings) see the real imports
    from .adapters.sliders import HyperLoRASlider
    from .identities.features import FeatureExtractor, HyperLoRAFeatures
    from .identities.identity import HyperLoRAIdentity
    from .io import HubOptions, load_predictor
    from .io.convert import convert_checkpoint
    from .io.release import save_release_checkpoint
    from .model.config import HyperLoRAConfig
    from .model.predictor import HyperLoRAPredictor
    from .pipeline.controller import HyperLoRAController
    from .pipeline.mixin import (
        HyperLoRAMixin,
        add_hyperlora_slider,
        install_pipeline_methods,
        load_hyperlora,
        predict_hyperlora_identity,
        preview_hyperlora_inputs,
        remove_hyperlora_slider,
        set_hyperlora_identities,
        set_hyperlora_identity,
        unload_hyperlora,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusers_hyperlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # next time a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


# `import diffusers_hyperlora` installs pipe.load_hyperlora & co. on SD, SDXL, SD3 and FLUX pipelines: now if
# diffusers' LoRA loaders are already imported, else the moment they are (see install.py).
install_when_diffusers_loads()

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
    "IdentityCountError",
    "IdentityFormatError",
    "IdentityMismatchError",
    "IdentityNotFoundError",
    "ImageInputError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "MissingDependencyError",
    "NoFaceDetectedError",
    "NonFiniteValueError",
    "PerSampleFusedError",
    "TargetMismatchError",
    "TrainingConfigError",
    "TrainingDataError",
    "UnsupportedPipelineError",
    "install_pipeline_methods",
    "load_hyperlora",
    "add_hyperlora_slider",
    "convert_checkpoint",
    "load_predictor",
    "predict_hyperlora_identity",
    "preview_hyperlora_inputs",
    "remove_hyperlora_slider",
    "save_release_checkpoint",
    "set_hyperlora_identities",
    "set_hyperlora_identity",
    "unload_hyperlora",
]
