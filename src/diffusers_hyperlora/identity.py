"""`HyperLoRAIdentity`: what a prediction returns, small enough to store and exact to merge.

The predictor averages the resampler's output over the images of a person, then L2-normalizes each
coefficient vector (spec 3.3, step 4). Because the mean comes first, an identity keeps the *un-normalized*
mean and the number of images: merging two saved identities then equals predicting from all photos at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import IdentityMismatchError

NORM_EPS = 1e-8


def normalize_coefficients(mean: torch.Tensor) -> torch.Tensor:
    """`t * rsqrt(sum(t^2) + 1e-8)` over the last (basis) dimension, in float32."""
    mean = mean.to(torch.float32)
    return mean * torch.rsqrt(mean.square().sum(-1, keepdim=True) + NORM_EPS)


@dataclass
class HyperLoRAIdentity:
    """Coefficients of one person for one checkpoint.

    Attributes:
        id_mean: `[num_tokens, K]` float32, the mean over images of the ID resampler's output (not normalized).
        num_images: how many images the mean is over.
        base_mean: the same for the Base branch, or `None` (checkpoint without Base, or no Base input).
        checkpoint: `architecture_hash` of the predictor's config.
        probe: a few weights of the predictor, to tell apart checkpoints with the same architecture.
        sources: names of the input images, when known.
    """

    id_mean: torch.Tensor
    num_images: int
    base_mean: torch.Tensor | None = None
    checkpoint: str = ""
    probe: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def id_coefficients(self) -> torch.Tensor:
        """Normalized ID coefficients `[num_tokens, K]` (float32)."""
        return normalize_coefficients(self.id_mean)

    @property
    def base_coefficients(self) -> torch.Tensor | None:
        """Normalized Base coefficients, or `None`."""
        return None if self.base_mean is None else normalize_coefficients(self.base_mean)

    def coefficients(self, branch: str = "id") -> torch.Tensor | None:
        if branch not in ("id", "base"):
            raise ValueError(f"branch must be 'id' or 'base', got {branch!r}.")
        return self.id_coefficients if branch == "id" else self.base_coefficients

    def check_compatible(self, checkpoint: str, probe: torch.Tensor | None) -> None:
        """Raise `IdentityMismatchError` unless this identity was predicted by the given checkpoint."""
        same_probe = (
            self.probe is None
            or probe is None
            or (self.probe.shape == probe.shape and torch.allclose(self.probe.float(), probe.float().cpu(), atol=1e-2))
        )
        if self.checkpoint != checkpoint or not same_probe:
            raise IdentityMismatchError(
                f"This identity was predicted by another HyperLoRA checkpoint (architecture {self.checkpoint!r}, "
                f"loaded: {checkpoint!r}, or different weights). Predict it again from the photos with the loaded "
                "checkpoint."
            )

    @classmethod
    def merge(cls, identities: Sequence[HyperLoRAIdentity]) -> HyperLoRAIdentity:
        """Pool the photos of several identities: equal to predicting from all their images together."""
        if not identities:
            raise ValueError("merge() needs at least one HyperLoRAIdentity.")
        first = identities[0]
        for other in identities[1:]:
            other.check_compatible(first.checkpoint, first.probe)
        total = sum(i.num_images for i in identities)
        id_mean = sum(i.id_mean.float() * i.num_images for i in identities) / total
        has_base = all(i.base_mean is not None for i in identities)
        base_mean = sum(i.base_mean.float() * i.num_images for i in identities) / total if has_base else None
        sources = [s for i in identities for s in i.sources]
        return cls(id_mean, total, base_mean, first.checkpoint, first.probe, sources)

    def to(self, device: torch.device | str) -> HyperLoRAIdentity:
        base = None if self.base_mean is None else self.base_mean.to(device)
        return HyperLoRAIdentity(
            self.id_mean.to(device), self.num_images, base, self.checkpoint, self.probe, list(self.sources)
        )
