"""The face pipeline end to end, with tiny AntelopeV2-shaped ONNX models loaded by insightface's own loader.

How faces are "found": the tiny detector (tests/face_models.py) reports the box of every colour-keyed frame drawn
with `draw_face_marker`, so the tests mark the real faces of `skimage.data.astronaut()` and insightface's group
photo `t1` (6 people) with frames of the sizes the people have; a photo without frames has no face.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from face_models import (
    ASTRONAUT_FACE,
    LANDMARK_TEMPLATE,
    T1_FACES,
    draw_face_marker,
    export_tiny_antelopev2,
    tiny_clip_encoder,
)
from PIL import Image

from diffusers_hyperlora.errors import (
    FaceModelsNotFoundError,
    FaceSelectionError,
    FeatureShapeError,
    NoFaceDetectedError,
)
from diffusers_hyperlora.face import (
    CLIPImageEncoder,
    FaceAnalyzer,
    FaceFeatureExtractor,
    build_feature_extractor,
    resolve_face_models_dir,
    select_providers,
)
from diffusers_hyperlora.face.crops import crop_padded
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config, tiny_hyperlora_predictor

pytest.importorskip("insightface")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory):
    return export_tiny_antelopev2(tmp_path_factory.mktemp("antelopev2"))


@pytest.fixture(scope="module")
def analyzer(face_pack):
    return FaceAnalyzer.from_pretrained(face_pack, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_encoder()


@pytest.fixture(scope="module")
def astronaut():
    return draw_face_marker(skimage_data.astronaut(), ASTRONAUT_FACE)


@pytest.fixture(scope="module")
def group_photo():
    from insightface.data import get_image

    image = np.ascontiguousarray(get_image("t1", to_rgb=True))
    for index, box in enumerate(T1_FACES):
        image = draw_face_marker(image, box, index)
    return image


def extractor_for(config, encoder, analyzer):
    return FaceFeatureExtractor(config, encoder, analyzer)


# ---------------------------------------------------------------------- insightface loading
def test_insightface_router_accepts_the_tiny_pack(analyzer):
    import insightface
    from insightface.model_zoo.landmark import Landmark
    from insightface.model_zoo.retinaface import RetinaFace
    from insightface.model_zoo.scrfd import SCRFD
    from packaging.version import Version

    # insightface's router gives a detector with SCRFD's outputs (>= 5: scores, boxes, keypoints per stride) to its
    # `SCRFD` class from 1.0 on, and to `RetinaFace` before (0.7's RetinaFace is the same SCRFD decoder, without
    # batched outputs): either way the SCRFD-with-keypoints reading of 3 strides.
    detector_class = SCRFD if Version(insightface.__version__) >= Version("1.0") else RetinaFace
    models = analyzer.app.models
    assert set(models) == {"detection", "landmark_2d_106", "recognition"}
    detector = models["detection"]
    assert type(detector) is detector_class and detector.use_kps and detector.fmc == 3
    assert isinstance(models["landmark_2d_106"], Landmark)
    assert tuple(models["recognition"].input_size) == (112, 112)


def test_folder_layouts(face_pack, tmp_path):
    nested = tmp_path / "root" / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for onnx in face_pack.glob("*.onnx"):
        (nested / onnx.name).symlink_to(onnx)
    assert resolve_face_models_dir(tmp_path / "root") == nested  # insightface root + nested zip layout
    assert resolve_face_models_dir(tmp_path / "root" / "models") == nested
    assert resolve_face_models_dir(nested.parent) == nested
    assert resolve_face_models_dir(face_pack) == face_pack
    with pytest.raises(
        FaceModelsNotFoundError, match=r"No face-analysis models.*antelopev2/antelopev2.*face_analyzer="
    ):
        resolve_face_models_dir(tmp_path)
    with pytest.raises(FaceModelsNotFoundError, match="no such folder"):
        resolve_face_models_dir(tmp_path / "nope")


def test_missing_landmark_model_is_reported(face_pack, tmp_path):
    (tmp_path / "scrfd_10g_bnkps.onnx").symlink_to(face_pack / "scrfd_10g_bnkps.onnx")
    with pytest.raises(FaceModelsNotFoundError, match="2d106det.onnx"):
        FaceAnalyzer.from_pretrained(tmp_path)


def test_provider_choice():
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(both, gpu_available=True) == both
    assert select_providers(both, gpu_available=False) == ["CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider"], gpu_available=True) == ["CPUExecutionProvider"]
    assert select_providers(both, True, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"not available here; available: \['CPUExecutionProvider'\]"):
        select_providers(["CPUExecutionProvider"], False, ["TensorrtExecutionProvider"])


def test_hub_face_models_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FaceModelsNotFoundError, match="not in the local cache.*face_analyzer="):
        FaceAnalyzer.from_pretrained("nobody-xyz/not-a-face-repo/antelopev2")


def test_not_an_analyzer_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"prepare\(ctx_id, det_size=...\)"):
        FaceAnalyzer(object())


# ---------------------------------------------------------------------- detection
def test_detection_finds_the_marked_faces(analyzer, group_photo):
    faces, size = analyzer.detect(group_photo)
    assert size == 640 and len(faces) == 6
    boxes = sorted(tuple(f.bbox) for f in faces)
    for found, marked in zip(boxes, sorted(T1_FACES)):
        np.testing.assert_allclose(found, marked, atol=2.5)
    for face in faces:  # 106 landmarks = the template in insightface's landmark crop (1.5 x the box, centred)
        x0, y0, x1, y1 = face.bbox
        expected = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + LANDMARK_TEMPLATE * 0.75 * max(x1 - x0, y1 - y0)
        np.testing.assert_allclose(face.landmarks, expected, atol=0.02 * max(x1 - x0, y1 - y0))
        assert face.embedding.shape == (512,) and np.linalg.norm(face.embedding) == pytest.approx(1, abs=1e-5)


class ScriptedAnalysis:
    """A FaceAnalysis-like plug-in: reports one face (given landmarks) only at chosen detector sizes."""

    def __init__(self, landmarks, sizes, embedding_seed=0):
        self.landmarks, self.sizes, self.calls = landmarks, sizes, []
        self.embedding = np.random.default_rng(embedding_seed).normal(size=512).astype(np.float32)
        self.embedding /= np.linalg.norm(self.embedding)
        self.size = None

    def prepare(self, ctx_id, det_size=(640, 640), det_thresh=0.5):
        self.size = det_size[0]

    def get(self, img):
        self.calls.append((self.size, img.copy()))
        if self.size not in self.sizes:
            return []
        low, high = self.landmarks.min(0), self.landmarks.max(0)
        return [{"bbox": np.r_[low, high], "landmark_2d_106": self.landmarks, "normed_embedding": self.embedding}]


def test_size_fallbacks_stop_at_the_first_that_finds_a_face():
    landmarks = np.random.default_rng(0).uniform(40, 80, size=(106, 2))
    app = ScriptedAnalysis(landmarks, sizes={384, 256})
    faces, size = FaceAnalyzer(app).detect(np.zeros((120, 120, 3), np.uint8))
    assert size == 384 and len(faces) == 1
    assert [s for s, _ in app.calls] == [640, 512, 384]
    app.calls.clear()
    assert FaceAnalyzer(ScriptedAnalysis(landmarks, sizes=set())).detect(np.zeros((9, 9, 3), np.uint8)) == ([], None)


def test_plugged_in_analyzer_gets_exact_crops_and_bgr():
    """A custom detector: the ArcFace re-detection runs at 640 on the exact padded 2 l crop of the original (BGR)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    landmarks = rng.uniform(20, 70, size=(106, 2))  # near the top-left corner: the wide crop leaves the image
    app = ScriptedAnalysis(landmarks, sizes={512, 640})
    config = tiny_hyperlora_config()
    inputs = extractor_for(config, None, FaceAnalyzer(app)).prepare_inputs(image, remove_background=False)[0]
    low, high = landmarks.min(0), landmarks.max(0)
    l = 0.75 * (high - low).max()
    cx, cy = (low + high) / 2 - (0, 0.125 * l)
    box = lambda half: (  # noqa: E731
        int(np.floor(cx - half + 0.5)), int(np.floor(cy - half + 0.5)),
        int(np.floor(cx - half + 0.5)) + int(np.floor(2 * half + 0.5)),
        int(np.floor(cy - half + 0.5)) + int(np.floor(2 * half + 0.5)),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(inputs.clip_image), crop_padded(image, box(l)))
    wide = crop_padded(image, box(2 * l))
    assert box(2 * l)[0] < 0  # padded with black on the left
    np.testing.assert_array_equal(np.asarray(inputs.arcface_image), wide)
    sizes = [s for s, _ in app.calls]
    assert sizes == [640, 640]  # full photo at 640 found it; re-detection at 640
    np.testing.assert_array_equal(app.calls[0][1], image[..., ::-1])  # BGR, as insightface expects
    np.testing.assert_array_equal(app.calls[1][1], wide[..., ::-1])
    np.testing.assert_array_equal(inputs.id_embedding, app.embedding)


