"""`train_stage` and `train_curriculum`: a plain accelerate training loop around `HyperLoRATrainingModule`."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..adapters.peft_adapters import HyperLoRAAdapters, set_active_adapters
from ..errors import TrainingConfigError, TrainingDataError
from ..model.predictor import HyperLoRAPredictor
from ..utils.atomic_files import atomic_path
from ..utils.compat import quiet_peft_adapter_warnings
from .conditioning import FrozenEncoders
from .data import collate_examples
from .losses import diffusion_target, identity_groups, lora_denoising_loss
from .module import HyperLoRATrainingModule
from .order import EpochSampler, TrainingView, sample_generator
from .stages import STAGES, StageConfig, TrainingConfig, check_stage, freeze_for_stage, zero_id_attention

logger = logging.get_logger(__name__)

ID_ADAPTER = "hyperlora_train_id"
BASE_ADAPTER = "hyperlora_train_base"
PREDICTOR_FOLDER = "predictor"
CHECKPOINTS_FOLDER = "checkpoints"
LOSSES_FILE = "losses.jsonl"


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
    if len(dataset) == 0:
        raise TrainingDataError("The training dataset is empty.")
    has = getattr(dataset, "has_features", None)
    if has is None:
        return
    missing = [kind for kind in _required_features(predictor, stage) if not has.get(kind, False)]
    if missing:
        raise TrainingDataError(
            f"Stage {stage!r} with this predictor needs {', '.join(missing)} for every image; the dataset has none. "
            "Cache them with `cache_features(root, extractor, with_base=True)`."
        )


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", path.name)
    if match is None:
        raise TrainingConfigError(f"{path} is not a checkpoint folder written by train_stage (step-N).")
    return int(match.group(1))


def _resolve_resume(config: StageConfig, output_dir: Path) -> Path | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        folders = [p for p in (output_dir / CHECKPOINTS_FOLDER).glob("step-*") if p.is_dir()]
        if not folders:
            logger.warning(f"No checkpoint under {output_dir / CHECKPOINTS_FOLDER}; starting the stage from scratch.")
            return None
        return max(folders, key=_checkpoint_step)
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir():
        raise TrainingConfigError(f"resume_from_checkpoint {path} is not a folder.")
    return path


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
    """Register the training adapters on the UNet, activate them for the stage, remove them afterwards."""
    unet = pipe.unet
    if pipe.hyperlora.is_loaded:
        raise TrainingConfigError(
            "This pipeline has a HyperLoRA loaded; call `pipe.unload_hyperlora()` before training on it."
        )
    if getattr(unet, "peft_config", None):
        raise TrainingConfigError(
            f"The UNet already carries adapters {sorted(unet.peft_config)}; fuse them (`pipe.fuse_lora()` then "
            "`pipe.unload_lora_weights()`) or delete them before training HyperLoRA on it."
        )
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
    unet: Any
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

    The pipeline's UNet, VAE and text encoders are frozen (never updated); they are moved to the accelerator's
    device, and with mixed precision the UNet and text encoders are cast to the half dtype (the VAE stays as it
    is: SDXL's VAE overflows in float16). Temporary PEFT adapters carry the predicted LoRA during the stage and
    are removed at the end, so the UNet computes exactly what it did before.

    Args:
        pipe: an SDXL pipeline (`StableDiffusionXLPipeline` or any with `unet`, `vae`, `encode_prompt`).
        predictor: the hypernetwork, trained in place (only the stage's parameters change).
        dataset: items as described in `training.data` (e.g. `HyperLoRATrainingDataset`).
        config: the stage (see `StageConfig`).
        callback: called with a `StepLog` after every optimizer step (on every process).

    Returns:
        The trained predictor (the same object), in eval mode with gradients off.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline, tiny_hyperlora_predictor
        >>> from diffusers_hyperlora.training import StageConfig, tiny_training_dataset, train_stage
        >>> pipe = tiny_sdxl_pipeline()
        >>> predictor = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
        >>> config = StageConfig("base", steps=2, output_dir="runs/tiny/base", show_progress=False)
        >>> predictor = train_stage(pipe, predictor, tiny_training_dataset(), config)  # doctest: +SKIP
    """
    output_dir = _check_inputs(predictor, dataset, config)
    accelerator = _make_accelerator(config)
    weight_dtype = _freeze_pipeline(pipe, accelerator)
    resume = _resolve_resume(config, output_dir)
    _prepare_predictor(predictor, config, accelerator.device, resumed=resume is not None)
    with training_adapters(pipe, predictor, config) as adapter_names, _checkpointing(pipe.unet, config):
        run = _build_run(pipe, predictor, dataset, config, accelerator, weight_dtype, adapter_names, output_dir)
        if resume is not None:
            _load_checkpoint(run, resume)
        if accelerator.is_main_process:
            config.save(output_dir / "stage_config.json")
        _train_steps(run, callback)
    return _finish(run, predictor)


