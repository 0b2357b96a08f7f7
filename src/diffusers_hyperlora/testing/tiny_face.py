"""Tiny AntelopeV2-shaped face models, exported to ONNX in code, and a tiny CLIP vision encoder (no downloads).

The face half of the built-in tiny default (`diffusers_hyperlora.testing.tiny_models` builds the SDXL pipeline and the
HyperLoRA): the demo's offline mode and the tests use them. Exporting needs the `onnx` package.

`export_tiny_antelopev2(folder)` writes three ONNX files that insightface's own model router accepts:

- `scrfd_10g_bnkps.onnx`: an SCRFD-style detector with 9 outputs (scores / box distances / 5 keypoints for
  strides 8, 16, 32, 2 anchors per cell). It does not learn faces: it finds **colour-keyed frames**. A face is
  marked by drawing a rectangle outline in one of `MARKER_COLORS` (`draw_face_marker`); the detector
  reports, for every colour present in its input, the bounding box of that colour's pixels, scored by a
  Gaussian of the anchor's distance to the box centre (sigma = stride), keypoints at fixed fractions of the
  box. So it behaves like a real detector: it follows the marker through resizing, padding and crops (the
  re-detection on the ArcFace crop finds the same face), and an image without markers has no face.
- `2d106det.onnx`: a 192x192 -> 212 landmark model: a fixed face-shaped template (`LANDMARK_TEMPLATE`, in the
  [-1, 1] crop frame insightface uses) plus a small input-dependent term (at most 0.01 of the crop).
- `glintr100.onnx`: a 112x112 -> 512 recognition network with seeded random weights (input-dependent).

`tiny_clip_encoder()` builds a `CLIPVisionModelWithProjection` 48 wide (the tiny predictor's `image_embed_dim`)
with a `CLIPImageProcessor` at 32 px: 17 tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

MARKER_COLORS = (
    (255, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (0, 0, 255),
    (128, 0, 255),
    (255, 0, 128),
    (128, 255, 0),
    (0, 128, 255),
)
COLOR_TOLERANCE = 12.0
STRIDES = (8, 16, 32)
# Five keypoints (eyes, nose, mouth corners) as fractions of the detected box.
KEYPOINT_FRACTIONS = np.array([[0.34, 0.42], [0.66, 0.42], [0.50, 0.58], [0.37, 0.75], [0.63, 0.75]], dtype=np.float32)

# Insightface's 2d106 layout, as far as the polygon needs it: the jaw contour (33 points, listed from the top of
# one side, down to the chin (index 0), up the other side) and the two eyebrows. The others are spread inside.
_CONTOUR_ORDER = [1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0]
_CONTOUR_ORDER += [24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17]
_BROWS = [101, 105, 104, 103, 102, 50, 51, 49, 48, 43]


def _landmark_template() -> np.ndarray:
    points = np.zeros((106, 2), dtype=np.float32)
    # contour: a U from (-0.55, -0.15) down to the chin (0, 0.6) and up to (0.55, -0.15)
    for k, index in enumerate(_CONTOUR_ORDER):
        angle = math.pi * (1.0 - k / (len(_CONTOUR_ORDER) - 1))  # pi -> 0, left to right
        points[index] = (0.55 * math.cos(angle), -0.15 + 0.75 * math.sin(angle))
    for k, index in enumerate(_BROWS):  # brows across the top, right to left (closing the polygon)
        points[index] = (0.5 - k / (len(_BROWS) - 1), -0.42 + 0.05 * abs(k - 4.5) / 4.5)
    rest = [i for i in range(106) if i not in _CONTOUR_ORDER and i not in _BROWS]
    grid = np.random.default_rng(0).uniform(-0.35, 0.35, size=(len(rest), 2)).astype(np.float32)
    grid[:, 1] = grid[:, 1] * 0.8
    points[rest] = grid
    return points


LANDMARK_TEMPLATE = _landmark_template()


class _ColorFrameDetector(nn.Module):
    """SCRFD-shaped: input `(rgb - 127.5) / 128`, NCHW; 9 outputs `[N, 1]`, `[N, 4]`, `[N, 10]` x 3 strides."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("colors", torch.tensor(MARKER_COLORS, dtype=torch.float32))
        self.register_buffer("kps", torch.from_numpy(KEYPOINT_FRACTIONS))

    def forward(self, x: torch.Tensor):
        rgb = x[0] * 128.0 + 127.5  # [3, H, W]
        distance = (rgb[None] - self.colors[:, :, None, None]).abs().amax(1)  # [K, H, W]
        mask = (distance < COLOR_TOLERANCE).float()
        cols, rows = mask.amax(1), mask.amax(2)  # [K, W], [K, H]
        xs = torch.cumsum(torch.ones_like(rgb[0, 0, :]), 0) - 1  # 0 .. W-1
        ys = torch.cumsum(torch.ones_like(rgb[0, :, 0]), 0) - 1
        width, height = xs[-1] + 1, ys[-1] + 1
        present = cols.amax(1)  # [K]
        x1 = width - ((width - xs) * cols).amax(1)
        x2 = (xs * cols).amax(1) + 1
        y1 = height - ((height - ys) * rows).amax(1)
        y2 = (ys * rows).amax(1) + 1
        boxes = torch.stack([x1, y1, x2, y2], 1)  # [K, 4]
        size = torch.stack([x2 - x1, y2 - y1], 1)  # [K, 2]
        keypoints = boxes[:, None, :2] + self.kps[None] * size[:, None]  # [K, 5, 2]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        scores_out, boxes_out, kps_out = [], [], []
        for stride in STRIDES:
            ax = xs[::stride]
            ay = ys[::stride]
            grid_x = (ax[None, :] + 0 * ay[:, None]).reshape(-1)  # [h*w], row-major (y, x)
            grid_y = (ay[:, None] + 0 * ax[None, :]).reshape(-1)
            d2 = (grid_x[None] - cx[:, None]) ** 2 + (grid_y[None] - cy[:, None]) ** 2  # [K, h*w]
            score = present[:, None] * torch.exp(-d2 / (2.0 * stride * stride))
            best = score.amax(0)  # [h*w]
            onehot = (score >= best[None]).float()
            onehot = onehot / onehot.sum(0, keepdim=True)
            box = (onehot[:, :, None] * boxes[:, None, :]).sum(0)  # [h*w, 4]
            kp = (onehot[:, :, None, None] * keypoints[:, None]).sum(0)  # [h*w, 5, 2]
            anchor = torch.stack([grid_x, grid_y], 1)  # [h*w, 2]
            dist = torch.cat([anchor - box[:, :2], box[:, 2:] - anchor], 1) / stride
            kp_dist = ((kp - anchor[:, None]) / stride).reshape(-1, 10)
            # two anchors per cell, consecutive (insightface's anchor order)
            scores_out.append(torch.stack([best, best], 1).reshape(-1, 1))
            boxes_out.append(torch.stack([dist, dist], 1).reshape(-1, 4))
            kps_out.append(torch.stack([kp_dist, kp_dist], 1).reshape(-1, 10))
        return (*scores_out, *boxes_out, *kps_out)


