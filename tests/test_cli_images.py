"""The CLI's photo path: image files -> face pipeline -> identity / slider, checked against the library API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_features
from safetensors.torch import load_file

from diffusers_hyperlora import HyperLoRAIdentity
from diffusers_hyperlora.adapters.sliders import HyperLoRASlider
from diffusers_hyperlora.cli import main
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

pytest.importorskip("insightface")
skimage_data = pytest.importorskip("skimage.data")
face_models = pytest.importorskip("face_models")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny checkpoint, a tiny CLIP encoder folder, tiny AntelopeV2 models and two photos on disk."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli_images")
    predictor = tiny_hyperlora_predictor(seed=2)
    predictor.save_pretrained(root / "model")
    encoder = face_models.tiny_clip_encoder()
    encoder.model.save_pretrained(root / "clip")
    encoder.processor.save_pretrained(root / "clip")
    pack = face_models.export_tiny_antelopev2(root / "antelopev2")
    astronaut = face_models.draw_face_marker(skimage_data.astronaut(), face_models.ASTRONAUT_FACE)
    Image.fromarray(astronaut).save(root / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(root / "mirrored.png")
    options = ["--model", root / "model", "--image-encoder", root / "clip", "--face-models", pack, "--device", "cpu"]
    return root, predictor, [str(o) for o in options]


def _expected_identity(predictor, root, options, names):
    from diffusers_hyperlora.face import build_feature_extractor

    extractor = build_feature_extractor(
        predictor.config, source=None, image_encoder=options[3], face_analyzer=options[5], hub_options={}
    )
    paths = [str(root / n) for n in names]
    features = extractor(paths, device=torch.device("cpu"), dtype=torch.float32, with_base=False)
    return predictor.predict(id_embeds=features.id_embeds, clip_hidden_states=features.clip_hidden_states)


def test_identity_from_photos(files, tmp_path, capsys):
    root, predictor, options = files
    out = tmp_path / "me.safetensors"
    code = main(["identity", str(root / "astronaut.png"), str(root / "mirrored.png"), "-o", str(out), *options])
    assert code == 0, capsys.readouterr().err
    saved = HyperLoRAIdentity.load(out, predictor=predictor)
    expected = _expected_identity(predictor, root, options, ["astronaut.png", "mirrored.png"])
    assert saved.num_images == 2 and len(saved.sources) == 2
    torch.testing.assert_close(saved.id_mean, expected.id_mean, atol=1e-5, rtol=1e-4)


def test_slider_mixing_photos_and_identity_files(files, tmp_path, capsys):
    root, predictor, options = files
    neutral_file = tmp_path / "neutral.safetensors"
    neutral = predictor.predict(*random_features(batch=2, seed=5))
    neutral.save(neutral_file)
    out = tmp_path / "slider.safetensors"
    argv = ["slider", "--neutral", str(neutral_file), "--edited", str(root / "astronaut.png"), "-o", str(out), *options]
    assert main(argv) == 0, capsys.readouterr().err
    edited = _expected_identity(predictor, root, options, ["astronaut.png"])
    expected = predictor.export_lora(HyperLoRASlider(neutral, edited))
    written = load_file(str(out))
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, atol=1e-5, rtol=1e-4)


def test_a_photo_without_a_face_is_reported(files, tmp_path, capsys):
    from PIL import Image

    root, _, options = files
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(blank)
    assert main(["identity", str(blank), "-o", str(tmp_path / "x.safetensors"), *options]) == 1
    assert "face" in capsys.readouterr().err.lower()


def test_cache_features_runs_the_face_pipeline_per_image(files):
    import json
    import shutil

    from diffusers_hyperlora.training import load_feature_cache

    root, predictor, options = files
    data = root / "data"
    data.mkdir(exist_ok=True)
    for name in ("astronaut.png", "mirrored.png"):
        shutil.copy(root / name, data / name)
    rows = [{"file": n, "person": "eileen", "caption": "a photo"} for n in ("astronaut.png", "mirrored.png")]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["cache-features", str(data), *options]) == 0
    cache = load_feature_cache(data / "features.safetensors")
    assert sorted(cache) == ["astronaut.png", "mirrored.png"]
    # Base features too, though this checkpoint has no Base branch: train's new checkpoints have one.
    assert not predictor.config.has_base and "base_clip_hidden_states" in cache["astronaut.png"]
    expected = _expected_identity(predictor, root, options, ["astronaut.png"])
    single = predictor.predict(
        id_embeds=cache["astronaut.png"]["id_embeds"][None],
        clip_hidden_states=cache["astronaut.png"]["clip_hidden_states"][None],
    )
    torch.testing.assert_close(single.id_mean, expected.id_mean, rtol=1e-5, atol=1e-6)
