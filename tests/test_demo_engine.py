"""The demo's engine (no browser): every control of the page reaches the pipeline, the lock pairs each visitor's
identity with their images, files and sliders, errors, and the `demo` command's checkpoint options.

The page itself is driven in a real browser by tests/test_demo.py.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

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
from diffusers_hyperlora.demo.engine import MAX_SEED, TINY_DEFAULTS, WorkFolder  # noqa: E402
from diffusers_hyperlora.errors import (  # noqa: E402
    HyperLoRAWriteError,
    IdentityMismatchError,
    ImageInputError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NoFaceDetectedError,
    NonFiniteValueError,
)
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
    [
        ({"steps": 0}, "Steps"),
        ({"steps": 2.5}, "Steps"),
        ({"width": 100}, "Width"),
        ({"width": 96}, "multiple of 64"),
        ({"height": 4096}, "Height"),
        ({"seed": -1}, "Seed"),
        ({"seed": 2**64}, "Seed must be a whole number from 0 to 18446744073709551615"),  # torch: "Overflow"
        ({"seed": None}, "Seed"),  # an emptied number box
        ({"seed": float("inf")}, "Seed"),
        ({"id_weight": float("nan")}, "ID weight must be a finite number"),  # NaN gave an all-black image
        ({"base_weight": float("inf")}, "Base weight must be a finite number"),
        ({"slider_weight": float("-inf")}, "Slider weight must be a finite number"),
        ({"prompt": None}, "Prompt must be text"),  # was AttributeError: 'NoneType' object has no attribute 'strip'
        ({"negative_prompt": 5}, "Negative prompt must be text"),  # was diffusers' TypeError
    ],
    ids=lambda value: repr(value) if not isinstance(value, str) else "",
)
def test_settings_out_of_range_change_nothing(engine, identities, change, message):
    before = engine.pipe.hyperlora.identity
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        engine.generate(identities["moved"], replace(BASE, **change))
    assert caught.value.argument == next(iter(change))  # the setting at fault, for front ends
    assert engine.pipe.hyperlora.identity is before


def test_a_weight_that_blows_the_image_up_is_an_error_not_a_black_image(engine, identities):
    """1e308 is finite but overflows the float32 LoRA update: the latents turn NaN, the image came out all black."""
    with pytest.raises(NonFiniteValueError, match="Step 1: the image became NaN .* with ID weight 1e\\+308") as caught:
        engine.generate(identities["astronaut"], replace(BASE, id_weight=1e308))
    assert caught.value.argument == "id_weight"
    image, _ = engine.generate(identities["astronaut"], BASE)  # the lock was released, the engine still works
    assert pixels(image).std() > 1.0


def test_engine_calls_with_wrong_types_are_library_errors(engine, identities, photos):
    """From Python, not the page: each was an AttributeError / TypeError from deep inside."""
    calls = {
        "identity": lambda: engine.save_identity(None),  # 'NoneType' object has no attribute 'save'
        "settings": lambda: engine.generate(identities["astronaut"], None),  # ... no attribute 'validate'
        "photos": lambda: engine.preview(None),  # 'NoneType' object is not iterable
        "folder": lambda: engine.remove_folder(None),  # expected str, bytes or os.PathLike object
    }
    for argument, call in calls.items():
        with pytest.raises(InvalidArgumentTypeError, match=f"{argument} must be") as caught:
            call()
        assert caught.value.argument == argument
    with pytest.raises(InvalidArgumentError, match="Slider name None"):  # 'NoneType' object has no attribute 'strip'
        engine.add_slider([photos["astronaut"]], [photos["moved"]], None)


def test_largest_seed_is_accepted(engine, identities):
    image, _ = engine.generate(identities["astronaut"], replace(BASE, seed=MAX_SEED))
    assert pixels(image).std() > 1.0


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
    before = set(engine.workdir.rglob("*"))
    with pytest.raises(InvalidArgumentError, match="format"):
        engine.export_lora(identities["astronaut"], format="ckpt")
    assert set(engine.workdir.rglob("*")) == before  # refused before any folder was made


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "..", "a/../../b"])
def test_export_lora_name_stays_in_the_work_folder(engine, identities, tmp_path, name):
    folder = engine.new_folder()
    path = engine.export_lora(identities["astronaut"], name=name, folder=folder)
    assert path.parent == folder and path.is_file() and path.name.endswith("_kohya.safetensors")
    assert ".." not in path.name and "/" not in path.name
    assert not list(engine.workdir.parent.glob("*escaped*")) and not Path("/tmp/escaped_kohya.safetensors").exists()


def test_downloads_only_inside_the_work_folder(engine, identities, tmp_path):
    with pytest.raises(InvalidArgumentError, match="work folder") as caught:
        engine.save_identity(identities["astronaut"], folder=tmp_path)
    assert caught.value.argument == "folder" and not list(tmp_path.iterdir())


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
    with pytest.raises(InvalidArgumentError, match="Slider name") as caught:
        engine.add_slider([photos["astronaut"]], [photos["moved"]], name)
    assert caught.value.argument == "name"


def test_slider_names_come_from_the_loaded_adapters(tmp_path, photos):
    """HyperLoRA loaded under other adapter names: the engine uses those, and 'id' is then a fine slider name."""
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_hyperlora(tiny_hyperlora_predictor(pipe.unet), id_adapter_name="hyper_id", base_adapter_name="hyper_b")
    engine = DemoEngine(pipe, defaults=TINY_DEFAULTS, workdir=tmp_path)
    assert engine.adapter_names == ("hyper_id", "hyper_b")
    identity = pipe.hyperlora.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
    engine.generate(identity, replace(BASE, steps=1))
    assert set(pipe.unet.active_adapters()) == {"hyper_id", "hyper_b"}
    with pytest.raises(InvalidArgumentError, match="taken by HyperLoRA"):
        engine.add_slider([photos["astronaut"]], [photos["moved"]], "hyper_b")
    engine.close()


def test_unknown_slider(engine, identities):
    with pytest.raises(InvalidArgumentError, match="no slider") as caught:
        engine.generate(identities["astronaut"], replace(BASE, slider="nope"))
    assert caught.value.argument == "slider"


def test_errors_are_library_errors(engine, photos, tmp_path):
    with pytest.raises(NoFaceDetectedError, match="coffee.png"):
        engine.identity_from_inputs([photos["coffee"]])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="broken.png could not be read as an image. Upload a JPEG") as caught:
        engine.identity_from_inputs([str(broken)])
    # the page's words: the file's name once, never the server's path, no Python type names
    assert str(tmp_path) not in str(caught.value) and "numpy" not in str(caught.value)
    with pytest.raises(InvalidArgumentError, match="photos") as caught:
        engine.identity_from_inputs([])
    assert caught.value.argument == "photos"


def test_no_face_with_the_tiny_default_points_to_the_example_photo(engine, photos):
    """The tiny detector finds only framed faces: a real photo must not read as "your photo has no face"."""
    for step in (engine.identity_from_inputs, engine.preview):
        with pytest.raises(NoFaceDetectedError, match="coffee.png") as caught:
            step([photos["coffee"]])
        assert "magenta frame" in str(caught.value) and "example photo" in str(caught.value)
        assert str(Path(photos["coffee"]).parent) not in str(caught.value)


def fake_png(path: Path, width: int, height: int) -> Path:
    """A PNG file whose header says `width` x `height` (its pixel data is not all there: only the header counts)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's note while reading the header