class _TemplateLandmarks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("template", torch.from_numpy(LANDMARK_TEMPLATE.reshape(1, -1)))
        self.pool = nn.AvgPool2d(48)
        self.head = nn.Linear(3 * 16, 212)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(x).flatten(1)
        return self.template + 0.01 * torch.tanh(self.head(features))


class _TinyRecognition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=4), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(16 * 7 * 7, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: dict, outputs: list[str]) -> None:
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=["input.1"],
        output_names=outputs,
        dynamic_axes=dynamic,
        opset_version=17,
        dynamo=False,
    )


def export_tiny_antelopev2(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny AntelopeV2 pack (detector, 2d106 landmarks, recognition) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    outputs = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in STRIDES]
    dynamic = {"input.1": {2: "height", 3: "width"}, **{name: {0: "anchors"} for name in outputs}}
    _export(_ColorFrameDetector(), torch.zeros(1, 3, 64, 64), folder / "scrfd_10g_bnkps.onnx", dynamic, outputs)
    _export(
        _TemplateLandmarks(), torch.zeros(1, 3, 192, 192), folder / "2d106det.onnx", {"input.1": {0: "batch"}}, ["fc1"]
    )
    _export(
        _TinyRecognition(),
        torch.zeros(1, 3, 112, 112),
        folder / "glintr100.onnx",
        {"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        ["embedding"],
    )
    return folder


def draw_face_marker(image: np.ndarray, box: tuple[int, int, int, int], color_index: int = 0) -> np.ndarray:
    """A copy of the RGB `image` with a frame in `MARKER_COLORS[color_index]` whose outer edge is `box`."""
    image = np.array(image, dtype=np.uint8, copy=True)
    x0, y0, x1, y1 = box
    thickness = max(4, round(0.05 * max(x1 - x0, y1 - y0)))
    color = np.array(MARKER_COLORS[color_index], dtype=np.uint8)
    image[y0:y1, x0 : x0 + thickness] = color
    image[y0:y1, x1 - thickness : x1] = color
    image[y0 : y0 + thickness, x0:x1] = color
    image[y1 - thickness : y1, x0:x1] = color
    return image


# Approximate face boxes of the real photos the tests use (x0, y0, x1, y1, in image pixels).
ASTRONAUT_FACE = (176, 68, 274, 188)
T1_FACES = (
    (62, 262, 166, 386),  # left, long hair
    (282, 140, 386, 264),  # back left
    (462, 262, 590, 400),  # centre
    (745, 320, 865, 472),  # centre right, laughing
    (912, 42, 1052, 206),  # standing right: the largest
    (1125, 275, 1226, 396),  # right
)


def tiny_clip_encoder(hidden_size: int = 48, image_size: int = 32, seed: int = 0):
    """A tiny `CLIPImageEncoder` (model + 32 px processor): `hidden_states[-2]` is `[B, 17, hidden_size]`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..face import CLIPImageEncoder, default_clip_processor

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    return CLIPImageEncoder(model, default_clip_processor(image_size))
