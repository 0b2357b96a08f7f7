"""`FaceFeatureExtractor`: photos -> `HyperLoRAFeatures` (ArcFace embeddings + CLIP hidden states); see docs/face.md.

Per image: detect (sizes 640, 512, 384, 256; first that finds a face), pick a face (the largest by default),
CLIP crop of the background-removed image (optionally grayscale), ArcFace embedding of the face re-detected at
640 in the wider crop of the original, and the blurred-face Base image when the checkpoint has a Base branch.
Encoders are loaded on first use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image

from ..errors import (
    FaceModelsNotFoundError,
    FaceSelectionError,
    InvalidArgumentTypeError,
    NoFaceDetectedError,
)
from ..identities.features import HyperLoRAFeatures
from ..io.hub import HubOptions, Location, resolve_location
from ..model.config import HyperLoRAConfig
from .analyzer import (
    DETECTION_SIZES,
    INSIGHTFACE_HOME,
    DetectedFace,
    FaceAnalysisLike,
    FaceAnalyzer,
    resolve_face_models_dir,
)
from .checks import check_embedding, check_face_geometry
from .conditioning import blur_face, remove_background
from .crops import SquareCrop, arcface_crop, base_crop_box, box_iou, clip_crop, crop_padded, shift_box
from .encoders import CLIPImageEncoder, as_image_encoder
from .images import DEFAULT_MAX_SIDE, InputImage, load_images

logger = logging.get_logger(__name__)

ARCFACE_DETECTION_SIZE = 640
REDETECTION_MIN_IOU = 0.3
OPTIONS = ("face_index", "remove_background", "grayscale", "det_sizes", "base_crop_scale", "max_image_side")


@dataclass
class FaceInputs:
    """What the encoders see for one photo (all images PIL, boxes in pixels of `image`).

    Attributes:
        source: the input's name. image: the photo as used (RGB, EXIF-rotated, maybe downscaled).
        num_faces: faces found. detection_size: the detector size that found them. face_box: the chosen face.
        landmarks: its 106 landmarks `[106, 2]`. clip_crop: the CLIP crop square (centre, half-side l).
        clip_image: the crop handed to the CLIP image processor.
        background_removed, face_mask: the background-removed photo and its soft mask (`None` when off).
        arcface_image: the wider crop (half-side 2 l) the ArcFace face is detected in; arcface_box: that face.
        id_embedding: its normed ArcFace embedding `[512]`.
        base_image, base_mask: the Base branch's input (face blurred, cropped) and blur mask, or `None`.
    """

    source: str
    image: Image.Image
    num_faces: int
    detection_size: int
    face_box: tuple[float, float, float, float]
    landmarks: np.ndarray
    clip_crop: SquareCrop
    clip_image: Image.Image
    arcface_image: Image.Image
    background_removed: Image.Image | None = None
    face_mask: Image.Image | None = None
    arcface_box: tuple[float, float, float, float] | None = None
    id_embedding: np.ndarray | None = None
    base_image: Image.Image | None = None
    base_mask: Image.Image | None = None


def _check_options(options: Mapping[str, Any], allowed: Sequence[str] = OPTIONS) -> None:
    """Refuse a face-pipeline option that does not exist (a typo would otherwise be a raw `TypeError`)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidArgumentTypeError(
            f"Unknown face-pipeline option(s) {unknown}; valid: {', '.join(OPTIONS)}.", argument=unknown[0]
        )


def _known_options_only(method: Callable) -> Callable:
    """`prepare_inputs` refuses unknown options with `InvalidArgumentTypeError`, as `__call__` does."""

    @functools.wraps(method)
    def checked(self: Any, images: Any, **options: Any) -> Any:
        _check_options(options, (*OPTIONS, "with_base"))
        return method(self, images, **options)

    return checked


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.floor(mask * 255.0 + 0.5), 0, 255).astype(np.uint8), mode="L")


