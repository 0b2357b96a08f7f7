"""Pure crop geometry of the face pipeline (docs/face.md, "The steps"): no models, no files, exact and testable.

Coordinates are image pixels, x to the right, y down; a box is `(x0, y0, x1, y1)` with `x1`/`y1` exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ImageInputError, InvalidArgumentError

# The 2D-106 landmark indices of the face outline: jaw contour, then the eyebrows back across the top.
FACE_POLYGON_INDICES: tuple[int, ...] = (
    1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0, 24, 23, 22, 21, 20, 19, 18,
    32, 31, 30, 29, 28, 27, 26, 25, 17, 101, 105, 104, 103, 102, 50, 51, 49, 48, 43,
)  # fmt: skip
BACKGROUND_CROP_SCALE = 0.8  # half-side of the background-removal crop / the polygon's larger extent
CLIP_CROP_SCALE = 0.75  # half-side l of the CLIP crop / the larger extent of the 106-landmark box
CLIP_CROP_SHIFT = 0.125  # the CLIP crop centre moves up by this times l
ARCFACE_CROP_SCALE = 2.0  # half-side of the ArcFace crop, in units of l
BASE_FACE_SCALE = 1.4  # the Base branch blurs the polygon scaled by this about its centroid


@dataclass(frozen=True)
class SquareCrop:
    """A square `[cx - half, cx + half] x [cy - half, cy + half]`, in float pixels."""

    cx: float
    cy: float
    half: float

    def box(self) -> tuple[int, int, int, int]:
        """The integer box: left/top rounded half up, side `round(2 * half)` (at least 1 px), so always square."""
        side = max(1, int(np.floor(2 * self.half + 0.5)))
        x0 = int(np.floor(self.cx - self.half + 0.5))
        y0 = int(np.floor(self.cy - self.half + 0.5))
        return x0, y0, x0 + side, y0 + side

    def scaled(self, factor: float) -> SquareCrop:
        return SquareCrop(self.cx, self.cy, self.half * factor)


def _points(landmarks: np.ndarray, minimum: int = 106) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < minimum:
        raise InvalidArgumentError(
            f"Expected {minimum} 2D face landmarks of shape [{minimum}, 2] (insightface's landmark_2d_106), "
            f"got shape {list(points.shape)}.",
            argument="landmarks",
        )
    return points


def face_polygon(landmarks: np.ndarray) -> np.ndarray:
    """The face outline `[43, 2]`: the 2D-106 landmarks at `FACE_POLYGON_INDICES`, in that order.

    Example:
        >>> import numpy as np
        >>> face_polygon(np.arange(212, dtype=float).reshape(106, 2))[0].tolist()
        [2.0, 3.0]
    """
    return _points(landmarks)[list(FACE_POLYGON_INDICES)]


def polygon_centroid(polygon: np.ndarray) -> np.ndarray:
    """The mean of the polygon's vertices `[2]` (the reference's "centroid")."""
    return np.asarray(polygon, dtype=np.float64).mean(0)


def scale_polygon(polygon: np.ndarray, factor: float) -> np.ndarray:
    """The polygon scaled by `factor` about its centroid."""
    polygon = np.asarray(polygon, dtype=np.float64)
    centroid = polygon_centroid(polygon)
    return centroid + (polygon - centroid) * factor


def polygon_crop(polygon: np.ndarray, scale: float = BACKGROUND_CROP_SCALE) -> SquareCrop:
    """Square around the polygon's centroid, half-side `scale` x the larger extent of the polygon's box.

    Example:
        >>> polygon_crop(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 4.0], [0.0, 4.0]]))
        SquareCrop(cx=5.0, cy=2.0, half=8.0)
    """
    polygon = np.asarray(polygon, dtype=np.float64)
    cx, cy = polygon_centroid(polygon)
    extent = float((polygon.max(0) - polygon.min(0)).max())
    return SquareCrop(float(cx), float(cy), scale * extent)


def clip_crop(landmarks: np.ndarray) -> SquareCrop:
    """The CLIP crop: around the box of all 106 landmarks, `l = 0.75 * max(w, h)`, centre moved up by `l / 8`.

    Example:
        >>> points = np.zeros((106, 2)); points[1] = (40.0, 80.0)
        >>> clip_crop(points)
        SquareCrop(cx=20.0, cy=32.5, half=60.0)
    """
    points = _points(landmarks)
    low, high = points.min(0), points.max(0)
    half = CLIP_CROP_SCALE * float((high - low).max())
    cx, cy = (low + high) / 2
    return SquareCrop(float(cx), float(cy) - CLIP_CROP_SHIFT * half, half)


def arcface_crop(clip: SquareCrop) -> SquareCrop:
    """The ArcFace crop: the CLIP crop's centre, half-side `2 l`."""
    return clip.scaled(ARCFACE_CROP_SCALE)


