"""Faults at the seams: every bad input is a clear `HyperLoRAError`, and a failed call changes nothing.

Each test names the case of the [lifecycle] issue it covers. "Nothing changed" is checked on the live adapter
weights, the active adapters, the current identity, the loaded checkpoint and the files on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from conftest import enable_group_offload, random_features, unet_output
from peft.tuners.tuners_utils import BaseTunerLayer

from diffusers_hyperlora import (
    AdapterNameConflictError,
    HyperLoRAError,
    HyperLoRAIdentity,
    HyperLoRANotLoadedError,
    HyperLoRAWriteError,
    IdentityFormatError,
    IdentityMismatchError,
    ImageInputError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NonFiniteValueError,
    TargetMismatchError,
)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

NAN = float("nan")


# ---------------------------------------------------------------------------------------------- helpers
def _identity(predictor, seed: int) -> HyperLoRAIdentity:
    return predictor.predict(*random_features(batch=1, seed=seed))


def _live(pipe) -> list[torch.Tensor]:
    """Every live HyperLoRA adapter weight (ID + Base), cloned."""
    adapters = pipe.hyperlora.adapters
    return [p.detach().clone() for branch in ("id", "base") for pair in adapters.lora_parameters(branch) for p in pair]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _active(pipe) -> list[str]:
    return pipe.get_active_adapters()


@pytest.fixture
def loaded(pipe, predictor):
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(_identity(predictor, 1))
    return pipe


def _snapshot(pipe):
    return _live(pipe), _active(pipe), pipe.hyperlora_identity, pipe.hyperlora.predictor


def _unchanged(pipe, snapshot) -> bool:
    weights, active, identity, predictor = snapshot
    return (
        _same(_live(pipe), weights)
        and _active(pipe) == active
        and pipe.hyperlora_identity is identity
        and pipe.hyperlora.predictor is predictor
    )


# ---------------------------------------------------------------------------------------------- NaN / inf sources
@pytest.mark.parametrize("which", ["id_embeds", "clip_hidden_states"])
@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_non_finite_features_are_refused(loaded, which, value):
    embeds, clip = random_features(batch=2)
    (embeds if which == "id_embeds" else clip)[1, 3] = value
    count = 1 if which == "id_embeds" else 48
    before = _snapshot(loaded)
    with pytest.raises(NonFiniteValueError, match=f"`{which}` holds {count} NaN/infinite"):
        loaded.hyperlora.predict(id_embeds=embeds, clip_hidden_states=clip)
    assert _unchanged(loaded, before)


def test_identity_file_with_nan_mean_is_refused(loaded, predictor, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "me.safetensors"
    _identity(predictor, 2).save(path)
    tensors = load_file(path)
    tensors["id_mean"][0, 0] = NAN
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, path, metadata=metadata)
    before = _snapshot(loaded)
    with pytest.raises(IdentityFormatError, match="NaN"):
        HyperLoRAIdentity.load(path)
    with pytest.raises(IdentityFormatError):
        loaded.set_hyperlora_identity(str(path))  # identity files are accepted where photos are
    assert _unchanged(loaded, before)


def test_nan_identity_object_is_refused_by_switch_and_export(loaded, predictor, tmp_path):
    bad = _identity(predictor, 2)
    bad.id_mean[3, 1] = NAN
    before = _snapshot(loaded)
    with pytest.raises(NonFiniteValueError, match="id_mean"):
        loaded.set_hyperlora_identity(bad)
    with pytest.raises(NonFiniteValueError):
        loaded.hyperlora.export_lora(bad, tmp_path / "lora.safetensors")
    with pytest.raises(NonFiniteValueError):
        bad.save(tmp_path / "bad.safetensors")
    assert _unchanged(loaded, before)
    assert not list(tmp_path.iterdir())  # no LoRA file, no identity file, no temporary left behind


def test_corrupt_bank_bytes_are_refused_at_load_and_the_old_hyperlora_stays(loaded, predictor, tmp_path):
    folder = tmp_path / "ckpt"
    tiny_hyperlora_predictor(seed=5).save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = b"\xff" * 4096  # the last tensor's bytes: 0xFFFFFFFF is a float32 NaN
    weights.write_bytes(bytes(data))
    before = _snapshot(loaded)
    with pytest.raises(NonFiniteValueError, match="damaged"):
        loaded.load_hyperlora(str(folder))
    assert _unchanged(loaded, before)


# ---------------------------------------------------------------------------------------------- face analyzer output
class _LyingAnalysis:
    """A FaceAnalysis-like plug-in that reports one face with chosen (possibly broken) fields."""

    def __init__(self, bbox=None, landmarks=None, embedding=None):
        rng = np.random.default_rng(0)
        self.landmarks = rng.uniform(40, 80, size=(106, 2)) if landmarks is None else landmarks
        self.bbox = np.r_[self.landmarks.min(0), self.landmarks.max(0)] if bbox is None else bbox
        if embedding is None:
            embedding = rng.normal(size=512).astype(np.float32)
            embedding /= np.linalg.norm(embedding)
        self.embedding = embedding

    def prepare(self, ctx_id, det_size=(640, 640), det_thresh=0.5):
        pass

    def get(self, img):
        return [{"bbox": self.bbox, "landmark_2d_106": self.landmarks, "normed_embedding": self.embedding}]


def _face_pipe(pipe, predictor, app):
    from face_models import tiny_clip_encoder

    from diffusers_hyperlora.face import FaceAnalyzer

    pipe.load_hyperlora(predictor, image_encoder=tiny_clip_encoder(), face_analyzer=FaceAnalyzer(app))
    pipe.set_hyperlora_identity(_identity(predictor, 1))
    return pipe


_GOOD = _LyingAnalysis()
_NAN_LANDMARKS = np.where(np.arange(212).reshape(106, 2) == 7, NAN, _GOOD.landmarks)


@pytest.mark.parametrize(
    "app, error, match",
    [
        (_LyingAnalysis(embedding=np.full(512, NAN, np.float32)), NonFiniteValueError, "ArcFace embedding"),
        (_LyingAnalysis(bbox=np.array([NAN, 1.0, 50.0, 60.0])), NonFiniteValueError, "box"),
        (_LyingAnalysis(bbox=_GOOD.bbox, landmarks=_NAN_LANDMARKS), NonFiniteValueError, "landmarks"),
        (_LyingAnalysis(bbox=np.array([500.0, 500.0, 600.0, 600.0])), ImageInputError, "outside"),
        (_LyingAnalysis(bbox=_GOOD.bbox, landmarks=_GOOD.landmarks + 5000), ImageInputError, "far outside"),
    ],
    ids=["nan-embedding", "nan-box", "nan-landmarks", "box-outside", "landmarks-outside"],
)
def test_broken_analyzer_output_is_a_clear_error(pipe, predictor, app, error, match):
    pytest.importorskip("insightface")
    _face_pipe(pipe, predictor, app)
    before = _snapshot(pipe)
    photo = np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    with pytest.raises(error, match=match):
        pipe.set_hyperlora_identity(photo)
    assert _unchanged(pipe, before)


def test_a_user_clip_encoder_is_not_converted(pipe, predictor):
    pytest.importorskip("insightface")
    from face_models import tiny_clip_encoder

    from diffusers_hyperlora.face import FaceAnalyzer

    encoder = tiny_clip_encoder()
    pipe.unet.to(torch.bfloat16)
    pipe.load_hyperlora(predictor, image_encoder=encoder, face_analyzer=FaceAnalyzer(_LyingAnalysis()))
    identity = pipe.set_hyperlora_identity(np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    assert encoder.model.dtype == torch.float32  # still the user's dtype
    assert torch.isfinite(identity.id_mean).all()


# ---------------------------------------------------------------------------------------------- identity lies
def test_identity_shape_and_probe_lies_are_refused(loaded, predictor):
    good = _identity(predictor, 3)
    before = _snapshot(loaded)
    wrong_shape = HyperLoRAIdentity(torch.randn(96, 16), 1, None, good.checkpoint, good.probe)
    odd_shape = HyperLoRAIdentity(torch.randn(9, 8), 1, None, good.checkpoint, good.probe)
    no_probe = HyperLoRAIdentity(good.id_mean, 1, None, good.checkpoint, None)
    other_weights = tiny_hyperlora_predictor(seed=9).predict(*random_features(batch=1))
    for lie, match in [
        (wrong_shape, r"shape \[96, 16\].*\[192, 8\]"),
        (odd_shape, r"shape \[9, 8\]"),
        (no_probe, "no `probe`"),
        (other_weights, "differ from the loaded checkpoint's by up to"),
    ]:
        with pytest.raises(IdentityMismatchError, match=match):
            loaded.set_hyperlora_identity(lie)
        with pytest.raises(IdentityMismatchError):
            loaded.hyperlora.export_lora(lie)
    assert _unchanged(loaded, before)


def test_other_architecture_message_names_both_hashes(loaded, predictor):
    identity = _identity(predictor, 3)
    identity.checkpoint = "0123456789abcdef"
    with pytest.raises(IdentityMismatchError) as info:
        loaded.set_hyperlora_identity(identity)
    assert "0123456789abcdef" in str(info.value) and predictor.checkpoint_hash in str(info.value)


# ---------------------------------------------------------------------------------------------- transactional loads
def test_a_failed_load_keeps_the_old_hyperlora_and_identity(loaded, predictor):
    before = _snapshot(loaded)
    reference = unet_output(loaded.unet)
    from diffusers_hyperlora.model.targets import TargetModule

    target = TargetModule("lora_unet_mid_block_attentions_9_transformer_blocks_0_attn1", 64)
    mismatched = tiny_hyperlora_predictor(seed=3, targets=[target])
    with pytest.raises(TargetMismatchError):
        loaded.load_hyperlora(mismatched)
    loaded.unet.add_adapter(__import__("peft").LoraConfig(r=2, target_modules=["to_q"]), adapter_name="mine")
    loaded.set_adapters(["id", "base"], [0.8, 0.0])
    before = _snapshot(loaded)
    with pytest.raises(AdapterNameConflictError, match="mine"):
        loaded.load_hyperlora(tiny_hyperlora_predictor(seed=3), id_adapter_name="mine")
    with pytest.raises(HyperLoRAError):
        loaded.load_hyperlora("/no/such/folder", local_files_only=True)
    assert _unchanged(loaded, before)
    torch.testing.assert_close(unet_output(loaded.unet), reference)


def _unet_state(pipe) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in pipe.unet.state_dict().items()}


def _same_state(pipe, state: dict[str, torch.Tensor]) -> bool:
    now = pipe.unet.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[key], state[key]) for key in state)


BAD_LOAD_OPTIONS = [
    (dict(id_weight="x"), InvalidArgumentTypeError, "id_weight"),
    (dict(id_weight=True), InvalidArgumentTypeError, "id_weight"),
    (dict(id_weight=NAN), InvalidArgumentError, "id_weight"),
    (dict(base_weight=float("inf")), InvalidArgumentError, "base_weight"),
    (dict(id_adapter_name=3), InvalidArgumentTypeError, "id_adapter_name"),
    (dict(base_adapter_name=None), InvalidArgumentTypeError, "base_adapter_name"),
    (dict(base_adapter_name=""), InvalidArgumentError, "base_adapter_name"),
    (dict(id_adapter_name="hyper.id"), InvalidArgumentError, "id_adapter_name"),
    (dict(id_adapter_name="mine", base_adapter_name="mine"), AdapterNameConflictError, "base_adapter_name"),
    (dict(torch_dtype="int8"), InvalidArgumentError, "torch_dtype"),
    (dict(torch_dtype=3), InvalidArgumentTypeError, "torch_dtype"),
    (dict(heads=0), InvalidArgumentError, "heads"),
    (dict(dim_head="64"), InvalidArgumentTypeError, "dim_head"),
    (dict(feature_extractor="arcface"), InvalidArgumentTypeError, "feature_extractor"),
    (dict(image_encoder=5), InvalidArgumentTypeError, "image_encoder"),
    (dict(face_analyzer=""), InvalidArgumentError, "face_analyzer"),
    (dict(offload_bank="yes"), InvalidArgumentTypeError, "offload_bank"),
]


@pytest.mark.parametrize("options, error, argument", BAD_LOAD_OPTIONS, ids=[a for *_, a in BAD_LOAD_OPTIONS])
def test_a_bad_load_option_is_refused_before_anything_changes(loaded, tmp_path, options, error, argument):
    folder = tmp_path / "ckpt"
    tiny_hyperlora_predictor(seed=5).save_pretrained(folder)
    before, state, configs = _snapshot(loaded), _unet_state(loaded), sorted(loaded.unet.peft_config)
    with pytest.raises(error) as caught:
        loaded.load_hyperlora(str(folder), **options)
    assert caught.value.argument == argument and argument in str(caught.value)
    assert _unchanged(loaded, before) and _same_state(loaded, state) and sorted(loaded.unet.peft_config) == configs
    loaded.load_hyperlora(str(folder))  # the next good load works
    assert sorted(loaded.unet.peft_config) == ["base", "id"] and loaded.hyperlora.source == str(folder)


def test_a_checkpoint_of_the_wrong_type_is_refused(loaded):
    before = _snapshot(loaded)
    with pytest.raises(InvalidArgumentTypeError, match="HyperLoRAPredictor") as caught:
        loaded.load_hyperlora(5)
    assert caught.value.argument == "pretrained_model_name_or_path" and _unchanged(loaded, before)


FILE_ONLY_OPTIONS = [
    dict(torch_dtype=torch.float16),
    dict(heads=0),
    dict(dim_head=64),
    dict(subfolder="sdxl"),
    dict(revision="v2"),
    dict(token="hf_x"),
    dict(cache_dir="cache"),
    dict(local_files_only=True),
    dict(force_download=True),
]


@pytest.mark.parametrize("option", FILE_ONLY_OPTIONS, ids=[next(iter(o)) for o in FILE_ONLY_OPTIONS])
def test_options_that_read_files_are_refused_with_a_predictor_object(loaded, option):
    other = tiny_hyperlora_predictor(seed=6)
    before = _snapshot(loaded)
    with pytest.raises(InvalidArgumentError, match="only apply when reading a checkpoint's files") as caught:
        loaded.load_hyperlora(other, **option)
    assert caught.value.argument == next(iter(option)) and _unchanged(loaded, before)
    assert other.dtype == torch.float32


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_load_that_fails_midway_of_attach_puts_the_old_hyperlora_back(loaded, predictor, monkeypatch, fused):
    import diffusers_hyperlora.adapters.peft_adapters as peft_adapters

    loaded.add_hyperlora_slider(_identity(predictor, 2), _identity(predictor, 3), adapter_name="age", weight=-0.6)
    loaded.set_adapters(["id", "base", "age"], [0.65, 0.3, -0.45])
    if fused:
        loaded.fuse_lora(adapter_names=["id", "age"])
    before, state, reference = _snapshot(loaded), _unet_state(loaded), unet_output(loaded.unet)
    sliders, configs = loaded.hyperlora.sliders, sorted(loaded.unet.peft_config)
    add_adapter, calls = peft_adapters.add_adapter, []

    def fail_on_the_second_adapter(denoiser, config, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        add_adapter(denoiser, config, name)

    monkeypatch.setattr(peft_adapters, "add_adapter", fail_on_the_second_adapter)
    with pytest.raises(RuntimeError, match="simulated"):
        loaded.load_hyperlora(tiny_hyperlora_predictor(seed=7))
    assert calls[:2] == ["id", "base"]  # it failed with the new "id" adapter on the UNet
    assert _unchanged(loaded, before) and _same_state(loaded, state) and sorted(loaded.unet.peft_config) == configs
    assert loaded.hyperlora.sliders == sliders and loaded.hyperlora.identity is before[2]
    torch.testing.assert_close(unet_output(loaded.unet), reference, rtol=0, atol=0)
    monkeypatch.undo()
    if fused:
        loaded.unfuse_lora()
    loaded.load_hyperlora(tiny_hyperlora_predictor(seed=7))  # the next load works
    assert sorted(loaded.unet.peft_config) == ["base", "id"] and loaded.hyperlora.sliders == {}


def test_a_first_load_that_fails_midway_leaves_the_unet_as_it_was(pipe, predictor, monkeypatch):
    import diffusers_hyperlora.adapters.peft_adapters as peft_adapters

    state, reference = _unet_state(pipe), unet_output(pipe.unet)
    add_adapter = peft_adapters.add_adapter

    def fail_on_base(denoiser, config, name):
        if name == "base":
            raise RuntimeError("out of memory (simulated)")
        add_adapter(denoiser, config, name)

    monkeypatch.setattr(peft_adapters, "add_adapter", fail_on_base)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.load_hyperlora(predictor)
    assert (
        _same_state(pipe, state)
        and not getattr(pipe.unet, "peft_config", None)
        and pipe.hyperlora.adapter_names() == []
    )
    torch.testing.assert_close(unet_output(pipe.unet), reference, rtol=0, atol=0)
    monkeypatch.undo()
    pipe.load_hyperlora(predictor)
    assert sorted(pipe.unet.peft_config) == ["base", "id"]


def test_reloading_replaces_cleanly(loaded):
    other = tiny_hyperlora_predictor(seed=4)
    loaded.load_hyperlora(other)
    assert loaded.hyperlora.predictor is other and loaded.hyperlora_identity is None
    assert sorted(loaded.unet.peft_config) == ["base", "id"]


# ---------------------------------------------------------------------------------------------- bad use
def test_not_loaded_and_idempotent_unload(pipe):
    with pytest.raises(HyperLoRANotLoadedError, match=r"pipe\.hyperlora\.predict"):
        pipe.hyperlora.predict(*random_features())
    with pytest.raises(HyperLoRANotLoadedError):
        pipe.hyperlora.predictor  # noqa: B018
    pipe.unload_hyperlora()
    pipe.unload_hyperlora()


def test_bad_arguments_are_hyperlora_errors_naming_the_call(loaded, predictor):
    with pytest.raises(InvalidArgumentError, match="preview_hyperlora_inputs"):
        loaded.preview_hyperlora_inputs([])
    with pytest.raises(InvalidArgumentError, match="set_hyperlora_identity"):
        loaded.set_hyperlora_identity([])
    with pytest.raises(InvalidArgumentError, match="no HyperLoRA slider named 'age'"):
        loaded.remove_hyperlora_slider("age")
    a, b = _identity(predictor, 1), _identity(predictor, 2)
    with pytest.raises(InvalidArgumentError, match="positive sum"):
        HyperLoRAIdentity.mix([a, b], [1.0, -1.0])
    with pytest.raises(HyperLoRAError, match="one weight per identity"):
        HyperLoRAIdentity.mix([a, b], [1.0])
    with pytest.raises(InvalidArgumentError, match="Unknown LoRA format 'webui'"):
        loaded.hyperlora.export_lora(a, format="webui")
    for error in (InvalidArgumentError,):
        assert issubclass(error, ValueError)


# ---------------------------------------------------------------------------------------------- files
def test_identity_save_creates_folders_and_reports_the_real_destination(predictor, tmp_path):
    identity = _identity(predictor, 1)
    identity.save(tmp_path / "no" / "such" / "dir" / "id.safetensors")
    assert HyperLoRAIdentity.load(tmp_path / "no" / "such" / "dir" / "id.safetensors").num_images == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    destination = blocker / "id.safetensors"
    with pytest.raises(HyperLoRAWriteError) as info:
        identity.save(destination)
    assert isinstance(info.value, OSError) and str(destination) in str(info.value) and ".tmp" not in str(info.value)


_INTERRUPTED = textwrap.dedent(
    """
    import resource, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import random_features
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
    predictor = tiny_hyperlora_predictor(seed=0)
    identity = predictor.predict(*random_features(batch=1, seed=7))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    try:
        {call}
    except OSError as error:
        print("OSError", type(error).__name__, error)
        sys.exit(3)
    """
)


@pytest.mark.parametrize(
    "call",
    [
        "identity.save({path!r})",
        "predictor.export_lora(identity, {path!r})",
    ],
    ids=["identity.save", "export_lora"],
)
def test_an_interrupted_write_keeps_the_old_file(predictor, tmp_path, call):
    path = tmp_path / "out.safetensors"
    old = b"the old file, which must survive" * 10
    path.write_bytes(old)
    script = _INTERRUPTED.format(tests=os.path.dirname(__file__), limit=2048, call=call.format(path=str(path)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "HyperLoRAWriteError" in result.stdout and str(path) in result.stdout
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left


# ---------------------------------------------------------------------------------------------- threads
def test_concurrent_switches_always_leave_exactly_one_identity(loaded, predictor):
    people = {"a": _identity(predictor, 11), "b": _identity(predictor, 12)}
    expected = {}
    for name, person in people.items():
        loaded.set_hyperlora_identity(person)
        expected[name] = _live(loaded)
    barrier = threading.Barrier(2)
    errors = []

    def switch(person):
        try:
            barrier.wait()
            loaded.set_hyperlora_identity(person)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    for _ in range(100):
        threads = [threading.Thread(target=switch, args=(p,)) for p in people.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        live = _live(loaded)
        winner = [name for name, weights in expected.items() if _same(live, weights)]
        assert len(winner) == 1, "the live weights mix two identities"
        assert loaded.hyperlora_identity is people[winner[0]]
    assert not errors


# ---------------------------------------------------------------------------------------------- diffusers' lifecycle
def _fresh_output(predictor, identity):
    from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline

    fresh = tiny_sdxl_pipeline()
    fresh.load_hyperlora(predictor)
    fresh.set_hyperlora_identity(identity)
    return unet_output(fresh.unet)


@pytest.mark.parametrize(
    "remove",
    [
        lambda p: p.unload_lora_weights(),
        lambda p: p.unet.unload_lora(),
        lambda p: p.delete_adapters("id"),
        lambda p: p.delete_adapters("base"),
        lambda p: p.delete_adapters(["id", "base"]),
    ],
    ids=["unload_lora_weights", "unet.unload_lora", "delete-id", "delete-base", "delete-both"],
)
def test_diffusers_removals_reattach_on_the_next_switch(loaded, predictor, remove, caplog):
    remove(loaded)
    assert loaded.hyperlora_identity is None  # nothing HyperLoRA wrote is live any more
    person = _identity(predictor, 21)
    loaded.set_hyperlora_identity(person)
    assert loaded.hyperlora_identity is person
    torch.testing.assert_close(unet_output(loaded.unet), _fresh_output(predictor, person), rtol=1e-5, atol=1e-6)
    loaded.unload_hyperlora()  # and unloading afterwards still works
    loaded.unload_hyperlora()


def test_fuse_then_diffusers_unfuse_and_pipe_to(loaded, predictor):
    person = _identity(predictor, 22)
    loaded.fuse_lora()
    loaded.set_hyperlora_identity(person)
    fused = unet_output(loaded.unet)
    loaded.unfuse_lora()
    torch.testing.assert_close(unet_output(loaded.unet), fused, rtol=1e-4, atol=1e-5)
    loaded.to(torch.bfloat16)
    loaded.set_hyperlora_identity(person)  # the predictor follows the pipeline's dtype
    assert loaded.hyperlora.predictor.dtype == torch.bfloat16


def test_offload_bank_keeps_the_bank_in_cpu_memory(pipe, predictor, monkeypatch):
    """On a CPU-only machine the execution device is faked as `meta`: the bank must stay in CPU memory while
    the rest of the predictor follows the execution device (without the flag the bank would move too)."""
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("meta")))
    pipe.load_hyperlora(predictor, offload_bank=True)
    pipe.hyperlora.prepare_predictor()
    assert all(p.device.type == "cpu" for p in predictor.id_bank.parameters())
    assert predictor.resampler.latents.device.type == "meta"
    other = tiny_hyperlora_predictor(seed=2)
    pipe.load_hyperlora(other)  # without the flag the whole predictor moves
    pipe.hyperlora.prepare_predictor()
    assert all(p.device.type == "meta" for p in other.id_bank.parameters())


def test_model_cpu_offload_sends_the_predictor_back(loaded, predictor, monkeypatch):
    """Under CPU offload (accelerate's hook on the UNet) the predictor computes on the execution device and rests
    on the CPU afterwards. CPU-only machine: the moves are recorded instead of run."""
    moves = []
    monkeypatch.setattr(type(loaded), "_execution_device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(predictor, "to", lambda *args, **kwargs: moves.append(kwargs.get("device", args[:1])))
    monkeypatch.setattr(loaded.unet, "_hf_hook", object(), raising=False)  # what enable_model_cpu_offload leaves
    loaded.hyperlora.predict(*random_features())
    assert moves == [torch.device("meta"), ("cpu",)]
    moves.clear()
    loaded.set_hyperlora_identity(_identity(predictor, 5))
    assert moves[-1] == ("cpu",)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_switches_under_diffusers_cpu_offload_write_real_weights(pipe, predictor, mode):
    """`enable_*_cpu_offload(device="cpu")`: under sequential offload the live parameters are `meta` placeholders;
    a switch must still reach the weights the UNet computes with (not a silent no-op)."""
    person = _identity(predictor, 31)
    pipe.load_hyperlora(predictor)
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cpu")
    pipe.set_hyperlora_identity(_identity(predictor, 30))
    pipe.set_hyperlora_identity(person)
    assert pipe.hyperlora_identity is person
    # What the hooks hold is what the UNet computes with: take them off (accelerate puts the held weights back)
    # and run the UNet (a forward under sequential offload itself fails on CPU-only torch 2.13 + accelerate,
    # with or without HyperLoRA).
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(pipe.unet, recurse=True)
    offloaded = unet_output(pipe.unet)
    from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline

    plain = tiny_sdxl_pipeline()
    plain.load_hyperlora(predictor)
    plain.set_hyperlora_identity(person)
    torch.testing.assert_close(offloaded, unet_output(plain.unet), rtol=1e-5, atol=1e-6)


def test_the_finiteness_scan_is_exact():
    from diffusers_hyperlora.utils.checks import first_non_finite, is_finite

    assert is_finite(torch.tensor([3e38, 3e38]))  # the float32 sum overflows; the values are finite
    assert not is_finite(torch.tensor([1.0, float("inf"), float("-inf")]))  # inf - inf: NaN, still caught
    assert is_finite(torch.ones(3, dtype=torch.float16) * 60000)  # 16-bit values sum in float32
    half = torch.zeros(4, dtype=torch.bfloat16)
    half[2] = NAN
    assert first_non_finite([("a", torch.ones(2)), ("b", half)]) == ("b", 1)


def test_controller_surface_and_its_errors(pipe, predictor):
    controller = pipe.hyperlora
    assert repr(controller) == "HyperLoRAController(not loaded)" and controller.sliders == {}
    assert controller.adapter_names() == [] and controller.feature_extractor is None
    pipe.load_hyperlora(predictor)
    person = _identity(predictor, 41)
    controller.set_identity(person)
    assert controller.source is None and controller.device == predictor.device and controller.dtype == torch.float32
    assert "identity=set" in repr(controller)
    weights = controller.lora_weights(person)
    torch.testing.assert_close(weights[0][0], predictor.lora_weights(person)[0][0])
    with pytest.raises(InvalidArgumentError, match="`neutral` is missing"):
        pipe.add_hyperlora_slider(None, person)
    controller.add_slider(person, _identity(predictor, 42), adapter_name="age")
    assert list(controller.sliders) == ["age"] and "age" in controller.adapter_names()
    pipe.load_hyperlora(predictor, feature_extractor=lambda images, **kwargs: None)
    with pytest.raises(InvalidArgumentTypeError, match="cannot show its inputs"):
        pipe.preview_hyperlora_inputs(["me.jpg"])


def test_a_pipeline_without_a_denoiser_is_a_clear_error():
    from diffusers_hyperlora.pipeline.controller import HyperLoRAController, LoadOptions

    with pytest.raises(InvalidArgumentTypeError, match="has no denoiser"):
        HyperLoRAController(object()).load(tiny_hyperlora_predictor(), LoadOptions())


def test_offload_bank_keeps_the_bank_in_the_pipelines_dtype(pipe, predictor):
    pipe.unet.to(torch.bfloat16)
    pipe.load_hyperlora(predictor, offload_bank=True)
    pipe.set_hyperlora_identity(_identity(predictor, 43))
    assert {p.dtype for p in predictor.id_bank.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" and not p.is_pinned() for p in predictor.id_bank.parameters())


def test_a_predictor_without_weights_is_refused_at_load(pipe):
    from diffusers_hyperlora import CheckpointFormatError, HyperLoRAPredictor
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config

    empty = HyperLoRAPredictor(tiny_hyperlora_config(), device="meta")
    with pytest.raises(CheckpointFormatError, match="meta device and never loaded"):
        pipe.load_hyperlora(empty)
    assert not pipe.hyperlora.is_loaded


# ---------------------------------------------------------------------------------------------- unsupported pipelines
@pytest.mark.parametrize("named", [False, True], ids=["found", "named"])
def test_a_transformer_denoiser_is_refused_at_load(predictor, named):
    """A transformer HyperLoRA has no targets for (not SD3's or FLUX's) is refused, not half-run."""
    from diffusers_hyperlora import UnsupportedPipelineError, load_hyperlora

    class TransformerPipeline:
        hyperlora_denoiser_name = "transformer" if named else None

        def __init__(self):
            self.transformer = torch.nn.Linear(4, 4)

    pipe = TransformerPipeline()
    match = "denoises with a Linear; HyperLoRA supports the UNet pipelines and the transformers SD3Transformer2DModel"
    with pytest.raises(UnsupportedPipelineError, match=match) as error:
        load_hyperlora(pipe, predictor)
    assert isinstance(error.value, ValueError) and error.value.argument == "pipe"
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())


def test_group_offloading_is_refused_before_anything_changes(pipe, predictor):
    from diffusers_hyperlora import UnsupportedPipelineError

    offloaded = tiny_sdxl_pipeline()
    if not enable_group_offload(offloaded.unet):
        # This diffusers cannot enable group offloading here (conftest.GROUP_OFFLOAD_NEEDS_ACCELERATOR): there is
        # nothing to refuse, and the failed attempt must not stop HyperLoRA.
        person = _identity(predictor, 50)
        offloaded.load_hyperlora(predictor)
        offloaded.set_hyperlora_identity(person)
        assert offloaded.hyperlora.is_loaded and offloaded.hyperlora_identity is person
        assert any(weight.abs().max() > 0 for weight in _live(offloaded))
        return
    with pytest.raises(UnsupportedPipelineError, match="enable_group_offload"):
        offloaded.load_hyperlora(predictor)
    assert not offloaded.hyperlora.is_loaded
    # Enabled after the load: the next write is refused and changes nothing.
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(_identity(predictor, 50))
    snapshot = _snapshot(pipe)
    assert enable_group_offload(pipe.unet)
    for call in (
        lambda: pipe.set_hyperlora_identity(_identity(predictor, 51)),
        lambda: pipe.set_hyperlora_identities([_identity(predictor, 51), _identity(predictor, 52)]),
        lambda: pipe.add_hyperlora_slider(_identity(predictor, 51), _identity(predictor, 52)),
    ):
        with pytest.raises(UnsupportedPipelineError, match="group offloading"):
            call()
        assert _unchanged(pipe, snapshot) and pipe.hyperlora.sliders == {} and pipe.hyperlora.identities is None


def test_extractor_options_for_saved_identities_only_are_refused(loaded, predictor, tmp_path):
    """`face_index=` & co. apply to photos; given only saved identities they were silently dropped."""
    person = _identity(predictor, 53)
    person.save(tmp_path / "person.safetensors")
    snapshot = _snapshot(loaded)
    file = str(tmp_path / "person.safetensors")
    calls = [
        lambda: loaded.set_hyperlora_identity(person, face_index=1),
        lambda: loaded.set_hyperlora_identity([file, person], face_index=1),
        lambda: loaded.predict_hyperlora_identity(file, face_index=1),
        lambda: loaded.set_hyperlora_identities([person, file], face_index=1),
        lambda: loaded.add_hyperlora_slider(person, file, face_index=1),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="face_index= .*only photos go through") as error:
            call()
        assert error.value.argument == "face_index"
        assert _unchanged(loaded, snapshot) and loaded.hyperlora.sliders == {}


def test_extractor_options_reach_the_photos_among_identities(pipe, predictor):
    from test_core_pipeline import _RecordingExtractor

    extractor = _RecordingExtractor()
    pipe.load_hyperlora(predictor, feature_extractor=extractor)
    person = _identity(predictor, 54)
    pipe.set_hyperlora_identities([person, ["a.jpg", "b.jpg"]], face_index=1)
    assert [call[4] for call in extractor.calls] == [{"face_index": 1}]
    pipe.set_hyperlora_identity(["a.jpg", person], face_index=2)
    assert extractor.calls[-1][0] == ["a.jpg"] and extractor.calls[-1][4] == {"face_index": 2}
    pipe.add_hyperlora_slider(["a.jpg"], person, adapter_name="age", face_index=3)  # options for the photo side
    assert extractor.calls[-1][4] == {"face_index": 3} and list(pipe.hyperlora.sliders) == ["age"]
