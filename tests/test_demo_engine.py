"""The demo's engine (no browser): every control of the page reaches the pipeline, the lock pairs each visitor's
identity with their images, files and sliders, errors, and the `demo` command's checkpoint options.

The page itself is driven in a real browser by tests/test_demo.py.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

pytest.importorskip("insightface", reason="the demo extra is not installed: pip install -e '.[demo]'")
pytest.importorskip("onnx", reason="the tiny default's face models are exported with onnx (demo extra)")
skimage_data = pytest.importorskip("skimage.data")

from diffusers_hyperlora import HyperLoRAIdentity  # noqa: E402
from diffusers_hyperlora.demo import DemoEngine, GenerationSettings, prompt_with_trigger_words  # noqa: E402
from diffusers_hyperlora.demo.engine import TINY_DEFAULTS, split_inputs  # noqa: E402
from diffusers_hyperlora.errors import IdentityMismatchError, ImageInputError, NoFaceDetectedError  # noqa: E402
from diffusers_hyperlora.testing.tiny_face import ASTRONAUT_FACE, draw_face_marker  # noqa: E402

BASE = GenerationSettings(prompt="a photo of a person", negative_prompt="", steps=2, width=64, height=64)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> DemoEngine:
    return DemoEngine.tiny_default(workdir=tmp_path_factory.mktemp("demo-engine"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = folder / "astronaut.png"
    Image.fromarray(draw_face_marker(skimage_data.astronaut(), ASTRONAUT_FACE)).save(astronaut)
    moved = folder / "astronaut_moved.png"  # the same photo, face marked a little lower: another "person"
    Image.fromarray(draw_face_marker(skimage_data.astronaut(), (170, 90, 270, 210))).save(moved)
    coffee = folder / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(coffee)
    return {"astronaut": str(astronaut), "moved": str(moved), "coffee": str(coffee)}


@pytest.fixture(scope="module")
def identities(engine, photos) -> dict[str, HyperLoRAIdentity]:
    return {name: engine.identity_from_inputs([photos[name]]) for name in ("astronaut", "moved")}


@pytest.fixture(scope="module")
def reference(engine, identities) -> np.ndarray:
    image, _ = engine.generate(identities["astronaut"], BASE)
    return pixels(image)


def test_trigger_words():
    assert prompt_with_trigger_words("a man", "fcsks fxhks fhyks") == "fcsks fxhks fhyks, a man"
    assert prompt_with_trigger_words("fcsks fxhks fhyks, a man", "fcsks fxhks fhyks") == "fcsks fxhks fhyks, a man"
    assert prompt_with_trigger_words("", "tok") == "tok"
    assert prompt_with_trigger_words("a man", "") == "a man"


def test_trigger_words_reach_the_prompt(engine, identities):
    _, used = engine.generate(identities["astronaut"], BASE)
    assert used == f"{engine.trigger_words}, a photo of a person"
    _, used = engine.generate(identities["astronaut"], replace(BASE, add_trigger_words=False))
    assert used == "a photo of a person"
    _, used = engine.generate(None, BASE)  # no identity: HyperLoRA is off, no trigger words
    assert used == "a photo of a person"


@pytest.mark.parametrize(
    "change",
    [
        {"negative_prompt": "blurry"},
        {"seed": 1},
        {"steps": 3},
        {"id_weight": 0.3},
        {"base_weight": 0.7},
        {"prompt": "a painting of a person"},
        {"add_trigger_words": False},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_setting_reaches_the_pipeline(engine, identities, reference, change):
    image, _ = engine.generate(identities["astronaut"], replace(BASE, **change))
    assert np.abs(pixels(image) - reference).mean() > 0.1


def test_same_settings_same_image(engine, identities, reference):
    image, _ = engine.generate(identities["astronaut"], BASE)
    np.testing.assert_array_equal(pixels(image), reference)


def test_size(engine, identities):
    image, _ = engine.generate(identities["astronaut"], replace(BASE, width=128, height=64))
    assert image.size == (128, 64)


def test_weights_zero_equal_no_identity(engine, identities):
    off_settings = replace(BASE, id_weight=0.0, base_weight=0.0, add_trigger_words=False)
    off, _ = engine.generate(identities["astronaut"], off_settings)
    plain, _ = engine.generate(None, replace(BASE, add_trigger_words=False))
    np.testing.assert_array_equal(pixels(off), pixels(plain))


def test_identity_switch_per_request(engine, identities, reference):
    other, _ = engine.generate(identities["moved"], BASE)
    assert np.abs(pixels(other) - reference).mean() > 0.1
    again, _ = engine.generate(identities["astronaut"], BASE)  # the engine writes each request's own identity
    np.testing.assert_array_equal(pixels(again), reference)


def test_concurrent_visitors_get_their_own_identity(engine, identities, reference):
    expected = {"astronaut": reference, "moved": pixels(engine.generate(identities["moved"], BASE)[0])}
    results: dict[tuple[str, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def visitor(name: str, round_: int) -> None:
        try:
            results[name, round_] = pixels(engine.generate(identities[name], BASE)[0])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=visitor, args=(name, r)) for r in range(2) for name in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (name, _), image in results.items():
        np.testing.assert_array_equal(image, expected[name])


def test_progress_reports_every_step(engine, identities):
    steps = []
    engine.generate(identities["astronaut"], replace(BASE, steps=3), on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    "change, message",
    [({"steps": 0}, "Steps"), ({"width": 100}, "Width"), ({"height": 4096}, "Height"), ({"seed": -1}, "Seed")],
)
def test_settings_out_of_range_change_nothing(engine, identities, change, message):
    before = engine.pipe.hyperlora.identity
    with pytest.raises(ValueError, match=message):
        engine.generate(identities["moved"], replace(BASE, **change))
    assert engine.pipe.hyperlora.identity is before


def test_identity_file_roundtrip_and_pooling(engine, identities, photos):
    path = engine.save_identity(identities["astronaut"])
    loaded = engine.identity_from_inputs([str(path)])
    torch.testing.assert_close(loaded.id_coefficients, identities["astronaut"].id_coefficients)
    pooled = engine.identity_from_inputs([photos["moved"], str(path)])
    expected = HyperLoRAIdentity.merge([identities["astronaut"], identities["moved"]])
    assert pooled.num_images == 2
    torch.testing.assert_close(pooled.id_coefficients, expected.id_coefficients)


def test_identity_of_another_model_is_refused(engine, tmp_path, photos):
    other = DemoEngine.tiny_default(seed=1, workdir=tmp_path)
    path = other.save_identity(other.identity_from_inputs([photos["astronaut"]]))
    with pytest.raises(IdentityMismatchError):
        engine.identity_from_inputs([str(path)])


@pytest.mark.parametrize("format, prefix", [("kohya", "lora_unet_"), ("diffusers", "unet.")])
def test_export_lora_formats(engine, identities, format, prefix):
    path = engine.export_lora(identities["astronaut"], format=format)
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith(prefix) for key in keys)


def test_export_lora_unknown_format(engine, identities):
    with pytest.raises(ValueError, match="format"):
        engine.export_lora(identities["astronaut"], format="ckpt")


def test_slider(engine, identities, photos, reference):
    name = engine.add_slider([photos["astronaut"]], [photos["moved"]], "moved")
    assert name == "moved" and "moved" in engine.sliders
    at_zero, _ = engine.generate(identities["astronaut"], replace(BASE, slider="moved", slider_weight=0.0))
    np.testing.assert_array_equal(pixels(at_zero), reference)
    pushed, _ = engine.generate(identities["astronaut"], replace(BASE, slider="moved", slider_weight=1.5))
    assert np.abs(pixels(pushed) - reference).mean() > 0.1
    path = engine.export_lora(engine.sliders["moved"], name="slider_moved")
    with safe_open(str(path), "pt") as handle:
        assert any(key.startswith("lora_unet_") for key in handle.keys())


@pytest.mark.parametrize("name", ["id", "base", "two words", ""])
def test_slider_bad_names(engine, photos, name):
    with pytest.raises(ValueError, match="Slider name"):
        engine.add_slider([photos["astronaut"]], [photos["moved"]], name)


def test_unknown_slider(engine, identities):
    with pytest.raises(ValueError, match="no slider"):
        engine.generate(identities["astronaut"], replace(BASE, slider="nope"))


def test_errors_are_library_errors(engine, photos, tmp_path):
    with pytest.raises(NoFaceDetectedError, match="coffee.png"):
        engine.identity_from_inputs([photos["coffee"]])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="broken.png"):
        engine.identity_from_inputs([str(broken)])
    with pytest.raises(ValueError, match="photos"):
        engine.identity_from_inputs([])


def test_preview(engine, photos):
    gallery = engine.preview([photos["astronaut"]])
    captions = [caption for _, caption in gallery]
    assert captions[:2] == ["astronaut.png: CLIP crop", "astronaut.png: ArcFace crop"]
    assert all(isinstance(image, Image.Image) for image, _ in gallery)


def test_split_inputs():
    assert split_inputs(["a.jpg", "me.safetensors", "b.PNG", "x.SAFETENSORS"]) == (
        ["a.jpg", "b.PNG"],
        ["me.safetensors", "x.SAFETENSORS"],
    )


def test_tiny_defaults(engine):
    assert engine.defaults == TINY_DEFAULTS
    assert engine.has_base  # the tiny default has a Base branch, so the page's Base weight does something
    assert engine.example_photos and engine.example_photos[0].is_file()
    assert engine.identity_from_inputs([str(engine.example_photos[0])]).num_images == 1  # its marker is found


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkpoint_folders(tmp_path_factory):
    """A base model, a checkpoint in a subfolder, a CLIP encoder and face models, each in its own local folder."""
    from diffusers_hyperlora.testing.tiny_face import export_tiny_antelopev2, tiny_clip_encoder
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("demo-checkpoint")
    pipe = tiny_sdxl_pipeline(seed=3)
    pipe.save_pretrained(root / "sdxl")
    tiny_hyperlora_predictor(pipe.unet, seed=3).save_pretrained(root / "repo" / "sub")
    encoder = tiny_clip_encoder(seed=3)
    encoder.model.save_pretrained(root / "clip")
    encoder.processor.save_pretrained(root / "clip")
    export_tiny_antelopev2(root / "faces", seed=3)
    return root


class _Served:
    """Stands in for the Gradio server only: records the engine the command built instead of serving it."""

    engines: list = []

    def __init__(self, engine, host, port, block):
        self.engines.append((engine, host, port, block))

    def block_thread(self) -> None:
        pass


def test_command_options_reach_the_engine(checkpoint_folders, photos, monkeypatch, capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora import cli
    from diffusers_hyperlora.demo import app

    monkeypatch.setattr(app, "launch_demo", lambda engine, host, port, block: _Served(engine, host, port, block))
    root = checkpoint_folders
    argv = ["demo", str(root / "repo"), "--subfolder", "sub", "--base-model", str(root / "sdxl")]
    argv += ["--image-encoder", str(root / "clip"), "--face-models", str(root / "faces"), "--device", "cpu"]
    assert cli.main([*argv, "--host", "127.0.0.2", "--port", "7999"]) == 0
    engine, host, port, block = _Served.engines[-1]
    assert (host, port, block) == ("127.0.0.2", 7999, False)
    assert "http://127.0.0.2:7999" in capsys.readouterr().out
    assert engine.defaults.size == 1024 and "sub" in engine.description and "sdxl" in engine.description
    assert engine.pipe.unet.device.type == "cpu" and engine.pipe.unet.dtype == torch.float32
    # the base model is the saved one (seed 3), not the tiny default (seed 0)
    from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline

    reference = tiny_sdxl_pipeline(seed=3).unet.state_dict()
    loaded = engine.pipe.unet.state_dict()
    shared = [name for name in loaded if name in reference]
    assert len(shared) > 100
    for name in shared:
        torch.testing.assert_close(loaded[name], reference[name])
    # the face models and the CLIP encoder are the given folders: a marked photo gives an identity
    identity = engine.identity_from_inputs([photos["astronaut"]])
    assert identity.num_images == 1


def _files(folder, prefix: str = "") -> dict:
    """Every file under `folder`, by its path in a repo (under `prefix`)."""
    return {prefix + path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}


def test_command_hub_options_reach_the_checkpoint_and_the_base_model(checkpoint_folders, tmp_path, monkeypatch):
    """`demo REPO --subfolder --revision --token --cache-dir --local-files-only --force-download`, from a Hub cache."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    import diffusers
    import huggingface_hub.constants
    from test_hub import COMMIT_MAIN, COMMIT_V2, add_snapshot

    from diffusers_hyperlora import cli, io
    from diffusers_hyperlora.demo import app
    from diffusers_hyperlora.io import HubOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(app, "launch_demo", lambda engine, host, port, block: _Served(engine, host, port, block))
    cache = tmp_path / "cache"
    add_snapshot(cache, "org/demo", COMMIT_V2, _files(checkpoint_folders / "repo"), ref="v2")
    add_snapshot(cache, "org/sdxl", COMMIT_MAIN, _files(checkpoint_folders / "sdxl"))
    loads, bases = [], []
    load_predictor, from_pretrained = io.load_predictor, diffusers.DiffusionPipeline.from_pretrained

    def spy_load(path, hub_options=None, **kwargs):
        loads.append((path, hub_options))
        return load_predictor(path, hub_options, **kwargs)

    def spy_base(cls, name, **kwargs):
        bases.append((name, kwargs))
        return from_pretrained.__func__(cls, name, **kwargs)

    monkeypatch.setattr(io, "load_predictor", spy_load)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy_base))
    argv = ["demo", "org/demo", "--subfolder", "sub", "--revision", "v2", "--token", "hf_test"]
    argv += ["--cache-dir", str(cache), "--local-files-only", "--force-download", "--base-model", "org/sdxl"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    engine = _Served.engines[-1][0]
    assert "org/demo (sub)" in engine.description and "org/sdxl" in engine.description
    expected = HubOptions("sub", "v2", "hf_test", str(cache), local_files_only=True, force_download=True)
    assert loads == [("org/demo", expected)]
    # The base model gets the token, the cache and the download switches (force_download is off: offline).
    base = {key: bases[0][1][key] for key in ("revision", "token", "cache_dir", "local_files_only", "force_download")}
    assert bases[0][0] == "org/sdxl" and base == expected.for_other_repo().download_kwargs()
    assert base == {"revision": None, "token": "hf_test", "cache_dir": str(cache), "local_files_only": True,
                    "force_download": False}  # fmt: skip


def test_engine_takes_hub_options_as_an_object_or_keywords(checkpoint_folders, monkeypatch):
    from diffusers_hyperlora.io import HubOptions

    seen = []

    class Controller:  # records what load_hyperlora hands over, loads nothing
        def load(self, path, options) -> None:
            seen.append(options.hub_options)

    monkeypatch.setattr("diffusers_hyperlora.pipeline.mixin.controller_of", lambda pipe: Controller())
    root = checkpoint_folders
    DemoEngine.from_pretrained(root / "repo", {"subfolder": "sub", "revision": "x"}, base_model=str(root / "sdxl"))
    DemoEngine.from_pretrained(root / "repo", HubOptions(revision="x"), base_model=str(root / "sdxl"), subfolder="sub")
    assert seen == [HubOptions(subfolder="sub", revision="x")] * 2


@pytest.mark.parametrize(
    "flags",
    [["--base-model", "x"], ["--subfolder", "x"], ["--face-models", "x"], ["--revision", "x"], ["--token", "x"]]
    + [["--cache-dir", "x"], ["--local-files-only"], ["--force-download"]],
)
def test_command_tiny_default_refuses_checkpoint_options(flags, capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora import cli

    assert cli.main(["demo", *flags]) == 1
    error = capsys.readouterr().err
    assert f"{flags[0]} need a CHECKPOINT" in error and "Pass a CHECKPOINT" in error


def test_command_wrong_model_is_a_readable_error(checkpoint_folders, tmp_path, capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers import UNet2DConditionModel

    from diffusers_hyperlora import cli
    from diffusers_hyperlora.testing.tiny_models import TINY_UNET_CONFIG, tiny_hyperlora_predictor

    other_unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 48})
    tiny_hyperlora_predictor(other_unet).save_pretrained(tmp_path / "other")
    argv = ["demo", str(tmp_path / "other"), "--base-model", str(checkpoint_folders / "sdxl"), "--device", "cpu"]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert "checkpoint expects" in error and "Traceback" not in error