# ---------------------------------------------------------------------- the crops on a real photo
def test_every_crop_follows_the_spec_on_a_real_photo(analyzer, encoder, astronaut):
    config = tiny_hyperlora_config()
    inputs = extractor_for(config, encoder, analyzer).prepare_inputs(Image.fromarray(astronaut))[0]
    np.testing.assert_allclose(inputs.face_box, ASTRONAUT_FACE, atol=2.5)
    lm = inputs.landmarks
    low, high = lm.min(0), lm.max(0)
    l = 0.75 * (high - low).max()
    cx, cy = (low + high) / 2 - (0, 0.125 * l)
    assert (inputs.clip_crop.cx, inputs.clip_crop.cy, inputs.clip_crop.half) == pytest.approx((cx, cy, l), abs=1e-3)
    x0, y0 = int(np.floor(cx - l + 0.5)), int(np.floor(cy - l + 0.5))
    side = int(np.floor(2 * l + 0.5))
    # CLIP sees the background-removed photo's crop
    removed = np.asarray(inputs.background_removed)
    np.testing.assert_array_equal(np.asarray(inputs.clip_image), removed[y0 : y0 + side, x0 : x0 + side])
    assert removed[5, 5].tolist() == [127, 127, 127] and removed.shape == astronaut.shape
    mask = np.asarray(inputs.face_mask)
    centre = lm.mean(0).round().astype(int)
    assert mask[centre[1], centre[0]] == 255 and mask[5, 5] == 0
    np.testing.assert_array_equal(removed[centre[1], centre[0]], astronaut[centre[1], centre[0]])
    # ArcFace: the original (not background-removed) photo, half-side 2 l around the same centre
    ax0, ay0 = int(np.floor(cx - 2 * l + 0.5)), int(np.floor(cy - 2 * l + 0.5))
    aside = int(np.floor(4 * l + 0.5))
    np.testing.assert_array_equal(
        np.asarray(inputs.arcface_image), crop_padded(astronaut, (ax0, ay0, ax0 + aside, ay0 + aside))
    )
    # the re-detected face is the same face, moved into the crop
    np.testing.assert_allclose(inputs.arcface_box, np.subtract(inputs.face_box, [ax0, ay0, ax0, ay0]), atol=2.5)
    direct = analyzer.faces_at(np.asarray(inputs.arcface_image), 640)[0].embedding
    np.testing.assert_allclose(inputs.id_embedding, direct, atol=1e-6)
    assert not np.allclose(direct, analyzer.faces_at(astronaut, 640)[0].embedding, atol=1e-3)  # not the full photo's
    gray = extractor_for(config, encoder, analyzer).prepare_inputs(astronaut, grayscale=True, remove_background=False)[
        0
    ]
    g = np.asarray(gray.clip_image)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    expected = np.asarray(Image.fromarray(astronaut[y0 : y0 + side, x0 : x0 + side]).convert("L"))
    np.testing.assert_array_equal(g[..., 0], expected)


