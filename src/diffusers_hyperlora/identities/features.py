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

    Example:
        >>> import torch
        >>> features = HyperLoRAFeatures(
        ...     id_embeds=torch.nn.functional.normalize(torch.randn(2, 512), dim=-1),
        ...     clip_hidden_states=torch.randn(2, 257, 1024),  # CLIP ViT-L/14 hidden_states[-2]
        ...     sources=["me1.jpg", "me2.jpg"],
        ... )
        >>> features.clip_hidden_states.shape[0]
        2
    """

    id_embeds: torch.Tensor | None
    clip_hidden_states: torch.Tensor | None
    base_clip_hidden_states: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Turns images into `HyperLoRAFeatures`. The face pipeline implements it; tests and users may plug in others.

    `images` is a list of PIL images, numpy arrays, torch tensors or file paths. Pass one to
    `load_hyperlora(..., feature_extractor=...)` to replace the face pipeline, e.g. with precomputed features.

    Example:
        >>> import torch
        >>> class Precomputed:
        ...     def __init__(self, table):  # {file name: (arcface [512], clip [T, E])}
        ...         self.table = table
        ...     def __call__(self, images, *, device, dtype, with_base, **options):
        ...         arcface = torch.stack([self.table[i][0] for i in images]).to(device, dtype)
        ...         clip = torch.stack([self.table[i][1] for i in images]).to(device, dtype)
        ...         return HyperLoRAFeatures(arcface, clip, None, list(images))
        >>> extractor = Precomputed({"me.jpg": (torch.randn(512), torch.randn(17, 48))})
        >>> isinstance(extractor, FeatureExtractor)
        True
        >>> extractor(["me.jpg"], device="cpu", dtype=torch.float32, with_base=False).id_embeds.shape
        torch.Size([1, 512])
    """

    def __call__(
        self, images: list[Any], *, device: torch.device, dtype: torch.dtype, with_base: bool
    ) -> HyperLoRAFeatures: ...
