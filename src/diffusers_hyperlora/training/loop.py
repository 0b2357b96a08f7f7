"""`train_stage` and `train_curriculum`: a plain accelerate training loop around `HyperLoRATrainingModule`."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..adapters.peft_adapters import HyperLoRAAdapters, set_active_adapters
from ..errors import (
    HyperLoRAError,
    HyperLoRAWriteError,
    InvalidArgumentTypeError,
    NonFiniteValueError,
    TrainingConfigError,
    TrainingDataError,
)
from ..model.predictor import HyperLoRAPredictor
from ..utils.atomic_files import atomic_folder, atomic_path
from ..utils.checks import is_finite
from ..utils.compat import (
    ACCELERATE_MODEL_FILE,
    ACCELERATE_OPTIMIZER_FILE,
    ACCELERATE_SCHEDULER_FILE,
    adapter_configs,
    load_accelerate_state,
    quiet_peft_adapter_warnings,
)
from .conditioning import FrozenEncoders
from .data import collate_examples
from .families import family_of, pipeline_denoiser
from .losses import identity_groups, lora_denoising_loss
from .module import HyperLoRATrainingModule
from .order import EpochSampler, TrainingView, sample_generator
from .sizes import default_resolution
from .stages import (
    STAGES,
    StageConfig,
    TrainingConfig,
    check_stage,
    freeze_for_stage,
    trainable_parameter_names,
    zero_id_attention,
)

logger = logging.get_logger(__name__)

ID_ADAPTER = "hyperlora_train_id"
BASE_ADAPTER = "hyperlora_train_base"
PREDICTOR_FOLDER = "predictor"
CHECKPOINTS_FOLDER = "checkpoints"
LOSSES_FILE = "losses.jsonl"
STAGE_CONFIG_FILE = "stage_config.json"
TRAINING_CONFIG_FILE = "training_config.json"
CHECKPOINT_MARKER = "hyperlora_checkpoint.json"
CHECKPOINT_FORMAT = "diffusers-hyperlora-training-checkpoint"
CHECKPOINT_FILES = (ACCELERATE_MODEL_FILE, ACCELERATE_OPTIMIZER_FILE, ACCELERATE_SCHEDULER_FILE)


@dataclass
class StepLog:
    """What the loop reports after each optimizer step (to `callback` and to `losses.jsonl`)."""

    stage: str
    step: int
    loss: float
    learning_rate: float


def _required_features(predictor: HyperLoRAPredictor, stage: str) -> list[str]:
    config = predictor.config
    needed = []
    if stage == "base" or config.has_base:
        needed.append("base_clip_hidden_states")
    if stage == "id_clip" or (stage == "id_full" and config.use_image_embeds):
        needed.append("clip_hidden_states")
    if stage == "id_full" and config.use_id_embeds:
        needed.append("id_embeds")
    return needed


def _check_dataset(dataset: Any, predictor: HyperLoRAPredictor, stage: str) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise InvalidArgumentTypeError(
            f"dataset must be a HyperLoRATrainingDataset or a dataset of item dicts, got {type(dataset).__name__}.",
            argument="dataset",
        )
    if len(dataset) == 0:
        raise TrainingDataError(
            "The training dataset is empty: give it at least one image (`HyperLoRATrainingDataset.from_folder`).",
            argument="dataset",
        )
    if not hasattr(dataset, "item"):  # a plain dataset: its items must be dicts (see `training.data`)
        first = dataset[0]
        if not isinstance(first, Mapping) or "caption" not in first:
            raise TrainingDataError(
                f"dataset item 0 is a {type(first).__name__}, not a dict with 'caption', 'pixel_values' and the "
                "features (see `diffusers_hyperlora.training.data`); use `HyperLoRATrainingDataset.from_folder`.",
                argument="dataset",
            )
    has = getattr(dataset, "has_features", None)
    if has is None:
        return
    missing = [kind for kind in _required_features(predictor, stage) if not has.get(kind, False)]
    if missing:
        raise TrainingDataError(
            f"Stage {stage!r} with this predictor needs {', '.join(missing)} for every image; the dataset has none. "
            "Cache them with `cache_features(root, extractor, with_base=True)`."
        )
    widths = getattr(dataset, "feature_widths", None)
    if widths is not None:
        _check_widths(widths(), predictor)
    check_images = getattr(dataset, "check_images", None)
    if check_images is not None:
        check_images()


def _check_widths(shapes: dict[str, tuple[int, ...]], predictor: HyperLoRAPredictor) -> None:
    """The features' last dimension is the width the predictor reads (CLIP: `image_embed_dim`, ArcFace: 512)."""
    config = predictor.config
    expected = {
        "id_embeds": config.id_embed_dim,
        "clip_hidden_states": config.image_embed_dim,
        "base_clip_hidden_states": config.image_embed_dim,
    }
    for kind, shape in shapes.items():
        if shape and shape[-1] != expected[kind]:
            raise TrainingDataError(
                f"The dataset's {kind} are {shape[-1]} wide, but this predictor reads {expected[kind]}-wide features "
                f"({'image_embed_dim' if kind != 'id_embeds' else 'id_embed_dim'}). Cache the features with the "
                "predictor's own CLIP encoder (`cache_features`), or build the predictor for these features "
                f"(`HyperLoRAConfig(image_embed_dim={shape[-1]}, ...)`).",
                argument=kind,
            )


