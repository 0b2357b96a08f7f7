"""The tiny face models of the tests; they live in the library (`diffusers_hyperlora.testing`) for the demo."""

from diffusers_hyperlora.testing.tiny_face import (  # noqa: F401
    ASTRONAUT_FACE,
    KEYPOINT_FRACTIONS,
    LANDMARK_TEMPLATE,
    MARKER_COLORS,
    T1_FACES,
    draw_face_marker,
    export_tiny_antelopev2,
    tiny_clip_encoder,
)
