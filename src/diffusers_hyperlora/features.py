"""What the encoders hand to the predictor, and the interface of anything that computes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class HyperLoRAFeatures:
    """Encoder outputs for B images of one person.

    Attributes:
        id_embeds: normed ArcFace embeddings `[B, 512]`, or `None` for checkpoints without that condition.
        clip_hidden_states: CLIP vision `hidden_states[-2]` of the face crops, `[B, T, E]`.
        base_clip_hidden_states: the same for the face-blurred images (Base branch), or `None`.
        sources: a name for each image that was used (file name or position).
    """

    id_embeds: torch.Tensor | None
    clip_hidden_states: torch.Tensor | None
    base_clip_hidden_states: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Turns images into `HyperLoRAFeatures`. The face pipeline implements it; tests and users may plug in others.

    `images` is a list of PIL images, numpy arrays, torch tensors or file paths.
    """

    def __call__(
        self, images: list[Any], *, device: torch.device, dtype: torch.dtype, with_base: bool
    ) -> HyperLoRAFeatures: ...