def _check_pipeline(pipe: Any) -> None:
    denoiser = pipeline_denoiser(pipe)
    if denoiser is None:
        raise TrainingConfigError(
            f"{type(pipe).__name__} has no denoiser (`unet` or `transformer`): training runs on SD 1.5 / SD 2.x / "
            "SDXL, SD3 and FLUX pipelines (docs/base-models.md).",
            argument="pipe",
        )
    family_of(denoiser)  # a denoiser no family trains is refused by name
    hyperlora = getattr(pipe, "hyperlora", None)
    if hyperlora is not None and hyperlora.is_loaded:
        raise TrainingConfigError(
            "This pipeline has a HyperLoRA loaded; call `pipe.unload_hyperlora()` before training on it.",
            argument="pipe",
        )
    adapters = sorted(adapter_configs(denoiser))
    if adapters:
        raise TrainingConfigError(
            f"The {family_of(denoiser).component} already carries adapters {adapters}; fuse them "
            "(`pipe.fuse_lora()` then `pipe.unload_lora_weights()`) or delete them before training HyperLoRA on it.",
            argument="pipe",
        )


def _check_predictor_denoiser(pipe: Any, predictor: HyperLoRAPredictor) -> None:
    """The predictor targets the pipeline's kind of denoiser (a UNet checkpoint cannot train on a transformer)."""
    component = family_of(pipeline_denoiser(pipe)).component
    if predictor.config.denoiser != component:
        raise TrainingConfigError(
            f"The predictor targets a {predictor.config.denoiser}, but {type(pipe).__name__} denoises with its "
            f"{component}. Build the predictor for this pipeline: "
            f"`HyperLoRAConfig.from_denoiser(pipe.{component}, ...)`.",
            argument="predictor",
        )


def _check_writable(output_dir: Path) -> None:
    """Create the stage folder and write (then remove) a probe file in it, before anything else changes."""
    probe = output_dir / f".write-probe.{os.getpid()}.tmp"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise _write_error(output_dir, error, "the output folder") from error


def _write_error(path: Path, error: BaseException, what: str) -> HyperLoRAWriteError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return HyperLoRAWriteError(
        getattr(error, "errno", None) or errno.EIO,
        f"Could not write {what} {str(path)!r}: {reason}. The predictor and earlier runs' files were left as they "
        "were; choose a writable folder with free space (output_dir) and run again.",
        str(path),
    )


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", path.name)
    if match is None:
        raise TrainingConfigError(
            f"resume_from_checkpoint {path} is not a checkpoint folder written by train_stage: those are named "
            "step-N, under <output_dir>/checkpoints. Pass one of them, or 'latest'.",
            argument="resume_from_checkpoint",
        )
    return int(match.group(1))


def _resolve_resume(config: StageConfig, output_dir: Path) -> Path | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        found = [p for p in (output_dir / CHECKPOINTS_FOLDER).glob("step-*") if p.is_dir()]
        folders = [p for p in found if re.fullmatch(r"step-\d+", p.name)]
        if not folders:
            logger.warning(f"No checkpoint under {output_dir / CHECKPOINTS_FOLDER}; starting the stage from scratch.")
            return None
        return max(folders, key=_checkpoint_step)
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir():
        raise TrainingConfigError(f"resume_from_checkpoint {path} is not a folder.", argument="resume_from_checkpoint")
    return path