def test_base_input_is_blurred_and_cropped(analyzer, encoder, astronaut):
    config = tiny_hyperlora_config()
    inputs = extractor_for(config, encoder, analyzer).prepare_inputs(
        astronaut, with_base=True, base_crop_scale=(1, 1, 1, 2)
    )[0]
    c = inputs.clip_crop
    x0, y0 = int(np.floor(c.cx - c.half + 0.5)), int(np.floor(c.cy - c.half + 0.5))
    x1, y1 = int(np.floor(c.cx + c.half + 0.5)), min(512, int(np.floor(c.cy + 2 * c.half + 0.5)))
    base = np.asarray(inputs.base_image).astype(float)
    assert base.shape == (y1 - y0, x1 - x0, 3)
    original = astronaut[y0:y1, x0:x1].astype(float)
    cy, cx = int(c.cy + 0.125 * c.half) - y0, int(c.cx) - x0  # the landmark box centre
    patch = slice(cy - 10, cy + 10), slice(cx - 10, cx + 10)
    assert np.abs(np.diff(base[patch], axis=1)).mean() < 0.5 * np.abs(np.diff(original[patch], axis=1)).mean()
    np.testing.assert_array_equal(base[:3, :3], original[:3, :3])  # the corner is outside the blurred region


# ---------------------------------------------------------------------- several faces, several photos
def test_group_photo_uses_the_largest_face_and_warns(analyzer, encoder, group_photo, caplog):
    extractor = extractor_for(tiny_hyperlora_config(), encoder, analyzer)
    with caplog.at_level(logging.WARNING):
        inputs = extractor.prepare_inputs(group_photo)[0]
    assert inputs.num_faces == 6
    np.testing.assert_allclose(inputs.face_box, T1_FACES[4], atol=2.5)  # the largest frame
    assert "6 faces found, using the largest (face_index=0)" in caplog.text
    second = extractor.prepare_inputs(group_photo, face_index=1)[0]
    areas = sorted(((b[2] - b[0]) * (b[3] - b[1]), b) for b in T1_FACES)
    np.testing.assert_allclose(second.face_box, areas[-2][1], atol=2.5)
    with pytest.raises(FaceSelectionError, match="has 6 face.*face_index=9"):
        extractor.prepare_inputs(group_photo, face_index=9)
    with pytest.raises(FaceSelectionError, match="one such int per input image"):
        extractor.prepare_inputs([group_photo, group_photo], face_index=[0])


