"""Training under faults: every guard of `diffusers_hyperlora.training` (issue 19), each with a case that fails when
the guard is removed. A failed call changes nothing: the predictor's weights, an earlier run's files, the temp dir."""

from __future__ import annotations

import ast
import contextlib
import json
import pickle
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_training import _snapshot, one_thread  # noqa: F401  (one_thread: the single-thread fixture)

from diffusers_hyperlora import errors
from diffusers_hyperlora.errors import (
    HyperLoRAError,
    HyperLoRAWriteError,
    NonFiniteValueError,
    TrainingConfigError,
    TrainingDataError,
)
from diffusers_hyperlora.identities.features import HyperLoRAFeatures
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline
from diffusers_hyperlora.training import (
    STAGE_DEFAULTS,
    HyperLoRATrainingDataset,
    StageConfig,
    TrainingConfig,
    TrainingRecord,
    cache_features,
    default_resolution,
    fresh_predictor_config,
    load_feature_cache,
    read_metadata,
    tiny_training_dataset,
    train_curriculum,
    train_stage,
)

TRAINING_SOURCE = Path(__file__).resolve().parents[1] / "src" / "diffusers_hyperlora" / "training"


def _assert_unchanged(predictor: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = predictor.state_dict()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"


def _stage(output_dir: Path, stage: str = "id_clip", **overrides) -> StageConfig:
    settings = dict(steps=1, batch_size=1, learning_rate=1e-2, show_progress=False, output_dir=str(output_dir))
    return StageConfig(stage, **(settings | overrides))


def _data(**overrides) -> HyperLoRATrainingDataset:
    return tiny_training_dataset(**({"num_people": 1, "images_per_person": 1, "with_base": False} | overrides))


@contextlib.contextmanager
def _disk_limit(size: int):
    """Files of this process cannot grow beyond `size` bytes (EFBIG, as on a full disk) inside the block."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


# ---------------------------------------------------------------------------------------------- leaks
def test_a_tiny_pipeline_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    pipe = tiny_sdxl_pipeline()
    assert list(temp.iterdir()) == []
    assert pipe.tokenizer("a photo").input_ids[:2] == [512, 353]  # the vocabulary lives on in memory


# ---------------------------------------------------------------------------------------------- every error ours
def _returns_our_error(function: ast.FunctionDef) -> bool:
    annotation = ast.unparse(function.returns) if function.returns is not None else ""
    kind = getattr(errors, annotation, None)
    return isinstance(kind, type) and issubclass(kind, HyperLoRAError)


@pytest.mark.parametrize("path", sorted(TRAINING_SOURCE.glob("*.py")), ids=lambda p: p.name)
def test_every_raise_in_training_is_a_hyperlora_error(path):
    tree = ast.parse(path.read_text())
    helpers = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and _returns_our_error(node)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        name = call.id if isinstance(call, ast.Name) else None
        kind = getattr(errors, name, None) if name else None
        ours = isinstance(kind, type) and issubclass(kind, HyperLoRAError)
        if not (ours or name in helpers or (name and name.islower() and not name.startswith("_"))):
            bad.append(f"line {node.lineno}: raise {ast.unparse(node.exc)[:60]}")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", True),
        ("steps", 2.5),
        ("batch_size", -1),
        ("learning_rate", -1.0),
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("weight_decay", -0.1),
        ("adam_beta1", 1.0),
        ("adam_beta2", float("nan")),
        ("max_grad_norm", -1.0),
        ("caption_dropout", 2.0),
        ("caption_dropout", float("nan")),
        ("id_weight", float("inf")),
        ("seed", 2**64),
        ("seed", -1),
        ("lr_scheduler", "no-such-schedule"),
        ("show_progress", "yes"),
        ("cache_latents", 1),
        ("output_dir", ""),
    ],
)
def test_stage_config_refuses_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(TrainingConfigError, match=f"StageConfig.{field}") as caught:
        StageConfig("id_clip", **{field: value})
    assert caught.value.argument == field


def test_configs_are_checked_again_before_training_and_by_validate(tmp_path):
    config = StageConfig("id_clip", output_dir=str(tmp_path))
    config.steps = -3  # dataclass fields can be changed after construction
    with pytest.raises(TrainingConfigError, match="StageConfig.steps") as caught:
        TrainingConfig(str(tmp_path), stages=[config])
    assert caught.value.argument == "steps"
    whole = TrainingConfig(str(tmp_path), stages=[StageConfig("id_clip")])
    whole.stages[0].learning_rate = float("nan")
    with pytest.raises(TrainingConfigError, match="learning_rate"):
        whole.validate()
    with pytest.raises(TrainingConfigError, match="Unknown StageConfig field"):
        TrainingConfig(str(tmp_path), stages=[{"stage": "id_clip", "stpes": 3}])
    assert STAGE_DEFAULTS["steps"] == StageConfig("base").steps and STAGE_DEFAULTS["lr_scheduler"]


def test_the_schedulers_the_config_accepts_are_diffusers_schedulers():
    from diffusers.optimization import SchedulerType

    from diffusers_hyperlora.training.stages import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


# ---------------------------------------------------------------------------------------------- data
def _write_dataset(root: Path, files=("a.png",), lines=None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for file in files:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / file)
    rows = lines or [json.dumps({"file": f, "person": "a", "caption": "x"}) for f in files]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE"])
def test_metadata_may_not_name_files_outside_the_dataset_folder(tmp_path, escape):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)  # it exists: only the folder rule refuses it
    file = str(outside) if escape == "ABSOLUTE" else escape
    _write_dataset(tmp_path / "data", lines=[json.dumps({"file": file, "person": "a", "caption": "x"})])
    with pytest.raises(TrainingDataError, match="outside the dataset folder") as caught:
        read_metadata(tmp_path / "data")
    assert caught.value.argument == "file" and "line 1" in str(caught.value)


def test_metadata_that_is_not_utf8_names_the_file_and_line(tmp_path):
    _write_dataset(tmp_path)
    good = json.dumps({"file": "a.png", "person": "a", "caption": "x"}).encode()
    (tmp_path / "metadata.jsonl").write_bytes(good + b"\n" + good.replace(b'"x"', b'"caf\xe9"') + b"\n")
    with pytest.raises(TrainingDataError, match=r"metadata\.jsonl, line 2: not valid UTF-8"):
        read_metadata(tmp_path)


class _Features:
    """A feature extractor stand-in: features from the image's mean colour (48-wide CLIP, 5 tokens)."""

    def __init__(self, tokens: int = 5, value: float | None = None) -> None:
        self.tokens, self.value = tokens, value

    def __call__(self, images, *, device, dtype, with_base):
        with Image.open(images[0]) as image:
            mean = torch.tensor(image.convert("RGB").getpixel((0, 0)), dtype=torch.float32).mean() / 255
        fill = mean if self.value is None else self.value
        clip = torch.full((1, self.tokens, 48), float(fill))
        embeds = torch.nn.functional.normalize(torch.ones(1, 512), dim=-1)
        return HyperLoRAFeatures(embeds, clip, 1 - clip if with_base else None)


def test_wrong_types_in_the_data_api_are_library_errors(tmp_path):
    _write_dataset(tmp_path)
    with pytest.raises(errors.InvalidArgumentTypeError, match="extractor returned a NoneType for a.png") as caught:
        cache_features(tmp_path, lambda images, **options: None, progress=False)  # was AttributeError: id_embeds
    assert caught.value.argument == "extractor"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "metadata.jsonl"]
    with pytest.raises(errors.InvalidArgumentTypeError, match=r"records\[1\] is a int, not a TrainingRecord"):
        HyperLoRATrainingDataset([_data().records[0], 1])  # was AttributeError: 'int' object has no attribute
    for call, argument in ((read_metadata, "root"), (load_feature_cache, "path"), (cache_features, "root")):
        with pytest.raises(errors.InvalidArgumentTypeError, match=f"{argument} must be a path") as caught:
            call(None, *([_Features()] if call is cache_features else []))  # was TypeError from os.fspath
        assert caught.value.argument == argument