def _face_indices(face_index: int | Sequence[int], count: int) -> list[int]:
    indices = [face_index] * count if isinstance(face_index, int) else list(face_index)
    if len(indices) != count or any(not isinstance(i, int) or i < 0 for i in indices):
        raise FaceSelectionError(
            f"face_index must be an int >= 0 (0 = the largest face, 1 = the second largest, ...) or one such int "
            f"per input image ({count}); got {face_index!r}.",
            argument="face_index",
        )
    return indices


class FaceFeatureExtractor:
    """The face pipeline (docs/face.md) as a `FeatureExtractor` (see `diffusers_hyperlora.identities.features`).

    Args:
        config: the checkpoint's config (which conditions it reads, CLIP width).
        image_encoder: a `CLIPImageEncoder`, or a zero-argument function returning one (called on first use).
        face_analyzer: a `FaceAnalyzer`, or a zero-argument function returning one (called on first use).

    Example:
        >>> extractor = FaceFeatureExtractor(config, image_encoder=encoder, face_analyzer=analyzer)  # doctest: +SKIP
        >>> features = extractor(["me.jpg"], device="cpu", dtype=torch.float32, with_base=False)  # doctest: +SKIP
        >>> extractor.prepare_inputs(["me.jpg"])[0].clip_image.save("what_clip_sees.png")  # doctest: +SKIP
    """

    def __init__(
        self,
        config: HyperLoRAConfig,
        image_encoder: CLIPImageEncoder | Callable[[], CLIPImageEncoder] | None,
        face_analyzer: FaceAnalyzer | Callable[[], FaceAnalyzer],
    ) -> None:
        self.config = config
        self._image_encoder = image_encoder
        self._face_analyzer = face_analyzer

    @property
    def image_encoder(self) -> CLIPImageEncoder:
        """The CLIP encoder (loaded now if it was not yet)."""
        if self._image_encoder is None:
            raise FaceModelsNotFoundError(
                "No CLIP image encoder was given: pass `image_encoder=` to load_hyperlora.", argument="image_encoder"
            )
        if not isinstance(self._image_encoder, CLIPImageEncoder):
            self._image_encoder = self._image_encoder()
            self._image_encoder.check_width(self.config.image_embed_dim)
        return self._image_encoder

    @property
    def face_analyzer(self) -> FaceAnalyzer:
        """The face analyzer (loaded now if it was not yet)."""
        if not isinstance(self._face_analyzer, FaceAnalyzer):
            self._face_analyzer = self._face_analyzer()
        return self._face_analyzer

    # ------------------------------------------------------------------ per photo
    def _pick(self, image: InputImage, faces: list[DetectedFace], index: int) -> DetectedFace:
        ranked = sorted(faces, key=lambda f: -f.area)
        if index >= len(ranked):
            raise FaceSelectionError(
                f"Input image {image.name} has {len(ranked)} face(s) but face_index={index} was asked for (0 = the "
                "largest). Pass a smaller face_index, or one per image.",
                argument="face_index",
            )
        if len(ranked) > 1:
            which = "the largest" if index == 0 else f"number {index + 1} by size"
            logger.warning(
                f"Input image {image.name}: {len(ranked)} faces found, using {which} (face_index={index}). Pass "
                "face_index=... to choose another, or crop the photo to one person."
            )
        face = ranked[index]
        check_face_geometry(face.bbox, face.landmarks, image.size, image.name)
        if face.landmarks is None or face.landmarks.shape[0] < 106:
            raise FaceModelsNotFoundError(
                "The face analyzer gave no 106-point landmarks (`landmark_2d_106`), which the HyperLoRA crops need. "
                "Use AntelopeV2 with its 2d106det.onnx, or make your analyzer's faces carry `landmark_2d_106`.",
                argument="face_analyzer",
            )
        return face

    def _arcface(self, pixels: np.ndarray, face: DetectedFace, crop: SquareCrop, name: str) -> tuple:
        box = crop.box()
        wide = crop_padded(pixels, box)
        expected = shift_box(face.bbox, box[0], box[1])
        found = self.face_analyzer.faces_at(wide, ARCFACE_DETECTION_SIZE) if self.config.use_id_embeds else []
        best = max(found, key=lambda f: box_iou(f.bbox, expected), default=None)
        if best is not None and box_iou(best.bbox, expected) >= REDETECTION_MIN_IOU and best.embedding is not None:
            return wide, tuple(float(v) for v in best.bbox), best.embedding
        if self.config.use_id_embeds:
            logger.warning(
                f"Input image {name}: the face was not found again in its ArcFace crop; using the embedding from the "
                "full photo instead."
            )
        return wide, expected, face.embedding

    def _prepare_one(
        self, image: InputImage, index: int, *, det_sizes, remove_bg: bool, grayscale: bool, with_base: bool, scale
    ) -> FaceInputs | None:
        faces, size = self.face_analyzer.detect(image.pixels, det_sizes)
        if not faces:
            return None
        face = self._pick(image, faces, index)
        pixels, landmarks = image.pixels, face.landmarks
        crop = clip_crop(landmarks)
        inputs = FaceInputs(
            source=image.name,
            image=Image.fromarray(pixels),
            num_faces=len(faces),
            detection_size=int(size),
            face_box=tuple(float(v) for v in face.bbox),
            landmarks=landmarks,
            clip_crop=crop,
            clip_image=None,  # type: ignore[arg-type]
            arcface_image=None,  # type: ignore[arg-type]
        )
        clip_source = pixels
        if remove_bg:
            composite = remove_background(pixels, landmarks)
            clip_source = composite.image
            inputs.background_removed = Image.fromarray(composite.image)
            inputs.face_mask = _mask_image(composite.mask)
        clip_image = Image.fromarray(crop_padded(clip_source, crop.box()))
        inputs.clip_image = clip_image.convert("L").convert("RGB") if grayscale else clip_image
        wide, arc_box, embedding = self._arcface(pixels, face, arcface_crop(crop), image.name)
        inputs.arcface_image, inputs.arcface_box, inputs.id_embedding = Image.fromarray(wide), arc_box, embedding
        if with_base:
            blurred = blur_face(pixels, landmarks)
            x0, y0, x1, y1 = base_crop_box(crop, image.size, scale)
            inputs.base_image = Image.fromarray(blurred.image[y0:y1, x0:x1])
            inputs.base_mask = _mask_image(blurred.mask)
        return inputs

    @_known_options_only
    def prepare_inputs(
        self,
        images: Any,
        *,
        with_base: bool | None = None,
        face_index: int | Sequence[int] = 0,
        remove_background: bool = True,
        grayscale: bool = False,
        det_sizes: Sequence[int] = DETECTION_SIZES,
        base_crop_scale: float | Sequence[float] = 1.0,
        max_image_side: int | None = DEFAULT_MAX_SIDE,
    ) -> list[FaceInputs]:
        """The crops, masks and embeddings the encoders will get, one `FaceInputs` per photo with a face.

        Args:
            images: one image or a list (file paths, PIL, numpy, torch; a 4-D batch counts as several).
            with_base: also build the Base-branch input (default: when the checkpoint has a Base branch).
            face_index: which face when a photo has several: 0 = the largest (default), 1 = the second, ...;
                or one index per photo.
            remove_background: replace everything but the face by flat gray before the CLIP crop (default on).
            grayscale: feed CLIP a grayscale crop.
            det_sizes: detector sizes to try, in order.
            base_crop_scale: the Base crop's half-sides in units of l: one number or (left, right, top, bottom).
            max_image_side: larger photos are downscaled to this longer side first (`None`: never).

        Raises:
            NoFaceDetectedError: no photo has a face (photos without one are skipped with a warning).
        """
        loaded = load_images(images, max_side=max_image_side)
        indices = _face_indices(face_index, len(loaded))
        with_base = self.config.has_base if with_base is None else with_base
        prepared, faceless = [], []
        for image, index in zip(loaded, indices):
            inputs = self._prepare_one(
                image,
                index,
                det_sizes=tuple(det_sizes),
                remove_bg=remove_background,
                grayscale=grayscale,
                with_base=with_base,
                scale=base_crop_scale,
            )
            (prepared if inputs is not None else faceless).append(inputs if inputs is not None else image.name)
        if not prepared:
            raise NoFaceDetectedError(
                f"No face was detected in any input image ({', '.join(faceless)}), at detector sizes "
                f"{list(det_sizes)}. Use photos where one face is clearly visible, frontal and at least ~100 px tall."
            )
        if faceless:
            logger.warning(f"No face detected in {', '.join(faceless)}: skipped. Using {len(prepared)} image(s).")
        return prepared

    # ------------------------------------------------------------------ FeatureExtractor
    def __call__(
        self, images: list[Any], *, device: torch.device, dtype: torch.dtype, with_base: bool, **options: Any
    ) -> HyperLoRAFeatures:
        """Photos -> `HyperLoRAFeatures` on `device` in `dtype` (options as in `prepare_inputs`)."""
        _check_options(options)
        prepared = self.prepare_inputs(images, with_base=with_base, **options)
        id_embeds = None
        if self.config.use_id_embeds:
            missing = [p.source for p in prepared if p.id_embedding is None]
            if missing:
                raise FaceModelsNotFoundError(
                    f"No ArcFace embedding for {', '.join(missing)}: the face analyzer has no recognition model. Use "
                    "AntelopeV2 with glintr100.onnx, or an analyzer whose faces carry `normed_embedding`.",
                    argument="face_analyzer",
                )
            for p in prepared:
                check_embedding(p.id_embedding, p.source)
            stacked = torch.from_numpy(np.stack([p.id_embedding for p in prepared]).astype(np.float32))
            id_embeds = torch.nn.functional.normalize(stacked, dim=-1).to(device=device, dtype=dtype)
        clip = None
        if self.config.use_image_embeds:
            clip = self.image_encoder.hidden_states([p.clip_image for p in prepared], device, dtype)
        base = None
        if with_base:
            base = self.image_encoder.hidden_states([p.base_image for p in prepared], device, dtype)
        return HyperLoRAFeatures(
            id_embeds=id_embeds,
            clip_hidden_states=clip,
            base_clip_hidden_states=base,
            sources=[p.source for p in prepared],
        )