# ---------------------------------------------------------------------------------------------- setting up
def _check_inputs(predictor: HyperLoRAPredictor, dataset: Any, config: StageConfig) -> Path:
    check_stage(predictor, config.stage)
    _check_dataset(dataset, predictor, config.stage)
    if config.output_dir is None:
        raise TrainingConfigError("StageConfig.output_dir is not set (TrainingConfig fills it in per stage).")
    return Path(config.output_dir)


def _freeze_pipeline(pipe: Any, accelerator: Any) -> torch.dtype:
    """Freeze the pipeline's models, move them to the device, cast all but the VAE; return the UNet's dtype."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
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
    """The UNet's gradient checkpointing on for the stage when asked (and off again afterwards)."""
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
    from diffusers import DDPMScheduler
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
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        unet=pipe.unet,
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
    """Forward through the prepared module, UNet loss, `accelerator.backward`, and (when synced) the update."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        generators = [sample_generator(run.config.seed, epoch, index) for index in batch["index"]]
        noisy = run.encoders.noisy_batch(batch, generators, run.noise_scheduler)
        target = diffusion_target(run.noise_scheduler, noisy.encoded.latents, noisy.noise, noisy.timesteps)
        with accelerator.autocast():
            factors = run.model(batch)
            groups = identity_groups(batch["reference_key"])
            args = (run.unet, factors, groups, noisy.noisy_latents, noisy.timesteps, noisy.encoded, target)
            loss = lora_denoising_loss(*args)
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return accelerator.gather(loss.detach()).mean()


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
def _write_losses(run: _Run) -> None:
    """`losses.jsonl`: every step so far (written whole, atomically, at checkpoints and at the end)."""
    with atomic_path(run.output_dir / LOSSES_FILE) as temporary:
        temporary.write_text("".join(json.dumps(line) + "\n" for line in run.losses))


def _save_checkpoint(run: _Run) -> None:
    """`accelerator.save_state` into `checkpoints/step-N`, atomically: every process writes into the main
    process's temporary folder, which is renamed once all are done."""
    from accelerate.utils import broadcast_object_list

    accelerator = run.accelerator
    destination = run.output_dir / CHECKPOINTS_FOLDER / f"step-{run.global_step:06d}"
    if not accelerator.is_main_process:
        shared = broadcast_object_list([None])
        accelerator.save_state(shared[0])
        accelerator.wait_for_everyone()
        return
    replaced = destination.with_name(f".{destination.name}.replaced")
    with atomic_path(destination) as temporary:
        broadcast_object_list([str(temporary)])
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if destination.exists():  # a re-run over an old checkpoint: a folder cannot be renamed over a folder
            os.replace(destination, replaced)
    shutil.rmtree(replaced, ignore_errors=True)
    _write_losses(run)


def _load_checkpoint(run: _Run, folder: Path) -> None:
    run.accelerator.load_state(str(folder))
    run.global_step = _checkpoint_step(folder)
    if (run.output_dir / LOSSES_FILE).is_file():
        lines = (run.output_dir / LOSSES_FILE).read_text().splitlines()
        run.losses = [entry for entry in map(json.loads, lines) if entry["step"] <= run.global_step]
    logger.info(f"Stage {run.config.stage!r}: resumed from {folder} at step {run.global_step}.")


def _finish(run: _Run, predictor: HyperLoRAPredictor) -> HyperLoRAPredictor:
    """Wait for every process, then save the trained weights on the main process (`save_pretrained`)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    predictor.eval().requires_grad_(False)
    if _is_sharded(accelerator):
        predictor = _gathered_copy(run, predictor)
    if accelerator.is_main_process:
        predictor.save_pretrained(run.output_dir / PREDICTOR_FOLDER)
        _write_losses(run)
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

    Example:
        >>> from diffusers_hyperlora.training import TrainingConfig, default_curriculum, train_curriculum
        >>> config = TrainingConfig("runs/tiny", stages=default_curriculum(steps=3, show_progress=False))
        >>> predictor = train_curriculum(pipe, predictor, dataset, config)  # doctest: +SKIP
    """
    stages = config.resolved_stages()
    with atomic_path(Path(config.output_dir) / "training_config.json") as temporary:
        temporary.write_text(json.dumps(config.to_dict(), indent=2))
    for stage_config in stages:
        if stage_config.stage == "base" and not predictor.config.has_base and config.skip_base_without_branch:
            logger.warning("Skipping stage 'base': the predictor has no Base branch (base_rank=0).")
            continue
        logger.info(f"Training stage {stage_config.stage!r} ({STAGES.index(stage_config.stage) + 1}/3).")
        predictor = train_stage(pipe, predictor, dataset, stage_config, callback=callback)
    return predictor


__all__ = ["StepLog", "train_curriculum", "train_stage"]