@pytest.mark.parametrize("side, size", [(7000, "7000x7000 pixels (49 MP)"), (12000, "12000x12000"), (15000, "179 MP")])
def test_huge_photos_are_refused_before_decoding(engine, tmp_path, side, size):
    """12000x12000 cost 1 GB and 5-7 s; 15000x15000 raised PIL's DecompressionBombError on the page."""
    photo = fake_png(tmp_path / f"huge{side}.png", side, side)
    for step in (engine.identity_from_inputs, engine.preview):
        with pytest.raises(ImageInputError, match="at most 40 MP") as caught:
            step([str(photo)])
        assert f"huge{side}.png" in str(caught.value) and size in str(caught.value)


def test_preview(engine, photos):
    gallery = engine.preview([photos["astronaut"]])
    captions = [caption for _, caption in gallery]
    assert captions[:2] == ["CLIP crop", "ArcFace crop"]  # short enough to read under a thumbnail
    assert all(isinstance(image, Image.Image) for image, _ in gallery)
    two = engine.preview([photos["astronaut"], photos["moved"]])
    assert [caption for _, caption in two][:1] == ["CLIP crop (astronaut.png)"]


def test_tiny_defaults(engine, tmp_path_factory):
    assert engine.defaults == TINY_DEFAULTS
    assert engine.workdir.name.startswith("hyperlora-demo-")  # its own folder inside the one given
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


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a machine without")
@pytest.mark.parametrize("device, words", [("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("mps", "no Apple GPU")])
def test_command_tiny_default_refuses_a_device_this_machine_lacks(device, words, monkeypatch, capsys):
    """The tiny default runs on `--device`: one this machine lacks is refused, never served on the CPU instead."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora import cli
    from diffusers_hyperlora.demo import app

    served = len(_Served.engines)
    monkeypatch.setattr(app, "launch_demo", lambda engine, host, port, block: _Served(engine, host, port, block))
    assert cli.main(["demo", "--device", device]) == 1
    error = capsys.readouterr().err
    assert f"--device {device!r}" in error and words in error and "--device cpu" in error, error
    assert len(_Served.engines) == served


def test_command_tiny_default_runs_on_the_device_given(monkeypatch):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora import cli
    from diffusers_hyperlora.demo import app

    built = []
    tiny_default = DemoEngine.tiny_default.__func__

    def spy(cls, seed=0, workdir=None, device="cpu"):  # the real tiny default; records the device asked for
        built.append(device)
        return tiny_default(cls, seed=seed, workdir=workdir, device=device)

    monkeypatch.setattr(DemoEngine, "tiny_default", classmethod(spy))
    monkeypatch.setattr(app, "launch_demo", lambda engine, host, port, block: _Served(engine, host, port, block))
    assert cli.main(["demo", "--device", "cpu"]) == 0
    engine = _Served.engines[-1][0]
    try:
        assert built == ["cpu"] and engine.pipe.unet.device.type == "cpu" and engine.pipe.unet.dtype == torch.float32
    finally:
        engine.close()
    # Without --device the tiny default stays on the CPU even where there is a GPU (its count stood in for here):
    # the same images on every machine, as `DemoEngine.tiny_default()` in Python.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["demo"]) == 0
    _Served.engines[-1][0].close()
    assert built == ["cpu", "cpu"]


def test_command_base_model_defaults_to_the_librarys(checkpoint_folders, monkeypatch, capsys):
    """Without --base-model the demo asks for `DEFAULT_BASE_MODEL` (the load stops there: nothing is downloaded)."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    import diffusers

    from diffusers_hyperlora import cli
    from diffusers_hyperlora.model.config import DEFAULT_BASE_MODEL

    asked = []

    def stop(cls, name, **kwargs):
        asked.append(name)
        raise OSError(f"{name} is not in the cache (offline)")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(stop))
    assert cli.main(["demo", str(checkpoint_folders / "repo"), "--subfolder", "sub", "--device", "cpu"]) == 1
    assert asked == [DEFAULT_BASE_MODEL] and "not in the cache" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------------------- one lock
def test_engine_called_while_holding_the_controllers_lock_does_not_deadlock(engine, identities):
    """User code holds `pipe.hyperlora.lock` and calls the engine while a visitor's generation waits for that lock.
    An engine that took a lock of its own first (then the controller's) would leave both threads waiting for good."""
    results: list = []
    holding, release = threading.Event(), threading.Event()

    def user_code() -> None:
        with engine.pipe.hyperlora.lock:
            holding.set()
            release.wait(timeout=30)  # meanwhile a visitor's generation starts and waits
            results.append(engine.generate(identities["astronaut"], BASE))

    def visitor() -> None:
        results.append(engine.generate(identities["moved"], BASE))

    user = threading.Thread(target=user_code, daemon=True)
    user.start()
    assert holding.wait(timeout=30)
    waiting = threading.Thread(target=visitor, daemon=True)
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()  # the visitor waits for the lock the user code holds
    release.set()
    user.join(timeout=60)
    waiting.join(timeout=60)
    assert not user.is_alive() and not waiting.is_alive(), "deadlock: the engine takes a second lock"
    assert len(results) == 2 and engine.lock is engine.pipe.hyperlora.lock


# ---------------------------------------------------------------------------------------------- files
def test_work_folder_is_removed_by_close_and_collection(tmp_path):
    folder = WorkFolder(tmp_path)
    path = folder.path
    (folder.new_folder("visitors") / "x.safetensors").write_bytes(b"x")
    assert path.parent == tmp_path.resolve() and path.is_dir()
    folder.remove()
    assert not path.exists() and folder.removed and tmp_path.is_dir()  # the given folder itself stays
    other = WorkFolder(tmp_path).path
    import gc

    gc.collect()  # the WorkFolder object is gone: its folder too
    assert not other.exists()


def test_work_folder_is_removed_at_exit(tmp_path):
    code = (
        "import sys; from diffusers_hyperlora.demo.engine import WorkFolder; "
        "folder = WorkFolder(sys.argv[1]); (folder.path / 'f').write_text('x'); print(folder.path)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path.resolve()))
    assert not list(tmp_path.iterdir())


def test_engine_close_removes_its_files(tmp_path, photos):
    engine = DemoEngine.tiny_default(workdir=tmp_path)
    identity = engine.identity_from_inputs([photos["astronaut"]])
    download = engine.save_identity(identity)
    assert download.is_file() and engine.workdir in download.parents
    engine.close()
    assert not list(tmp_path.iterdir())
    for folder in (None, download.parent):  # a new folder, or the visitor's folder of before
        with pytest.raises(HyperLoRAWriteError, match="was removed \\(the engine was closed\\)"):
            engine.save_identity(identity, folder)  # wrote into a new work folder that nothing removed any more
    assert not list(tmp_path.iterdir())


def test_remove_folder_removes_only_folders_inside(engine, tmp_path):
    outside = tmp_path / "keep"
    outside.mkdir()
    engine.remove_folder(outside)
    engine.remove_folder(engine.workdir)
    assert outside.is_dir() and engine.workdir.is_dir()
    inside = engine.new_folder()
    engine.remove_folder(inside)
    assert not inside.exists()


# ---------------------------------------------------------------------------------------------- the page's handlers
@pytest.fixture(scope="module")
def handlers(engine):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora.demo.app import DemoHandlers

    return DemoHandlers(engine)


def test_each_visitor_has_a_folder_removed_when_they_leave(handlers, engine, photos):
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    path_a, cached, status = handlers.save_identity([photos["astronaut"]], None, alice)
    path_b, _, _ = handlers.export_lora([photos["moved"]], None, "kohya", bob)
    again, _, _ = handlers.export_lora([photos["astronaut"]], cached, "diffusers", alice)
    assert "Saved the identity" in status
    folder_a, folder_b = Path(path_a).parent, Path(path_b).parent
    assert Path(again).parent == folder_a != folder_b  # one folder per visitor, named by the server
    assert "alice" not in str(folder_a) and engine.workdir in folder_a.parents
    handlers.end_session(alice)
    assert not folder_a.exists() and Path(path_b).is_file()  # only the leaving visitor's files go
    handlers.end_session(bob)
    assert not folder_b.exists()
    handlers.end_session(SimpleNamespace(session_hash="../../nobody"))  # unknown sessions: nothing to remove


def test_page_errors_name_files_not_server_paths(handlers, photos, tmp_path):
    from diffusers_hyperlora.demo.app import error_message

    gallery, status = handlers.preview([photos["coffee"]])
    assert gallery is None and status.startswith("**Error:** No face was found in coffee.png")
    damaged = tmp_path / "upload" / "damaged.safetensors"  # the library's message names the file by its path
    damaged.parent.mkdir()
    damaged.write_bytes(b"not an identity")
    _, status = handlers.create_identity([str(damaged)], None)
    assert status.startswith("**Error:** 'damaged.safetensors' is not a readable") and str(tmp_path) not in status
    unexpected = error_message(RuntimeError("CUDA error: device-side assert triggered"))
    assert "RuntimeError" not in unexpected and "CUDA" not in unexpected and "try again" in unexpected


@pytest.mark.parametrize("seed, weight, message", [(2**64, 0.8, "Seed"), (None, 0.8, "Seed"), (0, float("nan"), "ID")])
def test_page_generate_refuses_bad_numbers(handlers, photos, seed, weight, message):
    image, _, status = handlers.generate(
        [photos["astronaut"]], None, "a person", True, "", weight, 0.0, "(none)", 0.0, 2, seed, 64, 64
    )
    assert image is None and status.startswith(f"**Error:** {message}")


def test_launch_refuses_a_bad_port(engine):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora.demo import launch_demo

    for port in (99999, 0, -1, "7860"):
        with pytest.raises(InvalidArgumentError, match="Port") as caught:
            launch_demo(engine, port=port, block=False)
        assert caught.value.argument == "port"


@pytest.mark.parametrize("device", ["nonsense-device", "meta", "tpu"])
def test_from_pretrained_refuses_a_bad_device_before_loading(tmp_path, device):
    with pytest.raises(InvalidArgumentError, match="not a device HyperLoRA runs on; use cpu, cuda") as caught:
        DemoEngine.from_pretrained(tmp_path / "missing-checkpoint", base_model=str(tmp_path / "missing"), device=device)
    assert caught.value.argument == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_from_pretrained_refuses_cuda_without_a_gpu(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no CUDA GPU"):
        DemoEngine.from_pretrained(tmp_path / "missing-checkpoint", base_model=str(tmp_path / "missing"), device="cuda")


def test_tiny_default_refuses_a_bad_device(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not a device") as caught:
        DemoEngine.tiny_default(workdir=tmp_path, device="nonsense-device")
    assert caught.value.argument == "device" and not list(tmp_path.iterdir())  # refused before any file


def test_command_bad_port_is_one_line(capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from diffusers_hyperlora import cli

    assert cli.main(["demo", "--port", "99999"]) == 1
    error = capsys.readouterr().err
    assert "--port must be a whole number from 1 to 65535 (e.g. 7860), got 99999" in error, error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_launch_refuses_a_work_folder_gradio_would_not_serve(engine, tmp_path, monkeypatch):
    """Downloads are handed to Gradio from the work folder, which Gradio accepts only inside the temp folder or the
    current folder (the work folder itself is not served): any other folder is refused before serving."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    import tempfile

    from diffusers_hyperlora.demo import launch_demo

    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match="inside the temp folder or the current folder") as caught:
        launch_demo(engine, port=7860, block=False)
    assert caught.value.argument == "workdir"


def test_generate_switches_through_the_controllers_using(engine, identities, reference, monkeypatch):
    """The switch and the generation share `pipe.hyperlora.using`, the controller's one public way to pair them."""
    used = []
    using = engine.pipe.hyperlora.using

    def recording(identity, **kwargs):
        used.append(identity)
        return using(identity, **kwargs)

    monkeypatch.setattr(engine.pipe.hyperlora, "using", recording)
    image, _ = engine.generate(identities["astronaut"], BASE)
    assert used == [identities["astronaut"]]
    np.testing.assert_array_equal(pixels(image), reference)
