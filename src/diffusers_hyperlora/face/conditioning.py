"""Background removal and the blurred-face Base image (docs/face.md, "The steps"). Numpy / PIL only, no models.

Both follow the same recipe: a square crop around the face polygon, a filled polygon mask softened at a fixed
working resolution (resized to 512, Gaussian-blurred, resized back), and a blend pasted back into the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .crops import (
    BACKGROUND_CROP_SCALE,
    BASE_FACE_SCALE,
    crop_padded,
    face_polygon,
    polygon_crop,
    scale_polygon,
)

WORK_SIZE = 512  # masks and blurs are computed at this resolution
MASK_BLUR_RADIUS = 15
FACE_BLUR_RADIUS = 45
BACKGROUND_GRAY = 127  # #7f7f7f


@dataclass
class Composite:
    """A full-size result image (RGB uint8) and the soft mask `[H, W]` in [0, 1] that selected the face."""

    image: np.ndarray
    mask: np.ndarray


def polygon_mask(polygon: np.ndarray, box: tuple[int, int, int, int]) -> Image.Image:
    """A binary `L` mask of the box's size: 255 inside the polygon (given in image coordinates)."""
    x0, y0, x1, y1 = box
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).polygon([(float(x) - x0, float(y) - y0) for x, y in polygon], fill=255)
    return mask


def blur_at_work_size(image: Image.Image, radius: float, work_size: int = WORK_SIZE) -> Image.Image:
    """Resize to `work_size` square, Gaussian blur (`radius` = sigma, as PIL), resize back to the original size."""
    size = image.size
    small = image.resize((work_size, work_size), Image.BILINEAR)
    return small.filter(ImageFilter.GaussianBlur(radius)).resize(size, Image.BILINEAR)


def _paste(target: np.ndarray, patch: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Write `patch` (the content of `box`) into `target`, dropping what falls outside."""
    x0, y0, x1, y1 = box
    height, width = target.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        target[sy0:sy1, sx0:sx1] = patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]


def soft_face_mask(image_shape: tuple[int, ...], polygon: np.ndarray, crop_scale: float) -> np.ndarray:
    """Full-size soft mask `[H, W]` float32 in [0, 1] of `polygon`, softened in its square crop."""
    box = polygon_crop(polygon, crop_scale).box()
    soft = blur_at_work_size(polygon_mask(polygon, box), MASK_BLUR_RADIUS)
    mask = np.zeros(image_shape[:2], dtype=np.float32)
    _paste(mask, np.asarray(soft, dtype=np.float32) / 255.0, box)
    return mask


def _blend(front: np.ndarray, back: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mixed = front.astype(np.float32) * mask[..., None] + back.astype(np.float32) * (1.0 - mask[..., None])
    return np.clip(np.floor(mixed + 0.5), 0, 255).astype(np.uint8)


def remove_background(image: np.ndarray, landmarks: np.ndarray) -> Composite:
    """The face (polygon through the 2D-106 outline, soft edge) over a flat `#7f7f7f` canvas of the image's size.

    Example:
        >>> import numpy as np
        >>> from diffusers_hyperlora.face.crops import FACE_POLYGON_INDICES
        >>> points = np.full((106, 2), 50.0)
        >>> ring = np.stack([50 + 30 * np.cos(np.linspace(0, 6.2, 43)), 50 + 30 * np.sin(np.linspace(0, 6.2, 43))], 1)
        >>> points[list(FACE_POLYGON_INDICES)] = ring
        >>> out = remove_background(np.full((100, 100, 3), 200, np.uint8), points)
        >>> out.image[50, 50].tolist(), out.image[0, 0].tolist()
        ([200, 200, 200], [127, 127, 127])
    """
    polygon = face_polygon(landmarks)
    mask = soft_face_mask(image.shape, polygon, BACKGROUND_CROP_SCALE)
    canvas = np.full_like(image, BACKGROUND_GRAY)
    return Composite(_blend(image, canvas, mask), mask)


def blur_face(image: np.ndarray, landmarks: np.ndarray, face_scale: float = BASE_FACE_SCALE) -> Composite:
    """The Base-branch input: the face region (polygon scaled 1.4) replaced by a heavily blurred copy.

    The blurred copy is the square crop around the scaled polygon resized to 512, blurred with radius 45 and
    resized back; the mask is the scaled polygon softened with radius 15 the same way.
    """
    polygon = scale_polygon(face_polygon(landmarks), face_scale)
    crop = polygon_crop(polygon, BACKGROUND_CROP_SCALE)
    box = crop.box()
    blurred_crop = blur_at_work_size(Image.fromarray(crop_padded(image, box)), FACE_BLUR_RADIUS)
    blurred = image.copy()
    _paste(blurred, np.asarray(blurred_crop), box)
    mask = soft_face_mask(image.shape, polygon, BACKGROUND_CROP_SCALE)
    return Composite(_blend(blurred, image, mask), mask)