def _resume_error(folder: Path, problem: str) -> TrainingConfigError:
    return TrainingConfigError(
        f"Cannot resume from {folder}: {problem}. Nothing was changed. Resume from another checkpoint "
        "(resume_from_checkpoint), or start the stage anew without it.",
        argument="resume_from_checkpoint",
    )


def _verify_checkpoint(folder: Path, predictor: HyperLoRAPredictor, stage: str) -> None:
    """A complete checkpoint of this stage and architecture: every file present and readable, weights of the
    predictor's names and shapes, optimizer state for exactly the stage's parameters. Reads, changes nothing."""
    _checkpoint_step(folder)
    marker = _read_marker(folder)
    if marker.get("stage") != stage:
        raise _resume_error(folder, f"it is a checkpoint of stage {marker.get('stage')!r}, not of stage {stage!r}")
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            raise _resume_error(folder, f"{name} is missing (an incomplete or edited checkpoint)")
    _verify_weights(folder / ACCELERATE_MODEL_FILE, predictor)
    optimizer = _load_plain(folder / ACCELERATE_OPTIMIZER_FILE)
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise _resume_error(folder, f"{ACCELERATE_OPTIMIZER_FILE} holds no optimizer state")
    count = sum(len(g["params"]) for g in groups)
    expected = len(trainable_parameter_names(predictor, stage))
    if count != expected:
        raise _resume_error(
            folder,
            f"{ACCELERATE_OPTIMIZER_FILE} is for {count} trained tensors, stage {stage!r} of this predictor trains "
            f"{expected}",
        )
    if not isinstance(_load_plain(folder / ACCELERATE_SCHEDULER_FILE), dict):
        raise _resume_error(folder, f"{ACCELERATE_SCHEDULER_FILE} holds no learning-rate scheduler state")