# ---------------------------------------------------------------------- wiring from load_hyperlora
# Names are resolved now (a bad name fails at load time); the models are loaded on first use.
def _checkpoint(source: str | None, options: HubOptions) -> Location | None:
    return None if source is None else Location(os.fspath(source), options)


def image_encoder_loader(
    config: HyperLoRAConfig, source: str | None, image_encoder: Any, hub_options: HubOptions
) -> CLIPImageEncoder | Callable[[], CLIPImageEncoder]:
    """A ready encoder, or a function that loads the one `image_encoder` / the checkpoint's config names."""
    ready = as_image_encoder(image_encoder)
    if ready is not None:
        ready.check_width(config.image_embed_dim)
        return ready
    if image_encoder is not None and not isinstance(image_encoder, (str, os.PathLike)):
        raise InvalidArgumentTypeError(
            f"image_encoder must be a repo id, a local folder, a CLIPVisionModelWithProjection, (model, processor) "
            f"or a CLIPImageEncoder; got a {type(image_encoder).__name__}.",
            argument="image_encoder",
        )
    if image_encoder is not None:  # the caller's choice: a folder or a repo id ("org/name[/sub/folder]")
        location = resolve_location(image_encoder, hub_options.for_other_repo())
    else:
        location = resolve_location(
            config.image_encoder, hub_options.for_other_repo(), subfolder=config.image_encoder_subfolder,
            relative_to=_checkpoint(source, hub_options),
        )  # fmt: skip
    return lambda: CLIPImageEncoder.from_pretrained(location)


