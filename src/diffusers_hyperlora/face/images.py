"""Turning whatever users pass (files, PIL images of any mode, numpy arrays, torch tensors) into RGB uint8 arrays.

Rules: EXIF orientation is applied; transparency is composited over white; palette, CMYK, grayscale, 1-bit,
16-bit and float images become 8-bit RGB; float inputs must lie in [0, 1] (or [-1, 1], the diffusers tensor
convention); a batch (4-D array or tensor) becomes one image per item; very large images are downscaled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diffusers.utils import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageInputError

logger = logging.get_logger(__name__)

MIN_RECOMMENDED_SIDE = 64
DEFAULT_MAX_SIDE = 2048
_FORMS = (
    "a file path, a PIL image, a numpy array (HxW or HxWxC, uint8/uint16/float in [0, 1]) or a torch tensor "
    "(CxHxW or HxWxC, float in [0, 1] or [-1, 1])"
)


@dataclass
class InputImage:
    """An input as an RGB uint8 array `[H, W, 3]`, with a name for messages (file name or position)."""

    pixels: np.ndarray
    name: str

    @property
    def size(self) -> tuple[int, int]:
        """`(width, height)`."""
        return self.pixels.shape[1], self.pixels.shape[0]


def _error(name: str, problem: str, fix: str = "") -> ImageInputError:
    return ImageInputError(f"Input image {name}: {problem}. Expected {_FORMS}.{(' ' + fix) if fix else ''}")


def pil_to_rgb(image: Image.Image, name: str = "image") -> np.ndarray:
    """Any PIL image -> RGB uint8 array, EXIF orientation applied, alpha composited over white.

    Example:
        >>> from PIL import Image
        >>> pil_to_rgb(Image.new("LA", (2, 1), (0, 0))).tolist()
        [[[255, 255, 255], [255, 255, 255]]]
    """
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # broken EXIF must not make a photo unusable
        logger.warning(f"Input image {name}: could not read its EXIF orientation ({error}); using it as stored.")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(image), name)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.floor(array.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise _error(name, f"integer values from {low} to {high}", "Pass uint8 (0-255) or uint16 (0-65535).")
        scale = 257.0 if high > 255 else 1.0
        return np.floor(array.astype(np.float32) / scale + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise _error(name, "contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
            raise _error(
                name, f"float values from {low:.3g} to {high:.3g}", "Scale floats to [0, 1], or pass uint8 pixels."
            )
        if low < 0:
            array = (array + 1.0) / 2.0  # diffusers' [-1, 1] tensor convention
        return np.floor(np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise _error(name, f"unsupported dtype {array.dtype}")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.size == 0:
        raise _error(name, f"it is empty (shape {list(array.shape)})")
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise _error(name, f"shape {list(array.shape)} is not an image (1, 2, 3 or 4 channels)")
    array = _to_uint8(array, name)
    channels = array.shape[-1]
    if channels in (2, 4):  # gray+alpha / RGBA: composite over white
        alpha = array[..., -1:].astype(np.float32) / 255.0
        color = array[..., :-1].astype(np.float32)
        array = np.floor(color * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _open(path: str | os.PathLike) -> Image.Image:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImageInputError(
            f"Input image {str(path)!r} does not exist or is not a file. Pass an existing image file, or {_FORMS}."
        )
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.DecompressionBombError as error:  # not an OSError: PIL refuses it from the header
        raise ImageInputError(
            f"Input image {str(path)!r} is too large to decode safely ({error}). Downscale it (a face needs about "
            "1000 px) and try again.",
            argument="images",
        ) from error
    except (UnidentifiedImageError, OSError) as error:
        raise ImageInputError(
            f"Input image {str(path)!r} could not be read as an image ({error}). Pass a JPEG/PNG/WebP file, or "
            f"{_FORMS}."
        ) from error


def check_pixel_count(path: str | os.PathLike, max_pixels: int) -> tuple[int, int] | None:
    """`(width, height)` of the image file `path` read from its header alone (nothing is decoded), or `None` when
    it is not a readable image file (`load_image` says why). Raises `ImageInputError` when the image has more than
    `max_pixels` pixels, before memory and time are spent decoding it (a 12000x12000 PNG decodes to 430 MB).

    Example:
        >>> check_pixel_count("photo_300x200.png", max_pixels=100_000)  # doctest: +SKIP
        (300, 200)
    """
    name = Path(path).name
    try:
        with Image.open(path) as image:  # PIL reads the header only, and refuses decompression bombs itself
            width, height = image.size
    except Image.DecompressionBombError:
        width = height = None
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    if width is None or width * height > max_pixels:
        size = f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP"
        if width is not None:
            size = f"{width}x{height} pixels ({width * height / 1e6:.0f} MP)"
        raise ImageInputError(
            f"Input image {name} is {size}; at most {max_pixels / 1e6:g} MP are accepted. Downscale it (a face "
            "needs about 1000 px) and try again.",
            argument="images",
        )
    return width, height


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def expand_inputs(images: Any) -> list[tuple[Any, str]]:
    """Flatten one image / a list / a batch (4-D array or tensor) into `(image, name)` pairs."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageInputError(f"No input images: pass one image or a non-empty list, each {_FORMS}.")
    pairs: list[tuple[Any, str]] = []
    for position, item in enumerate(items):
        if _is_torch(item):
            item = item.detach().float().cpu().numpy() if item.is_floating_point() else item.detach().cpu().numpy()
        if isinstance(item, np.ndarray) and item.ndim == 4:
            pairs += [(sub, f"#{position}[{k}]") for k, sub in enumerate(item)]
        elif isinstance(item, (str, os.PathLike)):
            pairs.append((item, Path(item).name))
        else:
            pairs.append((item, f"#{position}"))
    return pairs


def load_image(image: Any, name: str = "image", max_side: int | None = DEFAULT_MAX_SIDE) -> InputImage:
    """One input (path, PIL, numpy, torch) -> `InputImage` (RGB uint8), downscaled if its longer side > max_side.

    Example:
        >>> import numpy as np
        >>> load_image(np.zeros((3, 8, 8), np.float32)).pixels.shape
        (8, 8, 3)
    """
    if isinstance(image, (str, os.PathLike)):
        pixels = pil_to_rgb(_open(image), name)
    elif isinstance(image, Image.Image):
        pixels = pil_to_rgb(image, name)
    elif _is_torch(image):
        pixels = _array_to_rgb(image.detach().float().cpu().numpy(), name)
    elif isinstance(image, np.ndarray):
        pixels = _array_to_rgb(image, name)
    else:
        raise _error(name, f"got a {type(image).__name__}")
    return InputImage(_limit_size(pixels, name, max_side), name)


def _limit_size(pixels: np.ndarray, name: str, max_side: int | None) -> np.ndarray:
    height, width = pixels.shape[:2]
    if min(height, width) < MIN_RECOMMENDED_SIDE:
        logger.warning(
            f"Input image {name} is only {width}x{height} px: a face may not be detected. Use a photo whose face "
            "is at least ~100 px tall."
        )
    if max_side is None or max(height, width) <= max_side:
        return pixels
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    logger.info(f"Input image {name} is {width}x{height} px: downscaled to {size[0]}x{size[1]} for face analysis.")
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


def load_images(images: Any, max_side: int | None = DEFAULT_MAX_SIDE) -> list[InputImage]:
    """Every input as an `InputImage`; see `load_image` for what is accepted."""
    return [load_image(item, name, max_side) for item, name in expand_inputs(images)]