def test_a_truncated_feature_cache_is_refused_naming_the_file(tmp_path):
    _write_dataset(tmp_path)
    path = cache_features(tmp_path, _Features(), progress=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TrainingDataError, match="features.safetensors.*damaged or incomplete"):
        HyperLoRATrainingDataset.from_folder(tmp_path)


def test_non_finite_cached_features_are_refused(tmp_path):
    _write_dataset(tmp_path)
    cache_features(tmp_path, _Features(value=float("nan")), progress=False)
    with pytest.raises(TrainingDataError, match="NaN or infinite"):
        load_feature_cache(tmp_path / "features.safetensors")


def test_a_cache_with_two_token_counts_is_refused(tmp_path):
    _write_dataset(tmp_path, files=("a.png", "b.png"))
    path = cache_features(tmp_path, _Features(), progress=False)
    tensors = {key: value for key, value in load_feature_cache(path)["a.png"].items()}
    cache = {f"a.png::{k}": v for k, v in tensors.items()}
    cache |= {f"b.png::{k}": torch.cat([v, v]) if v.ndim == 2 else v.clone() for k, v in tensors.items()}
    save_file(cache, str(path), metadata={"format": "diffusers-hyperlora-training-features"})
    with pytest.raises(TrainingDataError, match="differ in shape"):
        load_feature_cache(path)


