"""Face analysis: insightface's `FaceAnalysis` (AntelopeV2) behind a small interface anyone can implement.

`FaceAnalyzer` wraps any object with insightface's two-method interface (`FaceAnalysisLike`):

- `prepare(ctx_id, det_size=(s, s))`: set the detector's input size;
- `get(image_bgr)`: the faces in a BGR uint8 `[H, W, 3]` image, each with `bbox` `(x0, y0, x1, y1)`,
  `landmark_2d_106` `[106, 2]` and `normed_embedding` `[512]` (attributes or mapping keys; `det_score` and
  `kps`, when present, are kept in `DetectedFace.score` / `.keypoints` for you: the crops do not use them).

So `insightface.app.FaceAnalysis` works as is, and so does any other detector adapted to it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from diffusers.utils import logging

from ..errors import (
    CheckpointNotFoundError,
    FaceModelsNotFoundError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    MissingDependencyError,
)
from ..io.hub import HubOptions, Location, resolve_location
from ..utils.compat import insightface_app_from_folder, insightface_tasks
from .crops import box_area

logger = logging.get_logger(__name__)

DETECTION_SIZES: tuple[int, ...] = (640, 512, 384, 256)  # the release's fallbacks, first that finds a face wins
ANTELOPEV2 = "antelopev2"
FACE_TASKS = ("detection", "landmark_2d_106", "recognition")
INSIGHTFACE_HOME = "INSIGHTFACE_HOME"
ONNX_PATTERNS = ("*.onnx",)  # at any depth (fnmatch's * crosses "/"): also the unpacked zip's nested folder


@runtime_checkable
class FaceAnalysisLike(Protocol):
    """The interface of `insightface.app.FaceAnalysis` that HyperLoRA uses (see the module docstring)."""

    def prepare(self, ctx_id: int, det_size: tuple[int, int] = ...) -> Any: ...

    def get(self, img: np.ndarray) -> Sequence[Any]: ...


@dataclass
class DetectedFace:
    """One face: box, 106 landmarks, normed ArcFace embedding (or `None`), score and 5 keypoints (or `None`)."""

    bbox: np.ndarray
    landmarks: np.ndarray | None
    embedding: np.ndarray | None
    score: float = 1.0
    keypoints: np.ndarray | None = None

    @property
    def area(self) -> float:
        return box_area(self.bbox)


def _field(face: Any, name: str) -> Any:
    value = getattr(face, name, None)
    if value is None and isinstance(face, dict):
        value = face.get(name)
    return value


def to_detected_face(face: Any) -> DetectedFace:
    """Read an insightface `Face` (or any object / dict with the same fields) into a `DetectedFace`."""
    bbox = _field(face, "bbox")
    if bbox is None:
        raise InvalidArgumentTypeError(
            f"A detected face must have a `bbox` (x0, y0, x1, y1); got {type(face).__name__}. The face analyzer "
            "must return insightface-like faces.",
            argument="face_analyzer",
        )
    landmarks = _field(face, "landmark_2d_106")
    embedding = _field(face, "normed_embedding")
    if embedding is None and _field(face, "embedding") is not None:
        raw = np.asarray(_field(face, "embedding"), dtype=np.float32).reshape(-1)
        embedding = raw / max(float(np.linalg.norm(raw)), 1e-12)
    score = _field(face, "det_score")
    keypoints = _field(face, "kps")
    return DetectedFace(
        bbox=np.asarray(bbox, dtype=np.float32).reshape(-1)[:4],
        landmarks=None if landmarks is None else np.asarray(landmarks, dtype=np.float32).reshape(-1, 2),
        embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32).reshape(-1),
        score=1.0 if score is None else float(score),
        keypoints=None if keypoints is None else np.asarray(keypoints, dtype=np.float32).reshape(-1, 2),
    )


def select_providers(
    available: Sequence[str], gpu_available: bool, requested: Sequence[Any] | None = None
) -> list[Any]:
    """ONNX Runtime execution providers: `requested` if given (checked), else CUDA + CPU with a GPU, else CPU.

    Example:
        >>> select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], gpu_available=True)
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
        >>> select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], gpu_available=False)
        ['CPUExecutionProvider']
    """
    if requested is not None:
        requested = [requested] if isinstance(requested, str) else list(requested)
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in requested]
        missing = [n for n in names if n not in available]
        if not requested or missing:
            raise InvalidArgumentError(
                f"ONNX Runtime execution providers {missing or requested!r} are not available here; available: "
                f"{list(available)}. Pass some of those as `providers=`, or install onnxruntime-gpu for CUDA.",
                argument="providers",
            )
        return requested
    if gpu_available and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _has_onnx(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.onnx"))


def resolve_face_models_dir(path: str | os.PathLike) -> Path:
    """The folder that holds the ONNX files, from a model folder, an `antelopev2` folder, or an insightface root.

    Recognized, in order: `path/*.onnx`; `path/antelopev2/*.onnx`; `path/antelopev2/antelopev2/*.onnx` (the
    official zip unpacked in place); `path/models/antelopev2[/antelopev2]/*.onnx` (an insightface root).

    Example:
        >>> resolve_face_models_dir("~/.insightface")  # doctest: +SKIP
        PosixPath('/home/me/.insightface/models/antelopev2')
    """
    root = Path(path).expanduser()
    candidates = [
        root,
        root / ANTELOPEV2,
        root / ANTELOPEV2 / ANTELOPEV2,
        root / "models" / ANTELOPEV2,
        root / "models" / ANTELOPEV2 / ANTELOPEV2,
    ]
    for candidate in candidates:
        if _has_onnx(candidate):
            return candidate
    found = sorted(p.name for p in root.iterdir())[:12] if root.is_dir() else []
    raise FaceModelsNotFoundError(
        f"No face-analysis models (.onnx files) in {str(root)!r}"
        + (f" (it holds: {', '.join(found)})" if found else " (no such folder)" if not root.is_dir() else "")
        + ". Expected a folder with AntelopeV2's ONNX files (scrfd_10g_bnkps.onnx, 2d106det.onnx, glintr100.onnx), "
        "an `antelopev2` folder (also the nested `antelopev2/antelopev2` of the unpacked zip) or an insightface root "
        "(`<root>/models/antelopev2`). Fix: unpack antelopev2.zip there, or pass `face_analyzer=` a folder or "
        "Hub repo that holds the files.",
        argument="face_analyzer",
    )


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch without CUDA support
        return False


class FaceAnalyzer:
    """Detects faces with the release's size fallbacks and reads them into `DetectedFace`s.

    Args:
        app: any `FaceAnalysisLike` (e.g. `insightface.app.FaceAnalysis`).
        det_thresh: detector score threshold passed to `app.prepare` (insightface's default 0.5); `None` keeps
            the app's own.
        ctx_id: insightface's device index for `prepare` (0; a negative value forces the CPU).

    Example:
        >>> analyzer = FaceAnalyzer.from_pretrained("~/.insightface")  # doctest: +SKIP
        >>> faces, size = analyzer.detect(rgb_array)  # doctest: +SKIP
    """

    def __init__(self, app: FaceAnalysisLike, det_thresh: float | None = None, ctx_id: int = 0) -> None:
        if not isinstance(app, FaceAnalysisLike):
            raise InvalidArgumentTypeError(
                f"face_analyzer must offer insightface's `prepare(ctx_id, det_size=...)` and `get(image_bgr)`; got a "
                f"{type(app).__name__}. Pass an insightface FaceAnalysis, a folder / Hub repo of AntelopeV2 models, "
                "or wrap your detector in that interface.",
                argument="face_analyzer",
            )
        self.app = app
        self.det_thresh = det_thresh
        self.ctx_id = ctx_id
        self._prepared_size: int | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike | Location,
        hub_options: HubOptions | Mapping[str, Any] | None = None,
        *,
        providers: Sequence[Any] | None = None,
        det_thresh: float | None = 0.5,
        **hub_kwargs: Any,
    ) -> FaceAnalyzer:
        """Load AntelopeV2 with insightface from a folder, an insightface root or a Hub repo (sub)folder.

        Args:
            path_or_repo: local folder / insightface root, or a Hub repo id (`"org/name"`, or `"org/name/sub"` for a
                folder of it), resolved by `diffusers_hyperlora.io.resolve_location` (docs/loading.md). Only the
                `.onnx` files of a Hub folder are downloaded.
            hub_options: `HubOptions` (or a dict of its fields); the keywords `subfolder`, `revision`, `token`,
                `cache_dir`, `local_files_only`, `force_download` override it.
            providers: ONNX Runtime execution providers (default: CUDA when onnxruntime-gpu and a GPU are there,
                else CPU).
            det_thresh: detector score threshold.
        """
        try:
            location = resolve_location(path_or_repo, HubOptions.of(hub_options, **hub_kwargs))
            folder = location.folder(ONNX_PATTERNS, what="the face models (.onnx files)")
        except CheckpointNotFoundError as error:
            raise FaceModelsNotFoundError(
                f"{error} Alternatively pass `face_analyzer=` a folder with AntelopeV2's .onnx files, an insightface "
                "root or a FaceAnalysis object.",
                argument="face_analyzer",
            ) from error
        return cls(load_insightface_app(resolve_face_models_dir(folder), providers), det_thresh=det_thresh)

    # ------------------------------------------------------------------ detection
    def _prepare(self, size: int) -> None:
        if self._prepared_size == size:
            return
        kwargs: dict[str, Any] = {"det_size": (size, size)}
        if self.det_thresh is not None:
            kwargs["det_thresh"] = self.det_thresh
        self.app.prepare(self.ctx_id, **kwargs)
        self._prepared_size = size

    def faces_at(self, image: np.ndarray, size: int) -> list[DetectedFace]:
        """The faces in an RGB uint8 image with the detector at `size` x `size`."""
        self._prepare(size)
        bgr = np.ascontiguousarray(image[..., ::-1])
        return [to_detected_face(face) for face in self.app.get(bgr)]

    def detect(
        self, image: np.ndarray, sizes: Sequence[int] = DETECTION_SIZES
    ) -> tuple[list[DetectedFace], int | None]:
        """Try the detector sizes in order and return the faces of the first that finds any, and that size.

        Returns `([], None)` when no size finds a face.
        """
        for size in sizes:
            faces = self.faces_at(image, size)
            if faces:
                return faces, size
        return [], None


def load_insightface_app(folder: str | os.PathLike, providers: Sequence[Any] | None = None) -> Any:
    """`insightface.app.FaceAnalysis` over the ONNX files of `folder` (detection, 2d106 landmarks, recognition)."""
    try:
        import insightface.app  # noqa: F401 - loaded by utils.compat.insightface_app_from_folder
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(
            "Reading faces from photos needs insightface and onnxruntime: `pip install 'diffusers-hyperlora[face]'` "
            "(from a clone: `pip install -e '.[face]'`; `[face-gpu]` for CUDA). Alternatively pass `face_analyzer=` "
            "your own FaceAnalysis-like object."
        ) from error
    folder = Path(folder).resolve()
    chosen = select_providers(onnxruntime.get_available_providers(), _gpu_available(), providers)
    logger.info(f"Loading face models from {folder} with {chosen}.")
    app = insightface_app_from_folder(folder, chosen, FACE_TASKS)
    if app is None:
        raise FaceModelsNotFoundError(
            f"The face models in {str(folder)!r} have no face detector insightface recognizes (e.g. "
            "scrfd_10g_bnkps.onnx). Use the complete AntelopeV2 pack.",
            argument="face_analyzer",
        )
    missing = [task for task in ("landmark_2d_106", "recognition") if task not in insightface_tasks(app)]
    if "landmark_2d_106" in missing:
        raise FaceModelsNotFoundError(
            f"The face models in {str(folder)!r} lack the 106-point landmark model (2d106det.onnx) that HyperLoRA's "
            "crops need. Use the complete AntelopeV2 pack.",
            argument="face_analyzer",
        )
    if missing:
        logger.warning(
            f"The face models in {str(folder)!r} have no recognition model (glintr100.onnx): no ArcFace embeddings."
        )
    return app