def test_faceless_photos_are_skipped_or_raise(analyzer, encoder, astronaut, tmp_path, caplog):
    extractor = extractor_for(tiny_hyperlora_config(), encoder, analyzer)
    path = tmp_path / "landscape.png"
    Image.fromarray(skimage_data.coffee()).save(path)
    with caplog.at_level(logging.WARNING):
        inputs = extractor.prepare_inputs([str(path), astronaut, np.full((64, 64, 3), 90, np.uint8)])
    assert [i.source for i in inputs] == ["#1"]
    assert "No face detected in landscape.png, #2: skipped" in caplog.text
    with pytest.raises(NoFaceDetectedError, match=r"any input image \(landscape.png, #1\).*640, 512, 384, 256"):
        extractor.prepare_inputs([str(path), skimage_data.astronaut()])


def test_features_are_the_encoders_outputs(analyzer, encoder, astronaut, group_photo):
    config = tiny_hyperlora_config()
    extractor = extractor_for(config, encoder, analyzer)
    features = extractor([astronaut, group_photo], device=torch.device("cpu"), dtype=torch.float32, with_base=False)
    inputs = extractor.prepare_inputs([astronaut, group_photo])
    assert features.sources == ["#0", "#1"]
    assert features.id_embeds.shape == (2, 512) and features.base_clip_hidden_states is None
    np.testing.assert_allclose(features.id_embeds.numpy(), np.stack([i.id_embedding for i in inputs]), atol=1e-6)
    with torch.no_grad():
        pixels = encoder.processor(images=[i.clip_image for i in inputs], return_tensors="pt")["pixel_values"]
        expected = encoder.model(pixel_values=torch.as_tensor(pixels), output_hidden_states=True).hidden_states[-2]
    assert features.clip_hidden_states.shape == (2, 17, 48)
    torch.testing.assert_close(features.clip_hidden_states, expected)
    half = extractor([astronaut], device=torch.device("cpu"), dtype=torch.bfloat16, with_base=True)
    assert half.clip_hidden_states.dtype == torch.bfloat16 and half.base_clip_hidden_states.shape == (1, 17, 48)
    encoder.to("cpu", torch.float32)
    with pytest.raises(TypeError, match="Unknown face-pipeline option.*face_idx"):
        extractor([astronaut], device=torch.device("cpu"), dtype=torch.float32, with_base=False, face_idx=1)


