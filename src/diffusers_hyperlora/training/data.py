"""Training data: a folder with `metadata.jsonl`, cached face features, and a tiny in-code dataset.

Folder layout (see docs/training.md):

    my_dataset/
      metadata.jsonl          one JSON object per line: {"file": "alice/001.jpg", "person": "alice",
                              "caption": "a photo of a woman in a red coat, park"}
      alice/001.jpg ...
      features.safetensors    written once by `cache_features` (the face pipeline's outputs per image)

`cache_features` runs the face pipeline (`HyperLoRAFeatures`: ArcFace embedding, CLIP hidden states of the face
crop and of the face-blurred image) on every image once and stores the tensors in one safetensors file, so
training never runs the face encoders. Images without a detectable face are left out (and logged).

Every dataset item is a dict:

| key | value |
|---|---|
| `pixel_values` | `[3, R, R]` float in [-1, 1] (resized, center-cropped) |
| `original_size`, `crop_top_left` | `(h, w)`, `(top, left)`: SDXL's size conditioning |
| `caption`, `person` | strings (the trigger words are added by the training loop) |
| `id_embeds` | `[n, 512]` normed ArcFace embeddings of the n reference images, or `None` |
| `clip_hidden_states`, `base_clip_hidden_states` | `[n, T, E]` or `None` |
| `reference_key` | indices of the reference images: samples with equal keys share one predicted LoRA |
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import HyperLoRAError, InvalidArgumentTypeError, NoFaceDetectedError, TrainingDataError
from ..identities.features import FeatureExtractor
from ..utils.atomic_files import atomic_path

logger = logging.get_logger(__name__)

METADATA_FILE = "metadata.jsonl"
RESOLUTION_MULTIPLE = 8
"""Training sizes are multiples of this (the VAE's downscaling factor in every supported base model)."""
FEATURES_FILE = "features.safetensors"
FEATURES_FORMAT = "diffusers-hyperlora-training-features"
FEATURE_KINDS = ("id_embeds", "clip_hidden_states", "base_clip_hidden_states")


@dataclass
class TrainingRecord:
    """One training image: the picture, its caption, whose it is, and its face features (one image's worth).

    Args:
        image: a file path, PIL image, numpy array or tensor (anything `face.load_image` reads).
        caption: the prompt without trigger words.
        person: identity label; images of one person can serve as each other's references.
        id_embeds: `[512]` normed ArcFace embedding (or `None`).
        clip_hidden_states: `[T, E]` CLIP hidden states of the face crop (or `None`).
        base_clip_hidden_states: `[T, E]` of the face-blurred image (or `None`).
    """

    image: Any
    caption: str
    person: str
    id_embeds: torch.Tensor | None = None
    clip_hidden_states: torch.Tensor | None = None
    base_clip_hidden_states: torch.Tensor | None = None


def _metadata_lines(path: Path) -> list[tuple[int, str]]:
    """`(line number, text)` of every line; a line that is not UTF-8 is refused with its number."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TrainingDataError(f"Could not read {path}: {error.strerror or error}.") from error
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            raise TrainingDataError(
                f"{path}, line {number}: not valid UTF-8 (byte {error.start}). Save {path.name} as UTF-8 text."
            ) from error
    return lines


def _checked_file(path: Path, number: int, root: Path, file: str) -> str:
    """`file` as written, refused when it names something outside `root` (absolute, or with `..`)."""
    parts = Path(file.replace("\\", "/")).parts
    if Path(file).is_absolute() or file.startswith(("/", "\\")) or ".." in parts or Path(file).drive:
        raise TrainingDataError(
            f"{path}, line {number}: image {file!r} is outside the dataset folder {root}. Name every image by its "
            "path relative to the folder of metadata.jsonl (e.g. 'alice/001.jpg'), with no '..' and no absolute path.",
            argument="file",
        )
    if not (root / file).is_file():
        raise TrainingDataError(f"{path}, line {number}: image {file!r} not found under {root}.", argument="file")
    return file


def _path(value: Any, argument: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentTypeError(
            f"{argument} must be a path (str or os.PathLike), got {type(value).__name__}.", argument=argument
        )
    return Path(value)


def read_metadata(root: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of `root/metadata.jsonl`, checked: UTF-8; each row has string `file`, `person`, `caption`; every
    file exists inside `root` (absolute paths and `..` are refused)."""
    root = _path(root, "root")
    path = root / METADATA_FILE
    if not path.is_file():
        raise TrainingDataError(
            f"{root} has no {METADATA_FILE}. Write one JSON object per image and line: "
            '{"file": "alice/001.jpg", "person": "alice", "caption": "a photo of ..."}.'
        )
    rows = []
    for number, line in _metadata_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingDataError(f"{path}, line {number}: not valid JSON ({error}).") from error
        if not isinstance(row, dict):
            raise TrainingDataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
        for key in ("file", "person", "caption"):
            if not isinstance(row.get(key), str) or (key != "caption" and not row[key]):
                raise TrainingDataError(f"{path}, line {number}: missing or non-string {key!r}.", argument=key)
        file = _checked_file(path, number, root, row["file"])
        rows.append({"file": file, "person": row["person"], "caption": row["caption"]})
    if not rows:
        raise TrainingDataError(
            f"{path} lists no images. Write one JSON object per image and line "
            '(`{"file": "alice/001.jpg", "person": "alice", "caption": "a photo of ..."}`).'
        )
    files = [r["file"] for r in rows]
    if len(set(files)) != len(files):
        twice = sorted({file for file in files if files.count(file) > 1})
        raise TrainingDataError(
            f"{path} lists an image more than once ({', '.join(map(str, twice[:5]))}); keep one line per image."
        )
    return rows


def cache_features(
    root: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    output: str | os.PathLike | None = None,
    with_base: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """Run the face pipeline once per image of `root/metadata.jsonl` and store the features (float32).

    Args:
        root: the dataset folder.
        extractor: a `FeatureExtractor`, e.g. `face.build_feature_extractor(predictor.config, ...)`.
        output: the file to write (default `root/features.safetensors`).
        with_base: also compute the face-blurred image's CLIP features (needed by every stage when the
            predictor has a Base branch).
        device, dtype: where and how the encoders run.
        progress: show a tqdm bar.

    Returns:
        The path of the written file. Keys are `"{file}::{kind}"` with kind in `FEATURE_KINDS`.

    Example:
        >>> from diffusers_hyperlora.face import build_feature_extractor  # doctest: +SKIP
        >>> extractor = build_feature_extractor(predictor.config, source=None, image_encoder=None,
        ...                                     face_analyzer=None, hub_options={})  # doctest: +SKIP
        >>> cache_features("my_dataset", extractor)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    root = _path(root, "root")
    rows = read_metadata(root)
    tensors: dict[str, torch.Tensor] = {}
    skipped = []
    for row in tqdm(rows, desc="face features", disable=not progress):
        try:
            features = extractor(
                [str(root / row["file"])], device=torch.device(device), dtype=dtype, with_base=with_base
            )
        except NoFaceDetectedError:
            skipped.append(row["file"])
            continue
        if not all(hasattr(features, kind) for kind in FEATURE_KINDS):
            raise InvalidArgumentTypeError(
                f"The extractor returned a {type(features).__name__} for {row['file']}, not HyperLoRAFeatures. Pass a "
                "FeatureExtractor, e.g. `face.build_feature_extractor(predictor.config, ...)`.",
                argument="extractor",
            )
        for kind in FEATURE_KINDS:
            value = getattr(features, kind)
            if value is not None:
                tensors[f"{row['file']}::{kind}"] = value[0].detach().to("cpu", torch.float32).contiguous()
    if skipped:
        logger.warning(f"No face found in {len(skipped)} image(s), left out of training: {', '.join(skipped[:10])}")
    if not tensors:
        raise TrainingDataError(
            f"No face was found in any image of {root}: nothing to train on. Use photos where one face is clearly "
            "visible, or check the face models."
        )
    output = Path(output) if output is not None else root / FEATURES_FILE
    metadata = {"format": FEATURES_FORMAT, "skipped": json.dumps(skipped)}
    _write_feature_cache(tensors, output, metadata)
    return output


def _write_feature_cache(tensors: dict[str, torch.Tensor], output: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary name next to `output`, then rename: a failed write (full or read-only disk) leaves
    `output` as it was, no temporary file, and raises `HyperLoRAWriteError` naming `output` (`atomic_path`)."""
    with atomic_path(output) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_feature_cache(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """`{file: {kind: tensor}}` from a file written by `cache_features`, checked: readable, every tensor finite,
    and every kind one width and one token count across the cache."""
    path = _path(path, "path")
    if not path.is_file():
        raise TrainingDataError(
            f"Feature cache {path} not found. Compute it once with "
            "`diffusers_hyperlora.training.cache_features(root, extractor)`."
        )
    try:
        result = _read_feature_cache(path)
    except HyperLoRAError:
        raise
    except Exception as error:  # safetensors' own error type (truncated or damaged file), OSError
        raise TrainingDataError(
            f"Could not read the feature cache {path}: {error}. The file is damaged or incomplete (an interrupted "
            "copy or write?); delete it and compute it again with `cache_features(root, extractor)`."
        ) from error
    _check_feature_shapes({file: entry for file, entry in result.items()}, str(path))
    return result


def _read_feature_cache(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    result: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != FEATURES_FORMAT:
            raise TrainingDataError(
                f"{path} is not a feature cache written by `cache_features`. Delete it and compute it again "
                "(`cache_features(root, extractor)`)."
            )
        for key in handle.keys():
            file, _, kind = key.rpartition("::")
            if kind not in FEATURE_KINDS:
                raise TrainingDataError(
                    f"{path}: unexpected key {key!r} (keys are `<file>::<kind>`, kinds {', '.join(FEATURE_KINDS)}). "
                    "The file is damaged or edited: delete it and compute it again (`cache_features`)."
                )
            tensor = handle.get_tensor(key)
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise TrainingDataError(
                    f"{path}: the {kind} of {file!r} hold NaN or infinite values (or are not floating point). "
                    "Compute the cache again (`cache_features`); if it recurs, leave that image out."
                )
            result.setdefault(file, {})[kind] = tensor
    return result


def _check_feature_shapes(entries: dict[Any, dict[str, Any]], source: str) -> None:
    """Every kind has one shape across the images (`[512]`-like vectors, `[T, E]` hidden states)."""
    for kind in FEATURE_KINDS:
        shapes: dict[tuple[int, ...], Any] = {}
        for name, entry in entries.items():
            value = entry.get(kind)
            if value is not None:
                shapes.setdefault(tuple(torch.as_tensor(value).shape), name)
        expected_dims = 1 if kind == "id_embeds" else 2
        for shape, name in shapes.items():
            if len(shape) != expected_dims:
                raise TrainingDataError(
                    f"{source}: the {kind} of {name!r} have shape {list(shape)}; expected {expected_dims} dimension(s) "
                    f"({'[512]' if expected_dims == 1 else '[tokens, width]'}) per image."
                )
        if len(shapes) > 1:
            (first, a), (second, b) = list(shapes.items())[:2]
            raise TrainingDataError(
                f"{source}: the {kind} differ in shape between images ({a!r}: {list(first)}, {b!r}: {list(second)}); "
                "every image needs features of one CLIP encoder and one token count. Compute them all with one "
                "extractor (`cache_features`)."
            )


def _square_crop(pixels: np.ndarray, resolution: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the short side to `resolution` (Lanczos), center-crop; `[3, R, R]` in [-1, 1] and `(top, left)`."""
    height, width = pixels.shape[:2]
    scale = resolution / min(height, width)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = Image.fromarray(pixels)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return tensor, (top, left)


class HyperLoRATrainingDataset(torch.utils.data.Dataset):
    """Training images with their captions, person labels and cached face features.

    Args:
        records: the images (`TrainingRecord`), each with the features of that one image.
        resolution: square training size in pixels; `None` (default): the base model's native size
            (`default_resolution(pipe)`: 1024 for SDXL), filled in by `train_stage`.
        num_references: default number of reference images per sample (`item`).

    Example:
        >>> from diffusers_hyperlora.training import tiny_training_dataset
        >>> dataset = tiny_training_dataset(num_people=2, images_per_person=2)
        >>> item = dataset[0]
        >>> item["pixel_values"].shape, item["clip_hidden_states"].shape[0], item["person"]
        (torch.Size([3, 32, 32]), 1, 'person-0')
    """

    def __init__(
        self, records: Sequence[TrainingRecord], resolution: int | None = None, num_references: int = 1
    ) -> None:
        if not records:
            raise TrainingDataError(
                "A training dataset needs at least one record: pass a non-empty list of `TrainingRecord`s.",
                argument="records",
            )
        check_resolution(resolution)
        if not _positive_int(num_references):
            raise TrainingDataError(
                f"num_references must be a positive integer, got {num_references!r}.", argument="num_references"
            )
        self.records = list(records)
        for index, record in enumerate(self.records):
            if not isinstance(record, TrainingRecord):
                raise InvalidArgumentTypeError(
                    f"records[{index}] is a {type(record).__name__}, not a TrainingRecord. Build records with "
                    "`TrainingRecord(image, caption, person, ...)`, or read a folder with `from_folder`.",
                    argument="records",
                )
        self.resolution = resolution
        self.num_references = num_references
        for kind in FEATURE_KINDS:
            present = [getattr(r, kind) is not None for r in self.records]
            if any(present) and not all(present):
                raise TrainingDataError(f"Some records have {kind} and others not: give it for every image or none.")
        _check_records(self.records)
        self.by_person: dict[str, list[int]] = {}
        for index, record in enumerate(self.records):
            self.by_person.setdefault(record.person, []).append(index)

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike,
        features: str | os.PathLike | None = None,
        resolution: int | None = None,
        num_references: int = 1,
    ) -> HyperLoRATrainingDataset:
        """A dataset folder (`metadata.jsonl` + images) with its feature cache (default `root/features.safetensors`).

        Images missing from the cache (no face found) are left out, with a warning.
        """
        root = Path(root)
        rows = read_metadata(root)
        cache = load_feature_cache(Path(features) if features is not None else root / FEATURES_FILE)
        records, missing = [], []
        for row in rows:
            entry = cache.get(row["file"])
            if entry is None:
                missing.append(row["file"])
                continue
            records.append(
                TrainingRecord(
                    image=root / row["file"],
                    caption=row["caption"],
                    person=row["person"],
                    **{kind: entry.get(kind) for kind in FEATURE_KINDS},
                )
            )
        if missing:
            logger.warning(f"{len(missing)} image(s) have no cached features (no face?), skipped: {missing[:10]}")
        if not records:
            raise TrainingDataError(
                f"No image of {root} has cached features. Compute them with `cache_features(root, extractor)` "
                "(images without a detected face are left out)."
            )
        return cls(records, resolution=resolution, num_references=num_references)

    @property
    def has_features(self) -> dict[str, bool]:
        """Which feature kinds the records carry."""
        return {kind: getattr(self.records[0], kind) is not None for kind in FEATURE_KINDS}

    def __len__(self) -> int:
        return len(self.records)

    def references(self, index: int, count: int, rng: random.Random | None = None) -> list[int]:
        """`index` first, then up to `count - 1` other images of the same person, drawn with `rng` (default:
        Python's global random state)."""
        others = [i for i in self.by_person[self.records[index].person] if i != index]
        return [index] + (rng or random).sample(others, min(count - 1, len(others)))

    def item(
        self,
        index: int,
        num_references: int | None = None,
        rng: random.Random | None = None,
        with_pixels: bool = True,
    ) -> dict[str, Any]:
        """The item at `index` with `num_references` reference images (default: the dataset's).

        `rng` draws the other references; `with_pixels=False` leaves out `pixel_values`, `original_size` and
        `crop_top_left` without reading the image (for training on cached latents).
        """
        record = self.records[index]
        refs = self.references(index, num_references or self.num_references, rng)
        item: dict[str, Any] = {
            "index": index,
            "caption": record.caption,
            "person": record.person,
            "reference_key": tuple(sorted(refs)),
        }
        if with_pixels:
            if self.resolution is None:
                raise TrainingDataError(
                    "This dataset has no resolution yet: pass `resolution=` (e.g. 1024 for SDXL), or let `train_stage` "
                    "set the base model's native size.",
                    argument="resolution",
                )
            pixels = _load_pixels(record.image, index)
            item["pixel_values"], item["crop_top_left"] = _square_crop(pixels, self.resolution)
            item["original_size"] = (pixels.shape[0], pixels.shape[1])
        for kind in FEATURE_KINDS:
            values = [getattr(self.records[i], kind) for i in refs]
            item[kind] = None if values[0] is None else torch.stack([torch.as_tensor(v) for v in values])
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def check_images(self) -> None:
        """Open every image file and check that it decodes (`TrainingDataError` naming the first that does not).

        `train_stage` calls this before it changes anything, so an unreadable image stops a run at its start.
        """
        for index, record in enumerate(self.records):
            if isinstance(record.image, (str, os.PathLike)):
                _verified(Path(record.image), index)

    def feature_widths(self) -> dict[str, tuple[int, ...]]:
        """The shape of one image's features of each kind the records carry (e.g. `{"id_embeds": (512,)}`)."""
        first = self.records[0]
        return {
            kind: tuple(torch.as_tensor(getattr(first, kind)).shape)
            for kind in FEATURE_KINDS
            if getattr(first, kind) is not None
        }


def check_resolution(resolution: int | None) -> None:
    """Refuse a training size that is not a positive multiple of `RESOLUTION_MULTIPLE` (`None`, the base model's
    native size, passes): the VAE of every supported base model downscales by 8, so other sizes cannot be encoded
    into whole latents. `HyperLoRATrainingDataset` and `train --resolution` both check with this."""
    if resolution is None or (_positive_int(resolution) and resolution % RESOLUTION_MULTIPLE == 0):
        return
    raise TrainingDataError(
        f"resolution must be a positive multiple of {RESOLUTION_MULTIPLE} (the VAE's downscaling), got "
        f"{resolution!r}: pass e.g. 1024 for SDXL, 512 for SD 1.5, or None for the base model's own size.",
        argument="resolution",
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_records(records: list[TrainingRecord]) -> None:
    """Finite features of one shape per kind (a NaN would train to NaN; mixed shapes cannot be batched)."""
    for index, record in enumerate(records):
        for kind in FEATURE_KINDS:
            value = getattr(record, kind)
            if value is None:
                continue
            tensor = torch.as_tensor(value)
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                where = record.image if isinstance(record.image, (str, Path)) else "in memory"
                raise TrainingDataError(
                    f"Training record {index} ({where}): its {kind} hold NaN or infinite values (or are not "
                    "floating point). Compute its features again, or leave the image out.",
                    argument=kind,
                )
    _check_feature_shapes({index: vars(record) for index, record in enumerate(records)}, "training records")


def _verified(path: Path, index: int) -> None:
    if not path.is_file():
        raise TrainingDataError(
            f"training image {index}: file {path} not found. Restore it, or remove its record (its line in "
            "metadata.jsonl)."
        )
    try:
        with Image.open(path) as opened:
            opened.verify()
    except Exception as error:  # PIL raises many types for a damaged or foreign file
        raise TrainingDataError(
            f"training image {index}: {path} is not a readable image ({type(error).__name__}: {error}). Replace or "
            "remove it (and its line in metadata.jsonl), then cache the features again."
        ) from error


def _load_pixels(image: Any, index: int) -> np.ndarray:
    """RGB uint8 `[H, W, 3]`; files and PIL images get EXIF orientation and alpha handling (`face.images`)."""
    from ..face.images import load_image, pil_to_rgb

    name = f"training image {index}"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise TrainingDataError(
                f"{name}: file {path} not found. Restore it, or remove its record (its line in metadata.jsonl)."
            )
        try:
            with Image.open(path) as opened:
                return pil_to_rgb(opened, name)
        except HyperLoRAError:
            raise
        except Exception as error:  # PIL raises many types for a damaged or foreign file
            raise TrainingDataError(
                f"{name}: {path} could not be read as an image ({type(error).__name__}: {error}). Replace or remove "
                "it (and its line in metadata.jsonl)."
            ) from error
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, name)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image
    return load_image(image, name=name, max_side=None).pixels


def collate_examples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels and size conditions; keep the per-sample features as lists (their image counts differ).

    `index` (the dataset index, which seeds each sample's noise) and the pixels are kept when every item has them.
    """
    batch: dict[str, Any] = {
        "caption": [item["caption"] for item in items],
        "person": [item["person"] for item in items],
        "reference_key": [item.get("reference_key", (id(item),)) for item in items],
    }
    if all("index" in item for item in items):
        batch["index"] = [int(item["index"]) for item in items]
    if all("pixel_values" in item for item in items):
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
        batch["original_size"] = [tuple(item["original_size"]) for item in items]
        batch["crop_top_left"] = [tuple(item["crop_top_left"]) for item in items]
    for kind in FEATURE_KINDS:
        values = [item.get(kind) for item in items]
        batch[kind] = None if any(v is None for v in values) else values
    return batch


def _person_image(person: int, variant: int, resolution: int, generator: torch.Generator) -> np.ndarray:
    """A synthetic photo: a person-specific colour and stripe pattern, a variant-specific background shift."""
    colours = torch.rand(3, generator=generator)
    y, x = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
    stripes = torch.sin((x + (person + 1) * y) * (0.3 + 0.2 * person)).unsqueeze(0)
    image = 0.5 + 0.35 * stripes * colours.unsqueeze(-1).unsqueeze(-1) + 0.1 * (variant % 3) - 0.1
    return (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def tiny_training_dataset(
    num_people: int = 2,
    images_per_person: int = 2,
    resolution: int = 32,
    clip_tokens: int = 5,
    image_embed_dim: int = 48,
    id_embed_dim: int = 512,
    with_base: bool = True,
    seed: int = 0,
    captions: Callable[[int, int], str] | None = None,
) -> HyperLoRATrainingDataset:
    """A small in-code dataset for tests and demos (no files, no encoders).

    Each person has a distinct synthetic image pattern and a feature "signature" (ArcFace and CLIP vectors shared
    by the person's images, plus per-image noise), so a predictor can learn to map features to images.
    `image_embed_dim` must match the predictor's `image_embed_dim` (48 for `tiny_hyperlora_predictor`).

    Example:
        >>> len(tiny_training_dataset(num_people=3, images_per_person=2))
        6
    """
    generator = torch.Generator().manual_seed(seed)
    records = []
    for person in range(num_people):
        arcface = torch.randn(id_embed_dim, generator=generator)
        clip = torch.randn(clip_tokens, image_embed_dim, generator=generator)
        for variant in range(images_per_person):
            noise = 0.1 * torch.randn(id_embed_dim, generator=generator)
            records.append(
                TrainingRecord(
                    image=_person_image(person, variant, resolution, generator),
                    caption=captions(person, variant) if captions else f"a photo of person {person}, view {variant}",
                    person=f"person-{person}",
                    id_embeds=torch.nn.functional.normalize(arcface + noise, dim=-1),
                    clip_hidden_states=clip + 0.1 * torch.randn(clip_tokens, image_embed_dim, generator=generator),
                    base_clip_hidden_states=(
                        torch.randn(clip_tokens, image_embed_dim, generator=generator) if with_base else None
                    ),
                )
            )
    return HyperLoRATrainingDataset(records, resolution=resolution)