def test_non_finite_features_in_memory_are_refused():
    records = _data().records
    records[0].clip_hidden_states = records[0].clip_hidden_states.clone()
    records[0].clip_hidden_states[0, 0] = float("nan")
    with pytest.raises(TrainingDataError, match="NaN or infinite") as caught:
        HyperLoRATrainingDataset(records, resolution=32)
    assert caught.value.argument == "clip_hidden_states"


@pytest.mark.parametrize("resolution", [36, 0, -8, 32.0, True, "64"])
def test_a_resolution_the_vae_cannot_encode_is_refused(resolution):
    """Training sizes are positive multiple of 8 (`check_resolution`, which `train --resolution` uses too)."""
    with pytest.raises(TrainingDataError, match="positive multiple of 8") as caught:
        HyperLoRATrainingDataset(_data().records, resolution=resolution)
    assert caught.value.argument == "resolution"
    assert isinstance(caught.value, ValueError)


def test_features_of_another_width_are_refused_before_training(pipe, tmp_path):
    predictor = tiny_hyperlora_predictor(pipe.unet)  # reads 48-wide CLIP features
    before = _snapshot(predictor)
    with pytest.raises(TrainingDataError, match="32 wide.*reads 48-wide"):
        train_stage(pipe, predictor, _data(image_embed_dim=32), _stage(tmp_path / "run"))
    _assert_unchanged(predictor, before)
    assert not (tmp_path / "run").exists()


