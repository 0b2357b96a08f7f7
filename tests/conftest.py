"""Shared fixtures: tiny SDXL pipelines and tiny HyperLoRA predictors, all built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers_hyperlora  # noqa: E402,F401  (installs the pipeline methods)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_components, tiny_sdxl_pipeline  # noqa: E402

OFFICIAL_TINY = Path(__file__).resolve().parent / "fixtures" / "official-tiny"  # see its README.md


@pytest.fixture
def pipe():
    """A fresh tiny StableDiffusionXLPipeline (float32, CPU)."""
    return tiny_sdxl_pipeline()


@pytest.fixture
def components():
    return tiny_sdxl_components()


@pytest.fixture
def predictor():
    """A random tiny predictor for the tiny SDXL UNet (the official-tiny architecture)."""
    return tiny_hyperlora_predictor(seed=0)


@pytest.fixture
def official_tiny() -> Path:
    """The reference checkpoint and the official implementation's output for it (tests/fixtures/official-tiny)."""
    return OFFICIAL_TINY


def unet_inputs(seed: int = 0, batch: int = 1):
    """Deterministic inputs for the tiny SDXL UNet."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 7, 64, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        },
    )


@torch.no_grad()
def unet_output(unet, seed: int = 0) -> torch.Tensor:
    return unet(**unet_inputs(seed)).sample


def random_features(batch: int = 2, seed: int = 0, tokens: int = 17, width: int = 48):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.nn.functional.normalize(torch.randn(batch, 512, generator=g), dim=-1)
    return embeds, torch.randn(batch, tokens, width, generator=g)