def face_analyzer_loader(
    config: HyperLoRAConfig, source: str | None, face_analyzer: Any, hub_options: HubOptions
) -> FaceAnalyzer | Callable[[], FaceAnalyzer]:
    """A ready analyzer, or a function that loads the face models `face_analyzer` / the config names."""
    if isinstance(face_analyzer, FaceAnalyzer):
        return face_analyzer
    if face_analyzer is not None and not isinstance(face_analyzer, (str, os.PathLike)):
        return FaceAnalyzer(face_analyzer)  # raises a clear TypeError unless FaceAnalysisLike
    if face_analyzer is not None:
        location = resolve_location(face_analyzer, hub_options.for_other_repo())
    elif config.face_models:
        location = resolve_location(
            config.face_models, hub_options.for_other_repo(), relative_to=_checkpoint(source, hub_options)
        )
    else:
        return _default_insightface_root
    return lambda: FaceAnalyzer.from_pretrained(location)


def _default_insightface_root() -> FaceAnalyzer:
    root = Path(os.environ.get(INSIGHTFACE_HOME, "~/.insightface")).expanduser()
    try:
        resolve_face_models_dir(root)
    except FaceModelsNotFoundError as error:
        raise FaceModelsNotFoundError(
            f"No face models were named (load_hyperlora's `face_analyzer=`, or the checkpoint's `face_models`) and "
            f"none were found in the insightface root {str(root)!r}. Fix: pass `face_analyzer=` a folder with "
            "AntelopeV2's ONNX files, a Hub repo that holds them, or a FaceAnalysis object; or unpack antelopev2.zip "
            f"into {root / 'models'}.",
            argument="face_analyzer",
        ) from error
    return FaceAnalyzer.from_pretrained(root)


