"""The CLIP vision encoder: `CLIPVisionModelWithProjection` + its image processor -> `hidden_states[-2]`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..errors import FaceModelsNotFoundError, FeatureShapeError

logger = logging.get_logger(__name__)


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
        path_or_repo: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> CLIPImageEncoder:
        """Load model (safetensors only) and processor from a local folder or Hub repo (and subfolder).

        Example:
            >>> encoder = CLIPImageEncoder.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
        """
        from transformers import CLIPVisionModelWithProjection

        path = os.fspath(path_or_repo)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        options = dict(
            subfolder=subfolder or "",
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only or offline,
            force_download=force_download,
        )
        where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(path, use_safetensors=True, **options)
        except (OSError, ValueError) as error:
            raise FaceModelsNotFoundError(
                f"Could not load the CLIP image encoder from {where}: {str(error).rstrip('.')}. Expected a local "
                "folder or Hub repo with a CLIP vision config.json and model.safetensors (e.g. "
                "'openai/clip-vit-large-patch14'). Fix: download it once online, or pass `image_encoder=` a local "
                "folder or a ready CLIPVisionModelWithProjection."
            ) from error
        return cls(model, _load_processor(path, options, model))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CLIPImageEncoder:
        if self.model.device != torch.device(device) or self.model.dtype != dtype:
            self.model.to(device=device, dtype=dtype)
        return self

    def check_width(self, expected: int, what: str = "this HyperLoRA checkpoint") -> None:
        if self.hidden_size != expected:
            raise FeatureShapeError(
                f"The CLIP image encoder is {self.hidden_size} wide but {what} reads {expected}-wide CLIP features "
                "(HyperLoRAConfig.image_embed_dim). Pass `image_encoder=` the encoder the checkpoint was trained "
                "with (the release: openai/clip-vit-large-patch14, 1024 wide)."
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


def _load_processor(path: str, options: dict, model: Any) -> Any:
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(path, **options)
    except (OSError, ValueError):
        size = int(getattr(model.config, "image_size", 224))
        logger.warning(f"No image processor config next to the CLIP encoder {path!r}: using CLIP's at {size} px.")
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


def is_local_folder(value: str | os.PathLike) -> bool:
    return Path(os.fspath(value)).expanduser().is_dir()
