"""The built-in tiny default as a checkpoint folder, and the example photo its face detector finds.

`save_tiny_checkpoint(folder)` writes a complete, self-describing HyperLoRA checkpoint, built in code and offline:
the tiny predictor (`tiny_hyperlora_predictor`, with a Base branch, for the tiny SDXL UNet) in the library format,
a tiny CLIP image encoder in `image_encoder/` and tiny AntelopeV2-shaped face models in `face_models/`, both named by
its `config.json`, so `load_hyperlora(folder)`, `load_predictor(folder)` and every `diffusers-hyperlora` command
need nothing else. All weights are random (seeded): the same seed writes the same checkpoint, so identities saved
with one run load in the next. The command line's `--model tiny` is this folder, written to a temporary folder;
the demo's tiny default (`DemoEngine.tiny_default`) loads it from its work folder, for its own tiny pipeline's UNet.

The tiny face detector finds faces marked by a coloured frame (`draw_face_marker`), not real faces;
`tiny_example_photo(path)` draws such a photo.

Example:
    >>> folder = save_tiny_checkpoint(tmp_path / "tiny")  # doctest: +SKIP
    >>> sorted(path.name for path in folder.iterdir())  # doctest: +SKIP
    ['README.md', 'config.json', 'face_models', 'image_encoder', 'model.safetensors']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..utils.quiet import no_transformers_progress_bar
from .tiny_face import draw_face_marker, export_tiny_antelopev2, tiny_clip_encoder
from .tiny_models import tiny_hyperlora_predictor

TINY_MODEL_NAME = "tiny"
IMAGE_ENCODER_FOLDER = "image_encoder"
FACE_MODELS_FOLDER = "face_models"
TINY_BASE_RANK = 4


def tiny_example_photo(path: str | os.PathLike) -> Path:
    """Draw a cartoon face inside the tiny default's face marker (a magenta frame) and save it as a PNG."""
    image = Image.new("RGB", (256, 256), (70, 110, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((78, 58, 178, 188), fill=(236, 196, 160))  # face
    draw.ellipse((102, 100, 118, 112), fill=(40, 40, 40))  # eyes
    draw.ellipse((138, 100, 154, 112), fill=(40, 40, 40))
    draw.line((128, 112, 122, 140, 132, 140), fill=(170, 120, 100), width=3)  # nose
    draw.arc((104, 138, 152, 168), 20, 160, fill=(150, 60, 60), width=4)  # smile
    draw.chord((74, 40, 182, 110), 180, 360, fill=(90, 60, 40))  # hair
    framed = draw_face_marker(np.asarray(image), (66, 46, 190, 198))
    path = Path(path)
    Image.fromarray(framed).save(path)
    return path


def save_tiny_checkpoint(folder: str | os.PathLike, unet: Any = None, seed: int = 0) -> Path:
    """Write the built-in tiny default (predictor, CLIP encoder, face models) as a checkpoint folder; returns it.

    Args:
        folder: the checkpoint folder to write (created; files in it with the same names are replaced).
        unet: the UNet the predictor targets (default: the tiny SDXL UNet of `tiny_sdxl_pipeline`).
        seed: seeds every random weight.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    predictor = tiny_hyperlora_predictor(
        unet,
        seed=seed,
        base_rank=TINY_BASE_RANK,
        image_encoder=f"./{IMAGE_ENCODER_FOLDER}",
        face_models=f"./{FACE_MODELS_FOLDER}",
    )
    predictor.save_pretrained(folder)
    encoder = tiny_clip_encoder(hidden_size=predictor.config.image_embed_dim, seed=seed)
    with no_transformers_progress_bar():  # a bar for one tiny file is noise
        encoder.model.save_pretrained(folder / IMAGE_ENCODER_FOLDER, safe_serialization=True)
    encoder.processor.save_pretrained(folder / IMAGE_ENCODER_FOLDER)
    export_tiny_antelopev2(folder / FACE_MODELS_FOLDER, seed=seed)
    return folder


class TinyCheckpoint:
    """`with TinyCheckpoint() as folder:` the tiny default written to a temporary folder, removed on exit."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.root: Path | None = None

    def __enter__(self) -> Path:
        self.root = Path(tempfile.mkdtemp(prefix="hyperlora-tiny-checkpoint-"))
        try:
            return save_tiny_checkpoint(self.root / TINY_MODEL_NAME, seed=self.seed)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def __exit__(self, *exc_info: Any) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
