"""Shared fixtures: tiny SDXL pipelines and tiny HyperLoRA predictors, all built in code."""

from __future__ import annotations

import os
from pathlib import Path

import diffusers
import pytest
import torch
from packaging.version import Version

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


# diffusers before 0.41 builds every group-offloading hook for the current accelerator
# (`getattr(torch, torch.accelerator.current_accelerator().type)` in `ModuleGroup.__init__`): on a torch that has
# `torch.accelerator` but no accelerator (the CPU builds, torch >= 2.6), `enable_group_offload` raises AttributeError
# before it registers any hook, so group offloading cannot be enabled there at all.
GROUP_OFFLOAD_NEEDS_ACCELERATOR = (
    Version(diffusers.__version__).release < (0, 41)
    and hasattr(torch, "accelerator")
    and torch.accelerator.current_accelerator() is None
)


def enable_group_offload(unet: torch.nn.Module) -> bool:
    """Enable diffusers' group offloading on `unet` (leaf level, on and offloaded to the CPU); True when it is on.

    Where this diffusers cannot (GROUP_OFFLOAD_NEEDS_ACCELERATOR), checks that the attempt fails as described there and
    leaves every weight of `unet` where and as it was, and returns False.
    """
    cpu = torch.device("cpu")
    if not GROUP_OFFLOAD_NEEDS_ACCELERATOR:
        unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
        return True
    before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'type'"):
        unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    return False