def test_an_unreadable_image_stops_the_run_before_it_starts(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    record = _data().records[0]
    dataset = HyperLoRATrainingDataset(
        [TrainingRecord(bad, "x", "a", clip_hidden_states=record.clip_hidden_states)], resolution=32
    )
    predictor = tiny_hyperlora_predictor(pipe.unet)
    before = _snapshot(predictor)
    with pytest.raises(TrainingDataError, match="bad.png is not a readable image"):
        train_stage(pipe, predictor, dataset, _stage(tmp_path / "run", cache_latents=True))
    _assert_unchanged(predictor, before)
    with pytest.raises(TrainingDataError, match="bad.png could not be read as an image"):
        dataset.item(0)  # an image damaged after the check: still our error, naming the file


def test_a_predictor_or_dataset_of_another_type_is_refused(pipe, tmp_path):
    with pytest.raises(errors.InvalidArgumentTypeError, match="predictor must be a HyperLoRAPredictor, got str"):
        train_stage(pipe, "not a predictor", _data(), _stage(tmp_path / "run"))  # was AttributeError: .config
    predictor = tiny_hyperlora_predictor(pipe.unet)
    before = _snapshot(predictor)
    with pytest.raises(errors.InvalidArgumentTypeError, match="dataset must be a HyperLoRATrainingDataset"):
        train_stage(pipe, predictor, 3, _stage(tmp_path / "run"))  # was TypeError: object of type 'int' has no len()
    with pytest.raises(TrainingDataError, match="dataset item 0 is a int, not a dict with 'caption'") as caught:
        train_stage(pipe, predictor, [1, 2], _stage(tmp_path / "run"))  # was TypeError: not subscriptable
    assert caught.value.argument == "dataset"
    _assert_unchanged(predictor, before)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- output folder
def test_an_unwritable_output_dir_is_refused_before_zero_init_touches_weights(pipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    predictor = tiny_hyperlora_predictor(pipe.unet)
    before = _snapshot(predictor)
    config = _stage(blocker / "run", "id_full", zero_init_id_attention=True)
    with pytest.raises(HyperLoRAWriteError, match="output folder"):
        train_stage(pipe, predictor, _data(), config)
    _assert_unchanged(predictor, before)


def test_an_output_dir_with_a_nul_byte_is_a_write_error(pipe, tmp_path):
    predictor = tiny_hyperlora_predictor(pipe.unet)
    with pytest.raises(HyperLoRAWriteError, match="output folder"):  # was ValueError: embedded null byte
        train_stage(pipe, predictor, _data(), _stage(f"{tmp_path}/a\x00b"))


@pytest.mark.parametrize("fails_at", ["model", "optimizer"])
def test_a_full_disk_during_save_every_is_a_write_error_and_leaves_no_temporary_folder(pipe, tmp_path, fails_at):
    """safetensors reports the full disk for the weights (`SafetensorError`), `torch.save` for the optimizer state
    (`RuntimeError: [enforce fail at inline_container.cc]`): both are a `HyperLoRAWriteError` naming the checkpoint."""
    predictor = tiny_hyperlora_predictor(pipe.unet)
    before = _snapshot(predictor)
    weights = sum(value.numel() * value.element_size() for value in predictor.state_dict().values())
    limit = 20_000 if fails_at == "model" else weights + 100_000  # the weights fit, the optimizer's 2 moments not
    with _disk_limit(limit), pytest.raises(HyperLoRAWriteError, match="checkpoint.*step-000001") as caught:
        train_stage(pipe, predictor, _data(), _stage(tmp_path, steps=2, save_every=1))
    assert caught.value.filename.endswith("step-000001")
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no .step-000001.<pid>.tmp left behind
    _assert_unchanged(predictor, before)


def test_cache_features_on_a_full_disk_names_the_file_and_keeps_the_old_cache(tmp_path):
    _write_dataset(tmp_path)
    path = cache_features(tmp_path, _Features(), progress=False)
    old = path.read_bytes()
    with _disk_limit(len(old) // 2), pytest.raises(HyperLoRAWriteError, match="features.safetensors") as caught:
        cache_features(tmp_path, _Features(value=0.5), progress=False)
    assert caught.value.filename == str(path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "features.safetensors", "metadata.jsonl"]


# ---------------------------------------------------------------------------------------------- non-finite loss
def test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(pipe, tmp_path):
    predictor = tiny_hyperlora_predictor(pipe.unet)
    before = _snapshot(predictor)
    logs = []
    config = _stage(tmp_path, steps=3, save_every=1, learning_rate=1e30)  # step 1's update blows the weights up
    with pytest.raises(NonFiniteValueError, match=r"step 2: the loss is nan.*last good checkpoint.*step-000001"):
        train_stage(pipe, predictor, _data(), config, callback=logs.append)
    assert [log.step for log in logs] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert not (tmp_path / "predictor").exists()
    _assert_unchanged(predictor, before)
    saved = torch.load(tmp_path / "checkpoints" / "step-000001" / "optimizer.bin", weights_only=True)
    assert all(torch.isfinite(s["exp_avg"]).all() for s in saved["state"].values())


def test_a_failed_rerun_leaves_the_earlier_runs_files_as_they_were(pipe, tmp_path):
    stages = [_stage(tmp_path / "id_clip", steps=1)]
    train_curriculum(pipe, tiny_hyperlora_predictor(pipe.unet), _data(), TrainingConfig(str(tmp_path), stages=stages))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert tmp_path / "training_config.json" in files and tmp_path / "id_clip" / "stage_config.json" in files
    rerun = TrainingConfig(str(tmp_path), stages=[_stage(tmp_path / "id_clip", steps=3, learning_rate=1e30)])
    with pytest.raises(NonFiniteValueError):
        train_curriculum(pipe, tiny_hyperlora_predictor(pipe.unet), _data(), rerun)
    for path, content in files.items():
        assert path.read_bytes() == content, path


# ---------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real `id_clip` checkpoint of the tiny predictor (1 step)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    pipe = tiny_sdxl_pipeline()
    train_stage(pipe, tiny_hyperlora_predictor(pipe.unet), _data(), _stage(folder, save_every=1))
    return folder / "checkpoints" / "step-000001"


def _copy(checkpoint: Path, tmp_path: Path, name: str = "step-000001") -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "checkpoints" / name))


class _Exploit:
    """A pickle that runs code when unpickled: it creates `CODE_RAN` next to the checkpoint folder."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


CODE_RAN = "unpickled-code-ran"


def _break_optimizer(folder: Path) -> None:
    (folder / "optimizer.bin").write_bytes(pickle.dumps(_Exploit(folder.parent / CODE_RAN), protocol=2))


def _break_model(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])


def _nan_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))


def _rename(folder: Path) -> Path:
    return Path(shutil.move(folder, folder.with_name("my-checkpoint")))


def _mark_stage(stage: str):
    def edit(folder: Path) -> None:
        marker = json.loads((folder / "hyperlora_checkpoint.json").read_text())
        (folder / "hyperlora_checkpoint.json").write_text(json.dumps(marker | {"stage": stage}))

    return edit


@pytest.mark.parametrize(
    ("damage", "stage", "overrides", "message"),
    [
        (_break_model, "id_clip", {}, "model.safetensors is damaged or incomplete"),
        (_break_optimizer, "id_clip", {}, "optimizer.bin is damaged or not a train_stage state"),
        (lambda f: (f / "scheduler.bin").unlink(), "id_clip", {}, "scheduler.bin is missing"),
        (lambda f: (f / "hyperlora_checkpoint.json").unlink(), "id_clip", {}, "not written by train_stage"),
        (_rename, "id_clip", {}, "not a checkpoint folder written by train_stage"),
        (None, "id_full", {}, "checkpoint of stage 'id_clip', not of stage 'id_full'"),
        (_mark_stage("id_full"), "id_full", {}, "optimizer.bin is for .* stage 'id_full' of this predictor trains"),
        (None, "id_clip", {"resampler_depth": 1}, "another architecture"),
        (_nan_weights, "id_clip", {}, "model.safetensors holds NaN or infinite weights"),
    ],
    ids=[
        "truncated-model",
        "pickle-optimizer",
        "no-scheduler",
        "no-marker",
        "not-step-N",
        "other-stage",
        "other-stage-optimizer",
        "other-architecture",
        "nan-weights",  # resumed, then stopped at "the loss is nan" calling this checkpoint the last good one
    ],
)
def test_a_checkpoint_that_cannot_be_resumed_changes_nothing(
    pipe, tmp_path, checkpoint, damage, stage, overrides, message
):
    folder = _copy(checkpoint, tmp_path)
    if damage is not None:
        folder = damage(folder) or folder
    predictor = tiny_hyperlora_predictor(pipe.unet, seed=3, **overrides)
    before = _snapshot(predictor)
    config = _stage(tmp_path, stage, steps=2, resume_from_checkpoint=str(folder))
    with pytest.raises(TrainingConfigError, match=message) as caught:
        train_stage(pipe, predictor, _data(), config)
    assert caught.value.argument == "resume_from_checkpoint"
    _assert_unchanged(predictor, before)
    assert not (tmp_path / "checkpoints" / CODE_RAN).exists()
    assert not (tmp_path / "predictor").exists()


def test_a_resume_that_fails_while_loading_puts_the_predictor_back(pipe, tmp_path, checkpoint, monkeypatch):
    """`accelerator.load_state` loads the weights first: a failure after that (here the scheduler) is undone."""
    folder = _copy(checkpoint, tmp_path)
    predictor = tiny_hyperlora_predictor(pipe.unet, seed=3)
    before = _snapshot(predictor)
    from diffusers.optimization import LambdaLR

    def fail(self, state):
        raise KeyError("lr_lambdas")

    monkeypatch.setattr(LambdaLR, "load_state_dict", fail)
    with pytest.raises(TrainingConfigError, match="loading it failed"):
        train_stage(pipe, predictor, _data(), _stage(tmp_path, steps=2, resume_from_checkpoint=str(folder)))
    _assert_unchanged(predictor, before)


# ---------------------------------------------------------------------------------------------- sizes
def test_a_fresh_predictor_and_the_resolution_follow_the_base_model(pipe, tmp_path):
    config = fresh_predictor_config(pipe.unet, image_embed_dim=48)
    assert (config.num_basis, config.resampler_dim, config.resampler_depth, config.num_id_tokens) == (8, 32, 2, 4)
    assert default_resolution(pipe) == 64
    dataset = _data()
    dataset.resolution = None  # the base model's size, filled in by train_stage
    from diffusers_hyperlora import HyperLoRAPredictor

    train_stage(pipe, HyperLoRAPredictor(config), dataset, _stage(tmp_path))
    assert dataset.resolution == 64
    failing = _data()
    failing.resolution = None
    with pytest.raises(NonFiniteValueError):
        train_stage(pipe, HyperLoRAPredictor(config), failing, _stage(tmp_path, steps=3, learning_rate=1e30))
    assert failing.resolution is None  # put back with the rest


def test_the_tiny_training_example_writes_where_git_does_not_look():
    """`python examples/train_tiny.py` without `--output-dir` must not leave untracked files in the repository."""
    import subprocess
    import sys

    repo = TRAINING_SOURCE.parents[2]
    example = repo / "examples" / "train_tiny.py"
    text = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=300)
    default = text.stdout.split("(default: ", 1)[1].split(",", 1)[0]
    probe = subprocess.run(["git", "check-ignore", "-q", f"{default}/id_clip/predictor/model.safetensors"], cwd=repo)
    assert probe.returncode == 0, f"{default} is not ignored by git"
