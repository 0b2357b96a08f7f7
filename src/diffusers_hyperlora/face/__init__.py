"""The face pipeline: photos -> ArcFace embedding + CLIP features (docs/face.md).

>>> from diffusers_hyperlora.face import FaceAnalyzer, CLIPImageEncoder, build_feature_extractor
"""

from .analyzer import (
    DETECTION_SIZES,
    DetectedFace,
    FaceAnalysisLike,
    FaceAnalyzer,
    load_insightface_app,
    resolve_face_models_dir,
    select_providers,
)
from .conditioning import blur_face, remove_background
from .crops import FACE_POLYGON_INDICES, SquareCrop, arcface_crop, base_crop_box, clip_crop, face_polygon
from .encoders import CLIPImageEncoder, default_clip_processor
from .extractor import FaceFeatureExtractor, FaceInputs, build_feature_extractor
from .images import InputImage, load_image, load_images

__all__ = [
    "CLIPImageEncoder",
    "DETECTION_SIZES",
    "DetectedFace",
    "FACE_POLYGON_INDICES",
    "FaceAnalysisLike",
    "FaceAnalyzer",
    "FaceFeatureExtractor",
    "FaceInputs",
    "InputImage",
    "SquareCrop",
    "arcface_crop",
    "base_crop_box",
    "blur_face",
    "build_feature_extractor",
    "clip_crop",
    "default_clip_processor",
    "face_polygon",
    "load_image",
    "load_images",
    "load_insightface_app",
    "remove_background",
    "resolve_face_models_dir",
    "select_providers",
]