def base_crop_box(
    clip: SquareCrop, image_size: tuple[int, int], scales: float | Sequence[float] = 1.0
) -> tuple[int, int, int, int]:
    """The Base-branch crop: `l * (left, right, top, bottom)` around the CLIP-crop centre, clamped to the image.

    Args:
        clip: the CLIP crop (its centre and `l`).
        image_size: `(width, height)`.
        scales: one factor for all four sides, or `(left, right, top, bottom)`.

    Example:
        >>> base_crop_box(SquareCrop(50.0, 40.0, 30.0), (90, 100), (1.0, 2.0, 1.0, 3.0))
        (20, 10, 90, 100)
    """
    left, right, top, bottom = _four(scales)
    width, height = image_size
    x0 = max(0, int(np.floor(clip.cx - left * clip.half + 0.5)))
    x1 = min(width, int(np.floor(clip.cx + right * clip.half + 0.5)))
    y0 = max(0, int(np.floor(clip.cy - top * clip.half + 0.5)))
    y1 = min(height, int(np.floor(clip.cy + bottom * clip.half + 0.5)))
    if x1 <= x0 or y1 <= y0:
        raise ImageInputError(
            f"The Base crop {(x0, y0, x1, y1)} of a {width}x{height} image is empty: the face lies outside the image. "
            "Use a photo where the whole face is visible."
        )
    return x0, y0, x1, y1


def _four(scales: float | Sequence[float]) -> tuple[float, float, float, float]:
    if isinstance(scales, (int, float)):
        values = (float(scales),) * 4
    else:
        values = tuple(float(s) for s in scales)
    if len(values) != 4 or min(values) <= 0:
        raise InvalidArgumentError(
            f"base_crop_scale must be a positive number or four positive numbers (left, right, top, bottom), "
            f"got {scales!r}.",
            argument="base_crop_scale",
        )
    return values  # type: ignore[return-value]


def crop_padded(image: np.ndarray, box: tuple[int, int, int, int], fill: int = 0) -> np.ndarray:
    """`image[y0:y1, x0:x1]` where the part outside the image is `fill` (black by default).

    Example:
        >>> crop_padded(np.full((2, 2), 9, np.uint8), (-1, 0, 2, 1)).tolist()
        [[0, 9, 9]]
    """
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    out = np.full((y1 - y0, x1 - x0, *image.shape[2:]), fill, dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def box_area(box: Sequence[float]) -> float:
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when they do not overlap).

    Example:
        >>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))
        0.3333333333333333
    """
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def shift_box(box: Sequence[float], dx: float, dy: float, scale: float = 1.0) -> tuple[float, float, float, float]:
    """`(box - (dx, dy)) * scale`: a box in the frame of a crop whose top-left is `(dx, dy)`, resized by `scale`."""
    return tuple(float(v) for v in ((box[0] - dx) * scale, (box[1] - dy) * scale,
                                    (box[2] - dx) * scale, (box[3] - dy) * scale))  # fmt: skip
