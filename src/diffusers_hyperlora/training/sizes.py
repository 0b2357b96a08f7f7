"""Sizes that follow the base model: a fresh predictor's architecture and the training resolution.

The public release's sizes (`HyperLoRAConfig`'s defaults: K = 128 bases, a 1024-wide resampler of depth 4, 16
query tokens) fit SDXL. A smaller UNet (the tiny test pipeline, a distilled model) gets a proportionally smaller
predictor, so a toy run takes seconds and writes kilobytes instead of hundreds of megabytes.

Example:
    >>> from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline
    >>> pipe = tiny_sdxl_pipeline()
    >>> default_resolution(pipe)
    64
    >>> config = fresh_predictor_config(pipe.unet, image_embed_dim=48)
    >>> config.num_basis, config.resampler_dim, config.resampler_depth, config.num_id_tokens
    (8, 32, 2, 4)
"""

from __future__ import annotations

from typing import Any

from ..errors import TrainingConfigError
from ..model.config import HyperLoRAConfig
from ..model.targets import denoiser_layout, targets_from_unet
from .families import pipeline_denoiser

SDXL_CROSS_ATTENTION_DIM = 2048
"""UNets at least this wide in cross-attention get the release's predictor sizes."""


def predictor_sizes(unet: Any) -> dict[str, int]:
    """The architecture numbers of a fresh predictor for `unet` (`HyperLoRAConfig` fields).

    SDXL-sized UNets (cross-attention width >= 2048) get the release's sizes; smaller ones a resampler half their
    cross-attention width (at least 32), depth 2, 4 query tokens and K = 8 bases (the tiny fixture's sizes for the
    tiny test UNet).
    """
    width = _cross_attention_dim(unet)
    if width >= SDXL_CROSS_ATTENTION_DIM:
        defaults = HyperLoRAConfig()
        names = ("num_basis", "resampler_dim", "resampler_depth", "num_id_tokens")
        return {name: getattr(defaults, name) for name in names}
    return {"num_basis": 8, "resampler_dim": max(32, width // 2), "resampler_depth": 2, "num_id_tokens": 4}


def fresh_predictor_config(unet: Any, **overrides: Any) -> HyperLoRAConfig:
    """A `HyperLoRAConfig` targeting the denoiser `unet` with `predictor_sizes(unet)`; `overrides` set any field
    (e.g. `image_embed_dim=` the CLIP width of the cached features, `base_rank=4`, `num_basis=`).

    A transformer (SD3, FLUX) gets the release's sizes (`HyperLoRAConfig`'s defaults) on its attention modules
    (`HyperLoRAConfig.from_denoiser`)."""
    if denoiser_layout(unet).component != "unet":
        return HyperLoRAConfig.from_denoiser(unet, **overrides)
    values: dict[str, Any] = {"targets": targets_from_unet(unet), **predictor_sizes(unet)}
    values.update(overrides)
    return HyperLoRAConfig(**values)


def default_resolution(pipe: Any) -> int:
    """The base model's native image size: the denoiser's `sample_size` (else the pipeline's
    `default_sample_size`, as FLUX's) times the VAE's downscaling (SDXL, SD3, FLUX: 1024)."""
    denoiser = pipeline_denoiser(pipe)
    vae = getattr(pipe, "vae", None)
    sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if sample_size is None:
        sample_size = getattr(pipe, "default_sample_size", None)
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    if isinstance(sample_size, (tuple, list)):
        sample_size = max(sample_size)
    if not isinstance(sample_size, int) or not blocks:
        raise TrainingConfigError(
            "Could not tell the base model's native resolution (no `sample_size` in the denoiser's config, or no "
            "VAE); give the dataset a resolution: `HyperLoRATrainingDataset(..., resolution=1024)`.",
            argument="resolution",
        )
    return sample_size * 2 ** (len(blocks) - 1)


def _cross_attention_dim(unet: Any) -> int:
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if isinstance(width, (tuple, list)):
        width = max(width)
    if not isinstance(width, int):
        raise TrainingConfigError(
            "The UNet has no `config.cross_attention_dim`: give the predictor's sizes explicitly "
            "(`HyperLoRAConfig(...)`).",
            argument="unet",
        )
    return width


__all__ = ["SDXL_CROSS_ATTENTION_DIM", "default_resolution", "fresh_predictor_config", "predictor_sizes"]
