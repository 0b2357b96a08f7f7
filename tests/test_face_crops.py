"""Pure geometry and masks of the face pipeline (spec 3.4), on synthetic landmarks, against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusers_hyperlora.face import conditioning
from diffusers_hyperlora.face.crops import (
    FACE_POLYGON_INDICES,
    SquareCrop,
    arcface_crop,
    base_crop_box,
    box_iou,
    clip_crop,
    crop_padded,
    face_polygon,
    polygon_crop,
    scale_polygon,
)

SPEC_ORDER = (
    "1 9 10 11 12 13 14 15 16 2 3 4 5 6 7 8 0 24 23 22 21 20 19 18 32 31 30 29 28 27 26 25 17 "
    "101 105 104 103 102 50 51 49 48 43"
)


def ring_landmarks(cx=60.0, cy=70.0, rx=20.0, ry=30.0, inner=(60.0, 70.0)) -> np.ndarray:
    """106 points: the polygon indices on an ellipse (in polygon order), all others at `inner`."""
    points = np.tile(np.asarray(inner, dtype=np.float64), (106, 1))
    angles = np.linspace(0, 2 * np.pi, len(FACE_POLYGON_INDICES), endpoint=False)
    points[list(FACE_POLYGON_INDICES)] = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1)
    return points


def test_polygon_indices_are_the_spec_order():
    assert FACE_POLYGON_INDICES == tuple(int(i) for i in SPEC_ORDER.split())
    points = np.arange(212, dtype=np.float64).reshape(106, 2)
    polygon = face_polygon(points)
    assert polygon.shape == (43, 2)
    np.testing.assert_array_equal(polygon[:, 0], [2 * i for i in FACE_POLYGON_INDICES])


def test_landmarks_of_wrong_shape_raise():
    with pytest.raises(ValueError, match=r"106 2D face landmarks"):
        face_polygon(np.zeros((5, 2)))


def test_clip_crop_numbers():
    points = np.zeros((106, 2))
    points[:, 0] = np.linspace(100, 140, 106)  # box 40 wide
    points[:, 1] = np.linspace(50, 110, 106)  # 60 tall
    crop = clip_crop(points)
    l = 0.75 * 60
    assert crop.half == pytest.approx(l)
    assert crop.cx == pytest.approx(120.0)
    assert crop.cy == pytest.approx(80.0 - 0.125 * l)
    wide = arcface_crop(crop)
    assert (wide.cx, wide.cy, wide.half) == pytest.approx((crop.cx, crop.cy, 2 * l))


def test_square_box_is_square_and_rounded():
    assert SquareCrop(10.0, 20.0, 5.0).box() == (5, 15, 15, 25)
    assert SquareCrop(10.4, 20.6, 5.2).box() == (5, 15, 15, 25)  # 5.2 -> left 5.2 -> 5, side round(10.4) = 10
    x0, y0, x1, y1 = SquareCrop(-3.3, 7.7, 0.2).box()
    assert x1 - x0 == y1 - y0 == 1


def test_polygon_crop_uses_vertex_mean_and_larger_extent():
    polygon = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 4.0], [0.0, 4.0], [0.0, 2.0]])
    crop = polygon_crop(polygon)
    assert (crop.cx, crop.cy) == pytest.approx((4.0, 2.0))  # vertex mean, not the area centroid
    assert crop.half == pytest.approx(0.8 * 10)
    scaled = scale_polygon(polygon, 1.4)
    np.testing.assert_allclose(scaled.mean(0), polygon.mean(0))
    np.testing.assert_allclose(scaled.max(0) - scaled.min(0), 1.4 * (polygon.max(0) - polygon.min(0)))


def test_base_crop_box_scales_and_clamps():
    crop = SquareCrop(50.0, 40.0, 30.0)
    assert base_crop_box(crop, (200, 200)) == (20, 10, 80, 70)
    assert base_crop_box(crop, (200, 200), (1.0, 2.0, 0.5, 3.0)) == (20, 25, 110, 130)
    assert base_crop_box(crop, (70, 60), 2.0) == (0, 0, 70, 60)
    with pytest.raises(ValueError, match="left, right, top, bottom"):
        base_crop_box(crop, (70, 60), (1.0, 2.0))


def test_crop_padded_pads_black_outside():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = crop_padded(image, (-2, -1, 3, 2))
    assert out.shape == (3, 5, 3)
    assert (out[0] == 0).all() and (out[:, :2] == 0).all()
    np.testing.assert_array_equal(out[1:, 2:], image[0:2, 0:3])
    assert (crop_padded(image, (10, 10, 12, 13)) == 0).all()


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_remove_background_matches_the_recipe():
    image = np.random.default_rng(0).integers(0, 256, (140, 120, 3), dtype=np.uint8)
    landmarks = ring_landmarks()
    out = conditioning.remove_background(image, landmarks)
    # recipe by hand: square crop 0.8 x extent around the vertex mean, mask at 512, blur 15, back, blend on gray
    polygon = landmarks[list(FACE_POLYGON_INDICES)]
    cx, cy = polygon.mean(0)
    half = 0.8 * (polygon.max(0) - polygon.min(0)).max()
    side = int(np.floor(2 * half + 0.5))
    x0, y0 = int(np.floor(cx - half + 0.5)), int(np.floor(cy - half + 0.5))
    from PIL import ImageDraw

    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in polygon], fill=255)
    mask = mask.resize((512, 512), Image.BILINEAR).filter(ImageFilter.GaussianBlur(15))
    mask = mask.resize((side, side), Image.BILINEAR)
    full = np.zeros((140, 120), np.float32)
    full[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side] = (np.asarray(mask, np.float32) / 255)[
        max(-y0, 0) : 140 - y0, max(-x0, 0) : 120 - x0
    ]
    expected = np.floor(image * full[..., None] + 127 * (1 - full[..., None]) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out.mask, full)
    np.testing.assert_array_equal(out.image, expected)
    assert out.image.shape == image.shape
    assert (out.image[:5, :5] == 127).all()  # far from the face: flat #7f7f7f
    np.testing.assert_array_equal(out.image[70, 60], image[70, 60])  # the face centre is kept


def test_blur_face_blurs_inside_and_keeps_outside():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    out = conditioning.blur_face(image, ring_landmarks(80, 80, 20, 25, inner=(80, 80)))
    assert out.image.shape == image.shape
    # outside the scaled polygon's crop nothing changes; inside, noise is smoothed away
    np.testing.assert_array_equal(out.image[:10], image[:10])
    assert out.image[75:85, 75:85].std() < 0.3 * image[75:85, 75:85].std()
    assert out.mask[80, 80] > 0.99 and out.mask[0, 0] == 0
    # the mask covers the polygon scaled by 1.4 about its centroid: 1.4 x 20 = 28 px to the side
    assert out.mask[80, 80 + 24] > 0.5 > out.mask[80, 80 + 36]


def test_remove_background_near_the_border_does_not_fail():
    image = np.full((50, 50, 3), 200, np.uint8)
    out = conditioning.remove_background(image, ring_landmarks(5, 45, 20, 20, inner=(5, 45)))
    assert out.image.shape == image.shape
    assert out.image[45, 5].tolist() == [200, 200, 200]
