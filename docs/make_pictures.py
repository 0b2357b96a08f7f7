"""Draw the pictures of the documentation with the library itself, so they cannot go stale.

Run from the repository root (CI runs it before `mkdocs build --strict`, see scripts/docs.sh):

    python docs/make_pictures.py            # writes docs/images/generated/*.svg|png

- `architecture.png`: the package's parts (subpackages and top-level modules) on their layers, with every import
  between them, read from the source by `docs/tools/import_graph.py` (the reader tests/test_architecture.py uses).
- `dataflow.svg`: photos -> face features -> coefficients -> LoRA weights -> PEFT adapters, ID and Base branches.
  Every shape is read from the library: the SDXL column from a config built on the SDXL UNet's layout (on the
  meta device, no weights), the tiny column from a real forward pass of the built-in tiny HyperLoRA.
- `face-astronaut-*.png`, `face-t1-*.png`: the face pipeline on two real photos (`skimage.data.astronaut()`,
  insightface's group photo `t1`). No face-landmark weights ship with the packages we install, so the faces are
  placed by hand (`HandPlacedFaces`): measured boxes, and 106 landmarks from a face-shaped template fitted into
  each box. The crops, masks and compositing are the library's own code on those landmarks.
- `benchmark-switch.svg`, `benchmark-photo.svg`: drawn from `docs/benchmarks.json`, the machine-readable output
  of `benchmarks/run.py` (full-size SDXL-shaped HyperLoRA with random weights: timings, not image quality).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from html import escape
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "generated"
BENCHMARK_JSON = ROOT / "docs" / "benchmarks.json"

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "docs" / "tools"))

from import_graph import PACKAGE, layers, read_import_graph  # noqa: E402

from diffusers_hyperlora import HyperLoRAConfig  # noqa: E402
from diffusers_hyperlora.face import FaceAnalyzer, FaceFeatureExtractor, arcface_crop  # noqa: E402
from diffusers_hyperlora.model.targets import SDXL_UNET_CONFIG, targets_from_unet  # noqa: E402
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config, tiny_hyperlora_predictor  # noqa: E402

# Hand-measured face boxes (x0, y0, x1, y1) in the photos' pixels.
ASTRONAUT_FACES = [(176, 68, 274, 188)]
T1_FACES = [
    (62, 262, 166, 386),
    (282, 140, 386, 264),
    (462, 262, 590, 400),
    (745, 320, 865, 472),
    (912, 42, 1052, 206),
    (1125, 275, 1226, 396),
]


# ---------------------------------------------------------------------------------------------------- hand-placed faces
def landmark_template() -> np.ndarray:
    """106 points in insightface's 2d106 layout, as far as the crops use it, in a [-1, 1] face frame.

    The jaw contour (indices 0-32: chin at 0, the two sides going up) and the eyebrows (43-51, 97-105) trace the
    face outline the background mask is built from; the other points spread over eyes, nose and mouth.
    """
    points = np.zeros((106, 2), dtype=np.float32)
    left_side = [1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8]  # top of the left cheek down to the chin
    right_side = [17, 25, 26, 27, 28, 29, 30, 31, 32, 18, 19, 20, 21, 22, 23, 24]  # chin up to the right temple
    contour = left_side + [0] + right_side[::-1]
    for k, index in enumerate(contour):
        angle = np.pi * (1.0 - k / (len(contour) - 1))
        points[index] = (0.62 * np.cos(angle), -0.05 + 0.72 * np.sin(angle))
    brows = [101, 105, 104, 103, 102, 50, 51, 49, 48, 43]
    for k, index in enumerate(brows):
        points[index] = (0.55 - 1.1 * k / (len(brows) - 1), -0.38 - 0.06 * (1 - abs(k - 4.5) / 4.5))
    inner = [i for i in range(106) if i not in contour and i not in brows]
    rng = np.random.default_rng(0)
    angles, radii = rng.uniform(0, 2 * np.pi, len(inner)), np.sqrt(rng.uniform(0, 1, len(inner)))
    points[inner] = np.stack([0.42 * radii * np.cos(angles), 0.1 + 0.4 * radii * np.sin(angles)], 1)
    return points


class HandPlacedFaces:
    """A face analyzer (insightface's `prepare` / `get` interface) that returns hand-measured faces.

    `faces` maps an image size `(width, height)` to its face boxes; each face gets the template landmarks
    fitted into its box and a fixed unit embedding. Other images (e.g. the ArcFace crop) have no face, so the
    library falls back to the full photo's embedding, as it does when a real detector misses the face again.
    """

    def __init__(self, faces: dict[tuple[int, int], list[tuple[int, int, int, int]]]) -> None:
        self.faces = faces
        self.template = landmark_template()

    def prepare(self, ctx_id: int, det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5) -> None:
        pass

    def get(self, image_bgr: np.ndarray) -> list[dict]:
        height, width = image_bgr.shape[:2]
        found = []
        for x0, y0, x1, y1 in self.faces.get((width, height), []):
            centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2], dtype=np.float32)
            half = np.array([(x1 - x0) / 2, (y1 - y0) / 2], dtype=np.float32)
            embedding = np.ones(512, dtype=np.float32) / np.sqrt(512)
            landmarks = centre + self.template * half
            found.append(
                {
                    "bbox": np.array([x0, y0, x1, y1], np.float32),
                    "det_score": 1.0,
                    "landmark_2d_106": landmarks,
                    "normed_embedding": embedding,
                }
            )
        return found


# ---------------------------------------------------------------------------------------------------- drawing helpers
def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def labelled(image: Image.Image, label: str, side: int = 256) -> Image.Image:
    """`image` fitted into a `side` x `side` tile with a caption band under it."""
    image = ImageOps.contain(image.convert("RGB"), (side, side))
    tile = Image.new("RGB", (side, side + 28), "white")
    tile.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    ImageDraw.Draw(tile).text((6, side + 6), label, fill="black", font=font(15))
    return tile


def strip(tiles: list[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + gap
    return sheet


def rect(draw: ImageDraw.ImageDraw, box, color: str, width: int) -> None:
    draw.rectangle([float(v) for v in box], outline=color, width=width)


# ---------------------------------------------------------------------------------------------------- face pictures
def face_pictures(name: str, photo: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> list[Path]:
    """The overview (boxes, chosen face, landmarks, crop squares) and the strip of what the encoders get."""
    analyzer = FaceAnalyzer(HandPlacedFaces({(photo.shape[1], photo.shape[0]): boxes}))
    extractor = FaceFeatureExtractor(tiny_hyperlora_config(), image_encoder=None, face_analyzer=analyzer)
    inputs = extractor.prepare_inputs([photo], with_base=True)[0]

    overview = inputs.image.copy()
    draw = ImageDraw.Draw(overview)
    line = max(2, round(overview.width / 400))
    for box in boxes:
        rect(draw, box, "#ffffff", line)
    rect(draw, inputs.face_box, "#22c55e", line + 1)
    rect(draw, inputs.clip_crop.box(), "#06b6d4", line)
    rect(draw, arcface_crop(inputs.clip_crop).box(), "#f97316", line)
    radius = max(1.5, overview.width / 500)
    for x, y in inputs.landmarks:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill="#ef4444")
    overview.thumbnail((1024, 1024))
    paths = [OUT / f"face-{name}-overview.png", OUT / f"face-{name}-steps.png"]
    overview.save(paths[0], optimize=True)

    tiles = [
        labelled(inputs.face_mask, "face mask"),
        labelled(inputs.background_removed, "background removed"),
        labelled(inputs.clip_image, "CLIP crop"),
        labelled(inputs.arcface_image, "ArcFace crop"),
        labelled(inputs.base_image, "Base input (face blurred)"),
    ]
    strip(tiles).save(paths[1], optimize=True)
    return paths


# ---------------------------------------------------------------------------------------------------- data flow
def sdxl_config() -> HyperLoRAConfig:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return HyperLoRAConfig(targets=targets_from_unet(unet), base_rank=4)


def tiny_shapes() -> dict[str, str]:
    """Shapes of a real run of the built-in tiny HyperLoRA (with a Base branch) on 2 images."""
    predictor = tiny_hyperlora_predictor(base_rank=4)
    config = predictor.config
    images = 2
    arcface = torch.nn.functional.normalize(torch.randn(images, config.id_embed_dim), dim=-1)
    clip = torch.randn(images, 17, config.image_embed_dim)
    identity = predictor.predict(id_embeds=arcface, clip_hidden_states=clip, base_clip_hidden_states=clip)
    weights = predictor.lora_weights(identity, "id")
    base_weights = predictor.lora_weights(identity, "base")
    down, up = weights[0]
    return {
        "arcface": f"[{images}, {config.id_embed_dim}]",
        "clip": f"[{images}, {clip.shape[1]}, {clip.shape[2]}]",
        "coefficients": "[{}, {}]".format(*identity.id_coefficients.shape),
        "lora": f"{len(weights)} x (down [{down.shape[0]}, in], up [out, {up.shape[1]}])",
        "base_lora": f"{len(base_weights)} x rank {base_weights[0][0].shape[0]}",
        "modules": f"{len(config.targets)} modules",
    }


def sdxl_shapes(config: HyperLoRAConfig) -> dict[str, str]:
    return {
        "arcface": f"[B, {config.id_embed_dim}]",
        "clip": f"[B, 257, {config.image_embed_dim}]",
        "coefficients": f"[{config.num_tokens}, {config.num_basis}]",
        "lora": f"{len(config.linears)} x (down [{config.id_rank}, in], up [out, {config.id_rank}])",
        "base_lora": f"{len(config.linears)} x rank {config.base_rank}",
        "modules": f"{len(config.targets)} modules",
    }


# The dataflow picture is drawn 820 px wide, close to the width the docs show it (Material's content column beside
# both sidebars, about 690 px), so its 14-17 px text shows at about 12-14 px: two columns (ID branch, Base branch)
# read top to bottom, rather than one long row whose text would shrink to a few pixels.
FLOW_WIDTH = 820
FLOW_BOX = (370, 100)  # width, height
FLOW_GAP = 34  # between rows
FLOW_LINE = 18  # line height of the 14 px text


def svg_box(x: float, y: float, w: float, h: float, title: str, lines: list[str], fill: str) -> str:
    parts = [f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" stroke="#334155"/>']
    parts.append(
        f'<text x="{x + w / 2}" y="{y + 24}" text-anchor="middle" font-size="17" font-weight="bold">'
        f"{escape(title)}</text>"
    )
    for i, text in enumerate(lines):
        parts.append(f'<text x="{x + w / 2}" y="{y + 48 + FLOW_LINE * i}" text-anchor="middle">{escape(text)}</text>')
    return "\n".join(parts)


def svg_arrow(x0: float, y0: float, x1: float, y1: float) -> str:
    return f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#334155" stroke-width="2" marker-end="url(#a)"/>'


def svg_text_lines(x: float, y: float, lines: list[str], size: int = 14, bold: bool = False) -> list[str]:
    weight = ' font-weight="bold"' if bold else ""
    return [
        f'<text x="{x}" y="{y + (size + 4) * i}" font-size="{size}"{weight}>{escape(line)}</text>'
        for i, line in enumerate(lines)
    ]


def dataflow_svg() -> Path:
    sdxl, tiny = sdxl_shapes(sdxl_config()), tiny_shapes()
    config = sdxl_config()

    def both(key: str) -> list[str]:
        return [f"SDXL: {sdxl[key]}", f"tiny: {tiny[key]}"]

    id_rows = [
        ("photos", ["PIL, numpy, torch or files", "B photos of one person"]),
        ("face features", ["ArcFace " + sdxl["arcface"], "CLIP hidden_states[-2] " + sdxl["clip"]]),
        ("coefficients", ["resampler -> mean -> normalize", *both("coefficients")]),
        ("LoRA weights", ["bank: sum_k c_k M_k", *both("lora")]),
        (
            'PEFT adapter "id"',
            [
                f"weight {config.default_id_weight}, alpha / r = {config.lora_alpha_ratio}",
                f"written in place, {sdxl['modules']}",
            ],
        ),
    ]
    base_rows = [
        ("face blurred", ["the same photos,", "face region blurred"]),
        ("CLIP features", ["Base input crop", sdxl["clip"]]),
        ("Base coefficients", ["second resampler", *both("coefficients")]),
        ("Base LoRA weights", ["Base bank", *both("base_lora")]),
        (
            'PEFT adapter "base"',
            [f"weight {config.default_base_weight}: clothes, background, light", "release: placeholder, no effect"],
        ),
    ]
    w, h = FLOW_BOX
    xs = (20, FLOW_WIDTH - 20 - w)
    top = 86
    ys = [top + i * (h + FLOW_GAP) for i in range(len(id_rows))]
    footer_y = ys[-1] + h + 34
    footer = [
        f"Shapes read from the library: SDXL from a config on the SDXL UNet layout ({sdxl['modules']},",
        f"{len(config.linears)} linears, K = {config.num_basis}); tiny from a forward pass of the built-in tiny",
        "HyperLoRA. B = number of photos; they are averaged into one identity.",
    ]
    height = footer_y + 18 * len(footer) + 6
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{FLOW_WIDTH}" height="{height}" '
        f'viewBox="0 0 {FLOW_WIDTH} {height}" font-family="sans-serif" font-size="14">',
        '<defs><marker id="a" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
        '<path d="M0,0 L10,4 L0,8 z" fill="#334155"/></marker></defs>',
        *svg_text_lines(xs[0], 30, ["ID branch: the face"], size=18, bold=True),
        *svg_text_lines(xs[1], 30, ["Base branch: everything but the face"], size=18, bold=True),
        *svg_text_lines(xs[1], 54, ["(checkpoints that have one)"]),
    ]
    for rows, x, fill in ((id_rows, xs[0], "#dbeafe"), (base_rows, xs[1], "#fef3c7")):
        for i, (title, lines) in enumerate(rows):
            parts.append(svg_box(x, ys[i], w, h, title, lines, fill))
            if i:
                parts.append(svg_arrow(x + w / 2, ys[i] - FLOW_GAP + 2, x + w / 2, ys[i] - 4))
    parts.append(svg_arrow(xs[0] + w + 2, ys[0] + h / 2, xs[1] - 4, ys[0] + h / 2))  # photos -> face blurred
    parts += svg_text_lines(20, footer_y, footer, size=14)
    parts.append("</svg>")
    path = OUT / "dataflow.svg"
    path.write_text("\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- architecture
def _modules_of(part: str) -> str:
    folder = PACKAGE / part
    if not folder.is_dir():  # a module: the start of its docstring
        doc = ast.get_docstring(ast.parse((PACKAGE / f"{part}.py").read_text(encoding="utf-8"))) or ""
        return re.split(r"[:.]\s", doc, maxsplit=1)[0].replace("`", "")
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    return ", ".join(names)


def architecture_png(scale: int = 2) -> Path:
    """One row per part, top layer first; import arcs on the right (solid: at import time, dashed: inside a
    function, red: the call-time imports that go up a layer). Drawn at `scale` x 800 px, shown 800 px wide."""
    graph = read_import_graph()
    import_time = graph.edges(("import_time",))
    call_time = graph.edges(("call_time",)) - import_time
    upward = _upward(graph)
    level = layers(graph.parts, (import_time | call_time) - upward)
    rows = sorted(graph.parts, key=lambda part: (-level[part], part))
    row_h, box_h, top = 46, 38, 64
    box_x, box_w, arc_x = 46, 450, 504
    height = top + row_h * len(rows) + 56
    image = Image.new("RGB", (800 * scale, height * scale), "white")
    draw = ImageDraw.Draw(image)

    def px(*values: float) -> list[float]:
        return [v * scale for v in values]

    draw.text(px(10, 10), "diffusers_hyperlora: each part imports only from the layers below it", fill="black",
              font=font(17 * scale))
    draw.text(px(10, 34), "read from the source (docs/tools/import_graph.py); layer L0 at the bottom",
              fill="#475569", font=font(12 * scale))
    y_of = {part: top + row_h * i for i, part in enumerate(rows)}
    for part in rows:
        y = y_of[part]
        fill = "#e0f2fe" if level[part] % 2 else "#f1f5f9"
        draw.text(px(10, y + 12), f"L{level[part]}", fill="#475569", font=font(13 * scale))
        draw.rounded_rectangle(px(box_x, y, box_x + box_w, y + box_h), radius=6 * scale, fill=fill,
                               outline="#334155", width=scale)
        label = f"{part}/" if (PACKAGE / part).is_dir() else f"{part}.py"
        draw.text(px(box_x + 8, y + 3), label, fill="black", font=font(15 * scale))
        draw.text(px(box_x + 8, y + 21), _modules_of(part), fill="#334155", font=font(11 * scale))
    palette = ["#2563eb", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f", "#475569", "#b45309"]
    shown = {(a, b) for a, b in import_time | call_time if b != "errors"}  # nearly every part uses errors.py
    users_of_errors = sum(1 for a, b in import_time | call_time if b == "errors")
    for a, b in sorted(shown, key=lambda e: (abs(y_of[e[0]] - y_of[e[1]]), e)):
        ya, yb = y_of[a] + box_h / 2 - 6, y_of[b] + box_h / 2 + 6
        span = abs(rows.index(a) - rows.index(b))
        reach = 16 + 21 * span + 4 * (rows.index(a) % 3)
        color = "#dc2626" if (a, b) in upward else palette[rows.index(a) % len(palette)]
        points = [_bezier(t / 40, (arc_x, ya), (arc_x + reach, ya), (arc_x + reach, yb), (arc_x + 6, yb))
                  for t in range(41)]
        segments = list(zip(points, points[1:]))
        if (a, b) in call_time:
            segments = [seg for i, seg in enumerate(segments) if i % 3 != 2]  # dashed
        for p0, p1 in segments:
            draw.line(px(*p0, *p1), fill=color, width=int((3 if (a, b) in upward else 1.5) * scale))
        tip = (arc_x + 1, yb)
        draw.polygon(px(tip[0], tip[1], tip[0] + 8, tip[1] - 4, tip[0] + 8, tip[1] + 4), fill=color)
    lines = [
        "arcs go from a part to the part it imports (arrow at the imported part), coloured by the importing part;",
        f"solid = at import time, dashed = inside a function (at call time); not drawn: the {users_of_errors} arcs "
        "into errors.py",
    ]
    for i, line in enumerate(lines):
        draw.text(px(10, height - 50 + 16 * i), line, fill="black", font=font(11 * scale))
    if upward:
        names = ", ".join(f"{a} -> {b}" for a, b in sorted(upward))
        draw.text(px(10, height - 18), f"red = the imports that go up a layer (call time only): {names}",
                  fill="#dc2626", font=font(11 * scale))
    path = OUT / "architecture.png"
    image.save(path, optimize=True)
    return path


def _bezier(t: float, *points: tuple[float, float]) -> tuple[float, float]:
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    u = 1 - t
    return (
        u**3 * x0 + 3 * u * u * t * x1 + 3 * u * t * t * x2 + t**3 * x3,
        u**3 * y0 + 3 * u * u * t * y1 + 3 * u * t * t * y2 + t**3 * y3,
    )


def _upward(graph) -> set[tuple[str, str]]:
    """Call-time imports from a part to one that (through import-time imports) depends on it."""
    import_time = graph.edges(("import_time",))
    level = layers(graph.parts, import_time)
    return {(a, b) for a, b in graph.edges(("call_time",)) if level[b] >= level[a] and _reaches(b, a, import_time)}


def _reaches(start: str, goal: str, edges: set[tuple[str, str]]) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += [b for a, b in edges if a == node]
    return False


# ---------------------------------------------------------------------------------------------------- benchmark charts
def bar_chart(title: str, subtitle: str, bars: list[tuple[str, float, str]], unit: str = "ms") -> str:
    """A horizontal bar chart as SVG: (label, value, colour) per bar, values written at the bar ends."""
    top, row, label_w, bar_w = 60, 30, 330, 560
    largest = max(value for _, value, _ in bars)
    height = top + row * len(bars) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 120}" height="{height}" '
        'font-family="sans-serif" font-size="13">',
        f'<text x="10" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
        f'<text x="10" y="42" font-size="12" fill="#475569">{escape(subtitle)}</text>',
    ]
    for i, (label, value, colour) in enumerate(bars):
        y = top + i * row
        length = max(1.0, bar_w * value / largest)
        parts.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 4}" width="{length:.1f}" height="{row - 8}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + length + 6:.1f}" y="{y + 17}">{value:,.1f} {unit}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _short(what: str) -> str:
    """A bar label from a benchmark row: its first words, plus a note when the step ran on stand-in models."""
    label = what.split(" (")[0].split(":")[0][:45]
    return label + " (tiny stand-in models)" if "stand-in" in what else label


def benchmark_charts() -> list[Path]:
    report = json.loads(BENCHMARK_JSON.read_text())
    rows = [row.get("data", {}) for row in report["rows"]]
    subtitle = f"benchmarks/run.py, {report['date']}: {report['device']}"[:150]
    bars = []
    for dtype in dict.fromkeys(row["dtype"] for row in rows if row.get("kind") == "switch"):
        switch = next(r for r in rows if r.get("kind") == "switch" and r["dtype"] == dtype)
        bars.append((f"{dtype} bank: bandwidth bound (one read)", switch["bound_ms"], "#94a3b8"))
        bars.append((f"{dtype} bank: identity switch", switch["switch_ms"], "#2563eb"))
        naive = next((r for r in rows if r.get("kind") == "naive" and r["dtype"] == dtype), None)
        if naive is not None:
            bars.append((f"{dtype} bank: naive path", naive["naive_ms"], "#dc2626"))
        hotswap = next((r for r in rows if r.get("kind") == "hotswap" and r["dtype"] == dtype), None)
        if hotswap is not None:  # diffusers' enable_lora_hotswap + load_lora_weights(hotswap=True), same run
            bars.append((f"{dtype} bank: diffusers hotswap", hotswap["hotswap_ms"], "#f59e0b"))
    paths = []
    if bars:
        path = OUT / "benchmark-switch.svg"
        title = "Identity switch (full-size SDXL-shaped HyperLoRA, random weights): lower is better"
        path.write_text(bar_chart(title, subtitle, bars))
        paths.append(path)
    parts = [
        (row_info["what"], row_info["data"]["ms"])
        for row_info in report["rows"]
        if row_info.get("data", {}).get("kind") == "photo_part"
    ]
    if parts:
        colours = ["#0ea5e9", "#8b5cf6", "#f59e0b", "#10b981", "#ef4444", "#64748b"]
        bars = [(_short(what), ms, colours[i % len(colours)]) for i, (what, ms) in enumerate(parts)]
        total = sum(ms for _, ms in parts)
        path = OUT / "benchmark-photo.svg"
        title = f"One photo to live LoRA weights: {total:,.0f} ms in total, by step (random weights)"
        path.write_text(bar_chart(title, subtitle, bars))
        paths.append(path)
    return paths


def main() -> None:
    logging.getLogger("diffusers_hyperlora").setLevel(logging.ERROR)  # the expected ArcFace fallback warning
    OUT.mkdir(parents=True, exist_ok=True)
    from insightface.data import get_image
    from skimage.data import astronaut

    paths = [architecture_png(), dataflow_svg()]
    paths += face_pictures("astronaut", astronaut(), ASTRONAUT_FACES)
    paths += face_pictures("t1", np.ascontiguousarray(get_image("t1", to_rgb=True)), T1_FACES)
    paths += benchmark_charts()
    for path in paths:
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
