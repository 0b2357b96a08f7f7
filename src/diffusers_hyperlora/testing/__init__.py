"""Tiny stand-ins built in code, for tests and offline examples (yours too): tiny SDXL, SD 1.5, SD3 and FLUX
pipelines, a tiny HyperLoRA predictor for any of their denoisers, tiny AntelopeV2-shaped face models and a tiny
CLIP image encoder.

>>> from diffusers_hyperlora.testing import tiny_sdxl_pipeline, tiny_hyperlora_predictor  # doctest: +SKIP
"""

import importlib
from typing import Any

_EXPORTS = {
    "tiny_clip_tokenizer": ".tiny_models",
    "tiny_sdxl_components": ".tiny_models",
    "tiny_sdxl_pipeline": ".tiny_models",
    "tiny_hyperlora_config": ".tiny_models",
    "tiny_hyperlora_predictor": ".tiny_models",
    "tiny_sd15_components": ".tiny_base_models",
    "tiny_sd15_pipeline": ".tiny_base_models",
    "tiny_sd3_components": ".tiny_base_models",
    "tiny_sd3_pipeline": ".tiny_base_models",
    "tiny_flux_components": ".tiny_base_models",
    "tiny_flux_pipeline": ".tiny_base_models",
    "tiny_t5_tokenizer": ".tiny_base_models",
    "export_tiny_antelopev2": ".tiny_face",
    "draw_face_marker": ".tiny_face",
    "tiny_clip_encoder": ".tiny_face",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusers_hyperlora.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