def build_feature_extractor(
    config: HyperLoRAConfig,
    *,
    source: str | None,
    image_encoder: Any,
    face_analyzer: Any,
    hub_options: HubOptions | Mapping[str, Any] | None = None,
) -> FaceFeatureExtractor:
    """The face pipeline for a loaded checkpoint; what `load_hyperlora` builds on the first identity call.

    Args:
        config: the checkpoint's config (its `image_encoder`, `image_encoder_subfolder`, `face_models` are the
            defaults).
        source: the checkpoint's path or repo id (`None` for a predictor object).
        image_encoder: `None`, a repo id / local folder, or a ready model / `(model, processor)` / `CLIPImageEncoder`.
        face_analyzer: `None`, a folder / insightface root / Hub repo, or a `FaceAnalyzer` / FaceAnalysis-like object.
        hub_options: the checkpoint's `HubOptions` (or a dict of its fields: subfolder, revision, token, cache_dir,
            local_files_only, force_download). Where names lead is decided by `io.resolve_location`
            (docs/loading.md): folders of the checkpoint use all of them, other repos all but subfolder / revision.

    Example:
        >>> extractor = build_feature_extractor(config, source=None, image_encoder=encoder,
        ...                                     face_analyzer="~/.insightface", hub_options={})  # doctest: +SKIP
    """
    options = HubOptions.of(hub_options)
    needs_clip = config.use_image_embeds or config.has_base
    encoder = image_encoder_loader(config, source, image_encoder, options) if needs_clip else None
    analyzer = face_analyzer_loader(config, source, face_analyzer, options)
    return FaceFeatureExtractor(config, encoder, analyzer)


__all__ = [
    "FaceAnalysisLike",
    "FaceFeatureExtractor",
    "FaceInputs",
    "build_feature_extractor",
    "face_analyzer_loader",
    "image_encoder_loader",
]
