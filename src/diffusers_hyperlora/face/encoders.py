"""The CLIP vision encoder: `CLIPVisionModelWithProjection` + its image processor -> `hidden_states[-2]`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..errors import FaceModelsNotFoundError, FeatureShapeError
from ..io.hub import HubOptions, Location, resolve_location

logger = logging.get_logger(__name__)

# The files of a CLIP vision model (single or sharded safetensors weights; never pickles).
CLIP_FILES = (
    "config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
    "model-*-of-*.safetensors",
)  # fmt: skip


def default_clip_processor(image_size: int = 224) -> Any:
    """CLIP's standard preprocessing (resize the short side, centre crop, CLIP mean/std) at `image_size`."""
    from transformers import CLIPImageProcessor

    try:
        import torchvision  # noqa: F401
    except ImportError:
        try:  # transformers 5 without torchvision: the PIL backend, without its fallback warning
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # noqa: N814
        except ImportError:
            pass
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class CLIPImageEncoder:
    """A CLIP vision model with its processor; `hidden_states(images, ...)` gives `[B, T, E]` (layer -2).

    Args:
        model: a `CLIPVisionModelWithProjection` (or any vision model returning `hidden_states`).
        processor: its image processor (default: CLIP's at the model's `image_size`).

    Example:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        >>> from PIL import Image
        >>> config = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        ...                           num_attention_heads=2, image_size=16, patch_size=8)
        >>> encoder = CLIPImageEncoder(CLIPVisionModelWithProjection(config))
        >>> encoder.hidden_states([Image.new("RGB", (20, 20))]).shape
        torch.Size([1, 5, 8])
    """

    def __init__(self, model: Any, processor: Any = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor if processor is not None else default_clip_processor(self.image_size)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(getattr(self.model.config, "image_size", 224))

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike | Location,
        hub_options: HubOptions | Mapping[str, Any] | None = None,
        **hub_kwargs: Any,
    ) -> CLIPImageEncoder:
        """Load model (safetensors only) and processor from a local folder or a Hub repo (`"org/name[/folder]"`).

        `hub_options` (a `HubOptions` or a dict of its fields) and the keywords `subfolder`, `revision`, `token`,
        `cache_dir`, `local_files_only`, `force_download` say where; `diffusers_hyperlora.io.resolve_location`
        finds the files (docs/loading.md).

        Example:
            >>> encoder = CLIPImageEncoder.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
        """
        from transformers import CLIPVisionModelWithProjection

        where = repr(os.fspath(path_or_repo)) if not isinstance(path_or_repo, Location) else path_or_repo.name
        try:
            location = resolve_location(path_or_repo, HubOptions.of(hub_options, **hub_kwargs))
            where = location.name
            folder = location.folder(CLIP_FILES, what="its files")  # the message below names the encoder once
            model = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise FaceModelsNotFoundError(
                f"Could not load the CLIP image encoder from {where}: {str(error).rstrip('.')}. Expected a local "
                "folder or Hub repo with a CLIP vision config.json and model.safetensors (e.g. "
                "'openai/clip-vit-large-patch14'). Fix: download it once online, or pass `image_encoder=` a local "
                "folder or a ready CLIPVisionModelWithProjection.",
                argument="image_encoder",
            ) from error
        return cls(model, _load_processor(folder, model))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CLIPImageEncoder:
        if self.model.device != torch.device(device) or self.model.dtype != dtype:
            self.model.to(device=device, dtype=dtype)
        return self

    def check_width(self, expected: int, what: str = "this HyperLoRA checkpoint") -> None:
        if self.hidden_size != expected:
            raise FeatureShapeError(
                f"The CLIP image encoder is {self.hidden_size} wide but {what} reads {expected}-wide CLIP features "
                "(HyperLoRAConfig.image_embed_dim). Pass `image_encoder=` the encoder the checkpoint was trained "
                "with (the release: openai/clip-vit-large-patch14, 1024 wide).",
                argument="image_encoder",
            )

    def pixel_values(self, images: list[Any]) -> torch.Tensor:
        return torch.as_tensor(self.processor(images=images, return_tensors="pt")["pixel_values"])

    @torch.no_grad()
    def hidden_states(
        self, images: list[Any], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """`hidden_states[-2]` of the images (PIL), on `device` in `dtype` (default: the model's).

        The model computes in its own dtype and the result is cast: an encoder shared with another pipeline is
        never converted (only moved to `device` when it is elsewhere).
        """
        if device is not None:
            self.to(device, self.model.dtype)
        pixels = self.pixel_values(images).to(device=self.model.device, dtype=self.model.dtype)
        states = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return states if dtype is None else states.to(dtype)


def _load_processor(folder: Path, model: Any) -> Any:
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(folder)
    except (OSError, ValueError):
        size = int(getattr(model.config, "image_size", 224))
        logger.warning(f"No image processor config in the CLIP encoder's folder {str(folder)!r}: CLIP's at {size} px.")
        return default_clip_processor(size)


def as_image_encoder(value: Any) -> CLIPImageEncoder | None:
    """A ready encoder from `value` (a `CLIPImageEncoder`, a model, or `(model, processor)`), else `None`."""
    if isinstance(value, CLIPImageEncoder):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], torch.nn.Module):
        return CLIPImageEncoder(value[0], value[1])
    if isinstance(value, torch.nn.Module):
        return CLIPImageEncoder(value)
    return None