def _read_marker(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT_MARKER
    if not path.is_file():
        raise _resume_error(folder, f"it has no {CHECKPOINT_MARKER}, so it was not written by train_stage")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _resume_error(folder, f"{CHECKPOINT_MARKER} is unreadable ({error})") from error
    if not isinstance(marker, dict) or marker.get("format") != CHECKPOINT_FORMAT:
        raise _resume_error(folder, f"{CHECKPOINT_MARKER} is not a train_stage checkpoint description")
    return marker


def _verify_weights(path: Path, predictor: HyperLoRAPredictor) -> None:
    from safetensors import safe_open

    expected = {f"predictor.{name}": tuple(value.shape) for name, value in predictor.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            non_finite = [key for key in handle.keys() if not is_finite(handle.get_tensor(key))]
    except Exception as error:  # safetensors' own error type: a truncated or damaged file
        raise _resume_error(path.parent, f"{path.name} is damaged or incomplete ({error})") from error
    if non_finite:
        raise _resume_error(
            path.parent,
            f"{path.name} holds NaN or infinite weights ({len(non_finite)} tensors, e.g. {non_finite[0]!r})",
        )
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise _resume_error(
            path.parent,
            f"{path.name} holds a predictor of another architecture (first difference: {differing[0]!r}); resume "
            "with the predictor (HyperLoRAConfig) the checkpoint was trained with",
        )


def _load_plain(path: Path) -> Any:
    """`torch.load` with `weights_only=True`: tensors and plain containers only, never arbitrary pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, a truncated zip, ... : not a state this loop wrote
        raise _resume_error(path.parent, f"{path.name} is damaged or not a train_stage state ({error})") from error


def _make_accelerator(config: StageConfig):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    # Optimizer steps every `gradient_accumulation_steps` micro-batches, across epoch ends too: the step count
    # then tells exactly where a resumed run continues.
    plugin = GradientAccumulationPlugin(num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False)
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_plugin=plugin)
    except ValueError as error:
        raise TrainingConfigError(
            f"accelerate could not be set up with mixed_precision={config.mixed_precision!r}: {error} "
            "(accelerate allows one mixed-precision setting per process: use the same value for every stage)."
        ) from error
    set_seed(config.seed)
    return accelerator


@contextmanager
def training_adapters(pipe: Any, predictor: HyperLoRAPredictor, config: StageConfig):
    """Register the training adapters on the denoiser, activate them for the stage, remove them afterwards."""
    _check_pipeline(pipe)
    unet = pipeline_denoiser(pipe)
    with quiet_peft_adapter_warnings():  # ID + Base are two adapters by design
        adapters = HyperLoRAAdapters.attach(
            unet, predictor.config, ID_ADAPTER, BASE_ADAPTER, id_weight=config.id_weight, base_weight=config.base_weight
        )
    try:
        if config.stage == "base":
            active = [BASE_ADAPTER]
        else:
            active = [ID_ADAPTER] + ([BASE_ADAPTER] if predictor.config.has_base else [])
        set_active_adapters(unet, active, {ID_ADAPTER: config.id_weight, BASE_ADAPTER: config.base_weight})
        unet.requires_grad_(False)  # PEFT's set_adapter marks active adapters trainable; ours are substituted
        yield {"id": ID_ADAPTER, "base": BASE_ADAPTER}
    finally:
        with quiet_peft_adapter_warnings():
            adapters.detach()


@dataclass
class _Run:
    """What the steps of one stage share."""

    config: StageConfig
    accelerator: Any
    model: Any  # the prepared HyperLoRATrainingModule
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    encoders: FrozenEncoders
    noise_scheduler: Any
    unet: Any  # the denoiser: a UNet or an SD3 / FLUX transformer
    output_dir: Path
    global_step: int = 0
    losses: list[dict[str, Any]] = field(default_factory=list)


def train_stage(
    pipe: Any,
    predictor: HyperLoRAPredictor,
    dataset: torch.utils.data.Dataset,
    config: StageConfig,
    callback: Callable[[StepLog], None] | None = None,
) -> HyperLoRAPredictor:
    """Train one stage of the curriculum and save the predictor to `config.output_dir/predictor`.

    The loop is a plain accelerate loop: the predictor's forward runs through the prepared module
    (`HyperLoRATrainingModule`, wrapped by DDP / FSDP / DeepSpeed as configured with `accelerate config`), the
    backward through `accelerator.backward`, accumulation through `accelerator.accumulate`, checkpoints through
    `accelerator.save_state` / `load_state`. Run the same script with `accelerate launch` to train on several
    processes; `config.batch_size` is the batch of each process.

    The pipeline's denoiser (UNet or transformer), VAE and text encoders are frozen (never updated); they are moved
    to the accelerator's device, and with mixed precision the denoiser and text encoders are cast to the half dtype
    (the VAE stays as it is: SDXL's VAE overflows in float16). Temporary PEFT adapters carry the predicted LoRA
    during the stage and are removed at the end, so the denoiser computes exactly what it did before. UNets train
    on DDPM noise, the SD3 and FLUX transformers on flow matching (`families`).

    Args:
        pipe: an SD 1.5 / SD 2.x / SDXL, SD3 or FLUX pipeline (`unet` or `transformer`, `vae`, `encode_prompt`).
        predictor: the hypernetwork, trained in place (only the stage's parameters change).
        dataset: items as described in `training.data` (e.g. `HyperLoRATrainingDataset`).
        config: the stage (see `StageConfig`).
        callback: called with a `StepLog` after every optimizer step (on every process).

    Returns:
        The trained predictor (the same object), in eval mode with gradients off.

    The stage is transactional: the config, the data (every image decodable, features finite, of the predictor's
    widths), the pipeline, the output folder (writable) and the checkpoint to resume (complete, of this stage and
    architecture) are checked before anything changes. If the stage fails (an error, a non-finite loss, a failed
    write, Ctrl-C), the predictor is put back as it was, the checkpoints written so far stay, and the stage folder's
    `predictor/`, `losses.jsonl` and `stage_config.json` (written only at the end) keep an earlier run's files.

    Raises:
        TrainingConfigError: a config field, the stage, the pipeline or the checkpoint to resume is not usable.
        TrainingDataError: the dataset is empty, misses features, has features of other widths or unreadable images.
        HyperLoRAWriteError: the output folder, a checkpoint or the predictor could not be written.
        NonFiniteValueError: the loss became NaN or infinite (learning rate too high, fp16 overflow).

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline, tiny_hyperlora_predictor
        >>> from diffusers_hyperlora.training import StageConfig, tiny_training_dataset, train_stage
        >>> pipe = tiny_sdxl_pipeline()
        >>> predictor = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
        >>> config = StageConfig("base", steps=2, output_dir="outputs/tiny/base", show_progress=False)
        >>> predictor = train_stage(pipe, predictor, tiny_training_dataset(), config)  # doctest: +SKIP
    """
    output_dir, resume = _check_inputs(pipe, predictor, dataset, config)
    saved = _Saved.of(
        predictor, dataset, None if resume is not None else trainable_parameter_names(predictor, config.stage)
    )
    try:
        accelerator = _make_accelerator(config)
        if getattr(dataset, "resolution", 0) is None:
            dataset.resolution = default_resolution(pipe)
        weight_dtype = _freeze_pipeline(pipe, accelerator)
        _prepare_predictor(predictor, config, accelerator.device, resumed=resume is not None)
        denoiser = pipeline_denoiser(pipe)
        with training_adapters(pipe, predictor, config) as adapter_names, _checkpointing(denoiser, config):
            run = _build_run(pipe, predictor, dataset, config, accelerator, weight_dtype, adapter_names, output_dir)
            if resume is not None:
                _load_checkpoint(run, resume)
            _train_steps(run, callback)
        return _finish(run, predictor)
    except BaseException:
        saved.restore(predictor, dataset)
        raise


# ---------------------------------------------------------------------------------------------- setting up
def _check_inputs(pipe: Any, predictor: HyperLoRAPredictor, dataset: Any, config: StageConfig):
    """Everything a stage needs, checked before anything changes: `(output_dir, checkpoint to resume or None)`."""
    if not isinstance(config, StageConfig):
        raise TrainingConfigError(f"config must be a StageConfig, got {type(config).__name__}.", argument="config")
    config.validate()
    if not isinstance(predictor, HyperLoRAPredictor):
        raise InvalidArgumentTypeError(
            f"predictor must be a HyperLoRAPredictor, got {type(predictor).__name__}. Build one with "
            "`HyperLoRAPredictor(fresh_predictor_config(pipe.unet))` or load one with `from_pretrained`.",
            argument="predictor",
        )
    check_stage(predictor, config.stage)
    if config.output_dir is None:
        raise TrainingConfigError(
            "StageConfig.output_dir is not set (TrainingConfig fills it in per stage).", argument="output_dir"
        )
    _check_pipeline(pipe)
    _check_predictor_denoiser(pipe, predictor)
    _check_dataset(dataset, predictor, config.stage)
    output_dir = Path(config.output_dir)
    resume = _resolve_resume(config, output_dir)
    if resume is not None:
        _verify_checkpoint(resume, predictor, config.stage)
    _check_writable(output_dir)
    return output_dir, resume


@dataclass
class _Saved:
    """What a failed stage puts back: the weights the stage may change (a CPU copy of its trainable parameters;
    of every weight when it resumes a checkpoint), the predictor's device, dtype, trainable flags and mode, and a
    dataset resolution the stage filled in."""

    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: bool
    device: torch.device
    dtype: torch.dtype
    resolution: Any

    @classmethod
    def of(cls, predictor: HyperLoRAPredictor, dataset: Any, names: list[str] | None) -> _Saved:
        state = predictor.state_dict()
        kept = state if names is None else {name: state[name] for name in names}
        return cls(
            state={name: value.detach().to("cpu", copy=True) for name, value in kept.items()},
            requires_grad={name: p.requires_grad for name, p in predictor.named_parameters()},
            training=predictor.training,
            device=predictor.device,
            dtype=predictor.dtype,
            resolution=getattr(dataset, "resolution", 0),
        )

    def restore(self, predictor: HyperLoRAPredictor, dataset: Any) -> None:
        with torch.no_grad():
            predictor.to(device=self.device, dtype=self.dtype)
            predictor.load_state_dict(self.state, strict=False)
        for name, param in predictor.named_parameters():
            param.requires_grad_(self.requires_grad[name])
        predictor.train(self.training)
        if self.resolution is None:
            dataset.resolution = None


def _freeze_pipeline(pipe: Any, accelerator: Any) -> torch.dtype:
    """Freeze the pipeline's models, move them to the device, cast all but the VAE; return the denoiser's dtype."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        module.requires_grad_(False).eval()
        if name != "vae" and module.dtype != weight_dtype:
            module.to(dtype=weight_dtype)
        if module.device != accelerator.device:
            module.to(accelerator.device)
    return weight_dtype


def _prepare_predictor(predictor: HyperLoRAPredictor, config: StageConfig, device: torch.device, resumed: bool):
    predictor.to(device=device, dtype=torch.float32)
    if config.stage == "id_full" and config.zero_init_id_attention and not resumed:
        zero_id_attention(predictor)
    freeze_for_stage(predictor, config.stage)
    predictor.train()


@contextmanager
def _checkpointing(unet: Any, config: StageConfig):
    """The denoiser's gradient checkpointing on for the stage when asked (and off again afterwards)."""
    switch = config.gradient_checkpointing and not getattr(unet, "is_gradient_checkpointing", False)
    if switch:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if switch:
            unet.disable_gradient_checkpointing()


def _make_encoders(pipe: Any, view: TrainingView, config: StageConfig, device, dtype, trigger_words) -> FrozenEncoders:
    encoders = FrozenEncoders(pipe, trigger_words, device, dtype, caption_dropout=config.caption_dropout)
    encoders.cache(view.dataset, latents=config.cache_latents, prompts=config.cache_prompt_embeds)
    view.with_pixels = encoders.needs_pixels
    return encoders


def _build_run(pipe, predictor, dataset, config, accelerator, weight_dtype, adapter_names, output_dir) -> _Run:
    from diffusers.optimization import get_scheduler

    module = HyperLoRATrainingModule(predictor, config.stage, adapter_names)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    view = TrainingView(dataset, config.num_references, config.seed)
    trigger_words = predictor.config.trigger_words
    encoders = _make_encoders(pipe, view, config, accelerator.device, weight_dtype, trigger_words)
    loader = torch.utils.data.DataLoader(
        view,
        batch_size=config.batch_size,
        sampler=EpochSampler(len(view), config.seed),
        collate_fn=collate_examples,
        num_workers=config.dataloader_num_workers,
    )
    # accelerate steps a prepared scheduler once per process and optimizer step.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(module, optimizer, loader, lr_scheduler)
    return _Run(
        config=config,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        loader=loader,
        encoders=encoders,
        noise_scheduler=family_of(pipeline_denoiser(pipe)).training_scheduler(pipe),
        unet=pipeline_denoiser(pipe),
        output_dir=output_dir,
    )


# ---------------------------------------------------------------------------------------------- the steps
def _batches(run: _Run) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(epoch, batch)` forever, starting where `run.global_step` left off (epochs are seeded, see `order`)."""
    done = run.global_step * run.config.gradient_accumulation_steps
    epoch, skip = divmod(done, len(run.loader))
    while True:
        run.loader.set_epoch(epoch)
        loader = run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def _micro_step(run: _Run, epoch: int, batch: dict[str, Any]) -> torch.Tensor:
    """Forward through the prepared module, denoising loss, `accelerator.backward`, and (when synced) the update."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        generators = [sample_generator(run.config.seed, epoch, index) for index in batch["index"]]
        noisy = run.encoders.noisy_batch(batch, generators, run.noise_scheduler)
        with accelerator.autocast():
            factors = run.model(batch)
            groups = identity_groups(batch["reference_key"])
            args = (run.unet, factors, groups, noisy.noisy_latents, noisy.timesteps, noisy.encoded, noisy.target)
            loss = lora_denoising_loss(*args, weights=noisy.weights)
        gathered = accelerator.gather(loss.detach())
        if not torch.isfinite(gathered).all():
            raise _non_finite_loss(run, gathered)
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return gathered.mean()


def _non_finite_loss(run: _Run, losses: torch.Tensor) -> NonFiniteValueError:
    step = run.global_step + 1
    latest = _latest_checkpoint(run.output_dir)
    kept = f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was written yet"
    return NonFiniteValueError(
        f"Stage {run.config.stage!r}, step {step}: the loss is {losses.tolist()} (not finite), so the stage stopped "
        f"before updating the predictor with it. The predictor was put back as it was before the stage; {kept}. "
        "Lower learning_rate, use mixed_precision='bf16' or 'no' instead of 'fp16', and check the data.",
        argument="learning_rate",
    )


def _latest_checkpoint(output_dir: Path) -> Path | None:
    folders = [p for p in (output_dir / CHECKPOINTS_FOLDER).glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return max(folders, key=_checkpoint_step) if folders else None


def _train_steps(run: _Run, callback: Callable[[StepLog], None] | None) -> None:
    from tqdm.auto import tqdm

    config = run.config
    if run.global_step >= config.steps:
        return
    progress = tqdm(
        total=config.steps,
        initial=run.global_step,
        desc=f"stage {config.stage}",
        disable=not (config.show_progress and run.accelerator.is_local_main_process),
    )
    window: list[torch.Tensor] = []
    try:
        for epoch, batch in _batches(run):
            window.append(_micro_step(run, epoch, batch))
            if not run.accelerator.sync_gradients:
                continue
            run.global_step += 1
            log = StepLog(config.stage, run.global_step, torch.stack(window).mean().item(), _learning_rate(run))
            window = []
            _record(run, log, progress, callback)
            if config.save_every and run.global_step % config.save_every == 0:
                _save_checkpoint(run)
            if run.global_step >= config.steps:
                break
    finally:
        progress.close()


def _learning_rate(run: _Run) -> float:
    return run.lr_scheduler.get_last_lr()[0]


def _record(run: _Run, log: StepLog, progress: Any, callback: Callable[[StepLog], None] | None) -> None:
    run.losses.append(asdict(log))
    progress.update(1)
    progress.set_postfix(loss=f"{log.loss:.4f}")
    if callback is not None:
        callback(log)


# ---------------------------------------------------------------------------------------------- files
def _write_losses(run: _Run, folder: Path) -> None:
    """`losses.jsonl`: every step so far, written whole and atomically."""
    with atomic_path(folder / LOSSES_FILE) as temporary:
        temporary.write_text("".join(json.dumps(line) + "\n" for line in run.losses))


def _write_marker(run: _Run, folder: Path) -> None:
    """What a resume checks: that the folder is a train_stage checkpoint, and of which stage and step."""
    marker = {"format": CHECKPOINT_FORMAT, "stage": run.config.stage, "step": run.global_step}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2))
    run.config.save(folder / STAGE_CONFIG_FILE)
    _write_losses(run, folder)


def _save_checkpoint(run: _Run) -> None:
    """`accelerator.save_state` into `checkpoints/step-N`, atomically: every process writes into the main
    process's temporary folder, which is renamed once all are done (and removed if any write fails)."""
    from accelerate.utils import broadcast_object_list

    accelerator = run.accelerator
    destination = run.output_dir / CHECKPOINTS_FOLDER / f"step-{run.global_step:06d}"
    if not accelerator.is_main_process:
        shared = broadcast_object_list([None])
        accelerator.save_state(shared[0])
        accelerator.wait_for_everyone()
        return
    try:
        with atomic_folder(destination) as temporary:  # a re-run over an old checkpoint replaces it
            broadcast_object_list([str(temporary)])
            accelerator.save_state(str(temporary))
            _write_marker(run, temporary)
            accelerator.wait_for_everyone()
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        raise _write_error(destination, error, "the checkpoint") from error
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise _write_error(destination, error, "the checkpoint") from error


def _load_checkpoint(run: _Run, folder: Path) -> None:
    """`accelerator.load_state` (weights-only unpickling) of a checkpoint `_verify_checkpoint` accepted. A failure
    midway is undone by `train_stage` (the predictor is put back)."""
    try:
        load_accelerate_state(run.accelerator, str(folder))
    except HyperLoRAError:
        raise
    except Exception as error:
        raise _resume_error(folder, f"loading it failed ({type(error).__name__}: {error})") from error
    run.global_step = _checkpoint_step(folder)
    losses = folder / LOSSES_FILE
    if losses.is_file():
        lines = losses.read_text(encoding="utf-8").splitlines()
        run.losses = [entry for entry in map(json.loads, lines) if entry["step"] <= run.global_step]
    logger.info(f"Stage {run.config.stage!r}: resumed from {folder} at step {run.global_step}.")


def _finish(run: _Run, predictor: HyperLoRAPredictor) -> HyperLoRAPredictor:
    """Wait for every process, then save the trained weights, the losses and the stage's config on the main
    process (`save_pretrained`; each file atomically)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    predictor.eval().requires_grad_(False)
    if _is_sharded(accelerator):
        predictor = _gathered_copy(run, predictor)
    if accelerator.is_main_process:
        try:
            predictor.save_pretrained(run.output_dir / PREDICTOR_FOLDER)
            _write_losses(run, run.output_dir)
            run.config.save(run.output_dir / STAGE_CONFIG_FILE)
        except HyperLoRAWriteError:
            raise
        except OSError as error:
            raise _write_error(run.output_dir, error, "the trained predictor") from error
    accelerator.free_memory()
    return predictor


def _is_sharded(accelerator: Any) -> bool:
    """FSDP and DeepSpeed hold the predictor's weights in their own (possibly sharded) form."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED")


def _gathered_copy(run: _Run, predictor: HyperLoRAPredictor) -> HyperLoRAPredictor:
    """The full weights (`accelerator.get_state_dict`, a collective) in a fresh predictor on the main process."""
    state = run.accelerator.get_state_dict(run.model)
    if not run.accelerator.is_main_process:
        return predictor
    prefix = "predictor."
    full = HyperLoRAPredictor(predictor.config)
    full.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return full.eval().requires_grad_(False)


def train_curriculum(
    pipe: Any,
    predictor: HyperLoRAPredictor,
    dataset: torch.utils.data.Dataset,
    config: TrainingConfig,
    callback: Callable[[StepLog], None] | None = None,
) -> HyperLoRAPredictor:
    """Run the configured stages in the paper's order (`base` -> `id_clip` -> `id_full`).

    Each stage saves the predictor to `<stage output_dir>/predictor` (`save_pretrained`). Stage `base` is
    skipped with a warning when the predictor has no Base branch and `config.skip_base_without_branch` is set.
    Every stage's config, data and output folder are checked before the first stage starts; each stage is
    transactional (see `train_stage`), and `training_config.json` is written once a stage has finished.

    Example:
        >>> from diffusers_hyperlora.training import TrainingConfig, default_curriculum, train_curriculum
        >>> config = TrainingConfig("outputs/tiny", stages=default_curriculum(steps=3, show_progress=False))
        >>> predictor = train_curriculum(pipe, predictor, dataset, config)  # doctest: +SKIP
    """
    if not isinstance(config, TrainingConfig):
        raise TrainingConfigError(f"config must be a TrainingConfig, got {type(config).__name__}.", argument="config")
    config.validate()
    stages = [s for s in config.resolved_stages() if not _skipped(s, predictor, config)]
    for stage_config in stages:  # every stage's checks before the first one trains
        check_stage(predictor, stage_config.stage)
        _check_dataset(dataset, predictor, stage_config.stage)
    _check_pipeline(pipe)
    for stage_config in stages:
        _check_writable(Path(stage_config.output_dir))
    for stage_config in stages:
        logger.info(f"Training stage {stage_config.stage!r} ({STAGES.index(stage_config.stage) + 1}/3).")
        predictor = train_stage(pipe, predictor, dataset, stage_config, callback=callback)
        _save_training_config(config)
    return predictor


def _skipped(stage_config: StageConfig, predictor: HyperLoRAPredictor, config: TrainingConfig) -> bool:
    if stage_config.stage == "base" and not predictor.config.has_base and config.skip_base_without_branch:
        logger.warning("Skipping stage 'base': the predictor has no Base branch (base_rank=0).")
        return True
    return False


def _save_training_config(config: TrainingConfig) -> None:
    """`training_config.json`, atomically, once a stage of this run has finished (a run that fails before leaves
    an earlier run's file as it was)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        with atomic_path(Path(config.output_dir) / TRAINING_CONFIG_FILE) as temporary:
            temporary.write_text(json.dumps(config.to_dict(), indent=2))


__all__ = ["StepLog", "train_curriculum", "train_stage"]
