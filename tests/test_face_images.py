"""Input normalization: every kind of image users upload becomes the right RGB uint8 array, or a clear error."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_hyperlora.errors import ImageInputError
from diffusers_hyperlora.face.images import expand_inputs, load_image, load_images, pil_to_rgb


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(str(path), "rotated.jpg")
    assert loaded.pixels.shape == (40, 20, 3)  # displayed upright: portrait
    assert loaded.pixels[:18].mean() > 200 and loaded.pixels[22:].mean() < 50  # white half on top


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), [255, 255, 255]),  # transparent -> white
        (Image.new("RGBA", (3, 2), (10, 20, 30, 255)), [10, 20, 30]),
        (Image.new("LA", (3, 2), (100, 255)), [100, 100, 100]),
        (Image.new("L", (3, 2), 77), [77, 77, 77]),
        (Image.new("1", (3, 2), 1), [255, 255, 255]),
        (Image.new("RGB", (3, 2), (51, 102, 153)).convert("P"), [51, 102, 153]),  # a web-palette colour
    ],
)
def test_pil_modes(image, expected):
    out = pil_to_rgb(image)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == expected


def test_cmyk_and_palette_with_transparency():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert pil_to_rgb(cmyk)[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([9, 8, 7] + [0] * 765)
    palette.info["transparency"] = 0
    assert pil_to_rgb(palette)[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    out = load_image(values).pixels
    assert out[..., 0].tolist() == [[0, 100], [255, 200]]
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    from_file = load_image(path).pixels
    assert from_file[..., 1].tolist() == [[0, 100], [255, 200]]
    rgb16 = np.stack([values, values // 2, values * 0], -1)
    assert load_image(rgb16).pixels[1, 0].tolist() == [255, 127, 0]


def test_float_arrays_and_tensors():
    array = np.full((4, 5, 3), 0.5, np.float32)
    assert load_image(array).pixels[0, 0].tolist() == [128, 128, 128]
    chw = torch.zeros(3, 4, 5)
    chw[0] = 1.0
    assert load_image(chw).pixels[0, 0].tolist() == [255, 0, 0]
    minus_one = torch.full((3, 4, 5), -1.0)  # diffusers' [-1, 1]
    assert load_image(minus_one).pixels[0, 0].tolist() == [0, 0, 0]
    assert load_image(np.full((4, 5), 200, np.uint8)).pixels.shape == (4, 5, 3)


def test_batches_expand_into_named_images():
    batch = torch.rand(3, 3, 8, 8)
    images = load_images([batch, np.zeros((8, 8, 3), np.uint8)])
    assert [i.name for i in images] == ["#0[0]", "#0[1]", "#0[2]", "#1"]
    assert expand_inputs("dir/me.jpg")[0][1] == "me.jpg"


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((4, 4, 3), 3.0, np.float32), r"float values from 3 to 3.*Scale floats to \[0, 1\]"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((5, 5, 7), np.uint8), r"shape \[5, 5, 7\] is not an image"),
        (np.array([[np.nan]], np.float32), "NaN"),
        (12345, "got a int"),
        (np.full((2, 2), -5, np.int32), "integer values from -5"),
    ],
)
def test_bad_arrays_raise_clear_errors(bad, match):
    with pytest.raises(ImageInputError, match=match) as info:
        load_image(bad, "#3")
    assert "#3" in str(info.value) and "Expected" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(
        ImageInputError, match="could not be read as an image.*broken.jpg|broken.jpg.*could not be read"
    ):
        load_image(broken)
    with pytest.raises(ImageInputError, match="No input images"):
        load_images([])


def test_a_decompression_bomb_is_an_image_input_error(tmp_path):
    """A 15000x15000 PNG (a few KB): PIL refuses it from its header with `DecompressionBombError`, which is not an
    OSError and escaped `load_image` (the `identity` command printed a traceback)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    side = 15000
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(ImageInputError, match="bomb.png.*too large to decode safely") as caught:
        load_images([str(bomb)])
    assert caught.value.argument == "images"


def test_large_images_are_downscaled_and_tiny_ones_warned(caplog):
    big = np.zeros((3000, 1500, 3), np.uint8)
    assert load_image(big, max_side=1024).pixels.shape == (1024, 512, 3)
    assert load_image(big, max_side=None).pixels.shape == (3000, 1500, 3)
    with caplog.at_level(logging.WARNING):
        tiny = load_image(np.zeros((20, 30, 3), np.uint8), "#0")
    assert tiny.pixels.shape == (20, 30, 3)
    assert "only 30x20 px" in caplog.text