def test_encoder_width_must_match_the_checkpoint(analyzer):
    wrong = tiny_clip_encoder(hidden_size=32)
    with pytest.raises(FeatureShapeError, match="32 wide but this HyperLoRA checkpoint reads 48-wide"):
        build_feature_extractor(
            tiny_hyperlora_config(), source=None, image_encoder=wrong, face_analyzer=analyzer, hub_options={}
        )


# ---------------------------------------------------------------------- through the pipeline into the UNet
def test_photos_to_identity_to_unet_weights(pipe, face_pack, encoder, astronaut, group_photo, tmp_path):
    folder = tmp_path / "clip"
    encoder.model.save_pretrained(folder)  # safetensors
    encoder.processor.save_pretrained(folder)
    predictor = tiny_hyperlora_predictor(seed=1)
    pipe.load_hyperlora(predictor, image_encoder=str(folder), face_analyzer=str(face_pack))
    state = pipe.hyperlora
    assert state.feature_extractor is None  # nothing loaded before the first identity
    before = [b.clone() for _, b in state.adapters.lora_parameters("id")]
    identity = pipe.set_hyperlora_identity([astronaut, group_photo, np.zeros((80, 80, 3), np.uint8)])
    assert identity.num_images == 2 and identity.sources == ["#0", "#1"]
    extractor = state.feature_extractor
    assert isinstance(extractor.image_encoder, CLIPImageEncoder) and isinstance(extractor.face_analyzer, FaceAnalyzer)
    # the same numbers by hand: preview -> encoders -> predictor -> LoRA weights in the UNet
    previews = pipe.preview_hyperlora_inputs([astronaut, group_photo])
    embeds = torch.from_numpy(np.stack([p.id_embedding for p in previews]))
    clip = encoder.hidden_states([p.clip_image for p in previews], "cpu", torch.float32)
    expected = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    torch.testing.assert_close(identity.id_mean, expected.id_mean, atol=1e-5, rtol=1e-4)
    written = state.adapters.lora_parameters("id")
    for (down, up), (exp_down, exp_up) in zip(written, predictor.lora_weights(expected, "id"), strict=True):
        torch.testing.assert_close(down.float(), exp_down.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(up.float(), exp_up.float(), atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(u, o) for (_, u), o in zip(written, before, strict=True))
    other = pipe.set_hyperlora_identity(astronaut, face_index=0, remove_background=False)
    assert not torch.allclose(other.id_mean, identity.id_mean)


def test_preview_on_the_pipeline_and_lazy_errors(pipe, tmp_path, astronaut, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.load_hyperlora(tiny_hyperlora_predictor(), image_encoder="nobody-xyz/no-clip", face_analyzer=str(tmp_path))
    with pytest.raises(FaceModelsNotFoundError, match="No face-analysis models"):
        pipe.preview_hyperlora_inputs(astronaut)


def test_preview_refuses_an_unknown_option_by_name(pipe, face_pack, astronaut):
    """A typo in a face option is our TypeError naming it, on the preview as on a switch (not Python's own)."""
    from diffusers_hyperlora import InvalidArgumentTypeError

    pipe.load_hyperlora(tiny_hyperlora_predictor(), face_analyzer=str(face_pack))
    with pytest.raises(InvalidArgumentTypeError, match=r"Unknown face-pipeline option\(s\) \['face_idx'\]") as caught:
        pipe.preview_hyperlora_inputs(astronaut, face_idx=1)
    assert caught.value.argument == "face_idx"
    assert len(pipe.preview_hyperlora_inputs(astronaut, face_index=0)) == 1


@pytest.mark.parametrize("option, value", [("with_base", False), ("device", "cpu"), ("dtype", torch.float16)])
def test_options_the_checkpoint_sets_are_refused_by_name(pipe, face_pack, astronaut, option, value):
    """`with_base=` / `device=` / `dtype=` are the loaded checkpoint's to set: a clear error naming the option, on the
    preview and on a switch (not Python's "got multiple values" TypeError), and nothing changes."""
    from diffusers_hyperlora import InvalidArgumentError

    pipe.load_hyperlora(tiny_hyperlora_predictor(), face_analyzer=str(face_pack))
    before = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    for call in (pipe.preview_hyperlora_inputs, pipe.set_hyperlora_identity, pipe.predict_hyperlora_identity):
        words = rf"{option}= cannot be passed .*the loaded checkpoint sets"
        with pytest.raises(InvalidArgumentError, match=words) as caught:
            call(astronaut, **{option: value})
        assert caught.value.argument == option
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_missing_clip_encoder_error(pipe, face_pack, astronaut, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.load_hyperlora(tiny_hyperlora_predictor(), image_encoder="nobody-xyz/no-clip", face_analyzer=str(face_pack))
    assert len(pipe.preview_hyperlora_inputs(astronaut)) == 1  # previews need no CLIP
    with pytest.raises(
        FaceModelsNotFoundError, match=r"(?s)CLIP image encoder from 'nobody-xyz/no-clip'.*image_encoder="
    ):
        pipe.set_hyperlora_identity(astronaut)


def test_config_names_subfolders_of_a_local_checkpoint(face_pack, encoder, astronaut, tmp_path):
    """`HyperLoRAConfig.image_encoder` / `face_models` as subfolders of a local checkpoint; a bare model works too."""
    checkpoint = tmp_path / "ckpt"
    encoder.model.save_pretrained(checkpoint / "image_encoder")
    nested = checkpoint / "faces" / "antelopev2" / "antelopev2"  # the unpacked zip's layout
    nested.mkdir(parents=True)
    for onnx in face_pack.glob("*.onnx"):
        (nested / onnx.name).symlink_to(onnx)
    config = tiny_hyperlora_config(image_encoder="image_encoder", face_models="faces")
    extractor = build_feature_extractor(
        config, source=str(checkpoint), image_encoder=None, face_analyzer=None, hub_options={}
    )
    features = extractor([astronaut], device=torch.device("cpu"), dtype=torch.float32, with_base=False)
    bare = build_feature_extractor(
        config, source=None, image_encoder=encoder.model, face_analyzer=extractor.face_analyzer, hub_options={}
    )
    again = bare([astronaut], device=torch.device("cpu"), dtype=torch.float32, with_base=False)
    assert extractor.image_encoder.image_size == 32  # processor rebuilt from the model's config (none was saved)
    torch.testing.assert_close(features.clip_hidden_states, again.clip_hidden_states)
    torch.testing.assert_close(features.id_embeds, again.id_embeds)
