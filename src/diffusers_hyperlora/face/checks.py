"""Sanity checks on what a face analyzer returns, before any crop is computed from it.

A plug-in analyzer (or a damaged model) can return NaN boxes, landmarks or embeddings, or coordinates nowhere
near the image. Each is reported as a `NonFiniteValueError` / `ImageInputError` naming the photo, instead of
NaN LoRA weights or a raw `cannot convert float NaN to integer` from deep inside the crop code.
"""

from __future__ import annotations

import numpy as np

from ..errors import ImageInputError, NonFiniteValueError

_FIX = "the face analyzer returned unusable values; check the face models (or your plug-in analyzer)"


def _require_finite(values: np.ndarray | None, what: str, name: str) -> None:
    if values is not None and not np.isfinite(np.asarray(values, dtype=np.float64)).all():
        raise NonFiniteValueError(f"Input image {name}: the face's {what} holds NaN/infinite values; {_FIX}.")


def check_face_geometry(bbox: np.ndarray, landmarks: np.ndarray | None, size: tuple[int, int], name: str) -> None:
    """Raise unless the box and landmarks are finite and lie on the image (`size` is `(width, height)`).

    Landmarks may stick out of the image a little (a face at the border), but not by more than the image's size.
    """
    _require_finite(bbox, "box", name)
    _require_finite(landmarks, "landmarks", name)
    width, height = size
    x0, y0, x1, y1 = (float(v) for v in np.asarray(bbox).reshape(-1)[:4])
    if not (x1 > x0 and y1 > y0 and x1 > 0 and y1 > 0 and x0 < width and y0 < height):
        raise ImageInputError(
            f"Input image {name}: the face box {[round(v, 1) for v in (x0, y0, x1, y1)]} is empty or outside the "
            f"{width}x{height} image; {_FIX}."
        )
    if landmarks is not None:
        points = np.asarray(landmarks, dtype=np.float64)
        low, high = points.min(axis=0), points.max(axis=0)
        if (low < (-width, -height)).any() or (high > (2 * width, 2 * height)).any():
            raise ImageInputError(
                f"Input image {name}: the face landmarks span {low.round(1).tolist()} to {high.round(1).tolist()}, "
                f"far outside the {width}x{height} image; {_FIX}."
            )


def check_embedding(embedding: np.ndarray | None, name: str) -> None:
    """Raise unless the ArcFace embedding is finite and not all zero."""
    if embedding is None:
        return
    _require_finite(embedding, "ArcFace embedding (`normed_embedding`)", name)
    if not np.any(np.asarray(embedding)):
        raise NonFiniteValueError(f"Input image {name}: the face's ArcFace embedding is all zeros; {_FIX}.")
