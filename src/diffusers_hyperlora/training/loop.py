"""`train_stage` and `train_curriculum`: the accelerate training loop around `losses.hyperlora_unet_prediction`."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..adapters import HyperLoRAAdapters, set_active_adapters
from ..errors import TrainingConfigError, TrainingDataError
from ..predictor import HyperLoRAPredictor
from .data import collate_examples
from .losses import (
    diffusion_loss,
    diffusion_target,
    encode_batch,
    hyperlora_loss_backward,
    hyperlora_unet_prediction,
)
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

    try:
        return Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
        )
    except ValueError as error:
        raise TrainingConfigError(
            f"accelerate could not be set up with mixed_precision={config.mixed_precision!r}: {error} "
            "(accelerate allows one mixed-precision setting per process: use the same value for every stage)."
        ) from error


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
    with warnings.catch_warnings():
        # PEFT warns when a model gets its second adapter; ID + Base are two adapters by design.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            adapters.detach()


def train_stage(
    pipe: Any,
    predictor: HyperLoRAPredictor,
    dataset: torch.utils.data.Dataset,
    config: StageConfig,
    callback: Callable[[StepLog], None] | None = None,
) -> HyperLoRAPredictor:
    """Train one stage of the curriculum and save the predictor to `config.output_dir/predictor`.

    The pipeline's UNet, VAE and text encoders are frozen (never updated); they are moved to the accelerator's
    device, and with mixed precision the UNet and text encoders are cast to the half dtype (the VAE stays as it
    is: SDXL's VAE overflows in float16). Temporary PEFT adapters carry the predicted LoRA during the stage and
    are removed at the end, so the UNet computes exactly what it did before.

    Args:
        pipe: an SDXL pipeline (`StableDiffusionXLPipeline` or any with `unet`, `vae`, `encode_prompt`).
        predictor: the hypernetwork, trained in place (only the stage's parameters change).
        dataset: items as described in `training.data` (e.g. `HyperLoRATrainingDataset`).
        config: the stage (see `StageConfig`).
        callback: called with a `StepLog` after every optimizer step.

    Returns:
        The trained predictor (the same object), in eval mode with gradients off.

    Example:
        >>> from diffusers_hyperlora.tiny import tiny_sdxl_pipeline, tiny_hyperlora_predictor
        >>> from diffusers_hyperlora.training import StageConfig, tiny_training_dataset, train_stage
        >>> pipe = tiny_sdxl_pipeline()
        >>> predictor = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
        >>> config = StageConfig("base", steps=2, output_dir="runs/tiny/base", show_progress=False)
        >>> predictor = train_stage(pipe, predictor, tiny_training_dataset(), config)  # doctest: +SKIP
    """
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    stage = config.stage
    check_stage(predictor, stage)
    _check_dataset(dataset, predictor, stage)
    if config.output_dir is None:
        raise TrainingConfigError("StageConfig.output_dir is not set (TrainingConfig fills it in per stage).")
    output_dir = Path(config.output_dir)
    accelerator = _make_accelerator(config)
    set_seed(config.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
            if name != "vae" and module.dtype != weight_dtype:
                module.to(dtype=weight_dtype)
            if module.device != device:
                module.to(device)
    unet = pipe.unet
    checkpointing_was_on = getattr(unet, "is_gradient_checkpointing", False)
    if config.gradient_checkpointing and not checkpointing_was_on:
        unet.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    predictor.to(device=device, dtype=torch.float32)
    resume = _resolve_resume(config, output_dir)
    if stage == "id_full" and config.zero_init_id_attention and resume is None:
        zero_id_attention(predictor)
    params = freeze_for_stage(predictor, stage)
    predictor.train()
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    view = dataset.with_references(config.num_references) if hasattr(dataset, "with_references") else dataset
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        view,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=collate_examples,
        num_workers=config.dataloader_num_workers,
        generator=generator,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(predictor, optimizer, loader, lr_scheduler)
    trained = accelerator.unwrap_model(model)

    global_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = _checkpoint_step(resume)
        logger.info(f"Stage {stage!r}: resumed from {resume} at step {global_step}.")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / "stage_config.json")
    losses_path = output_dir / LOSSES_FILE
    trigger_words = predictor.config.trigger_words

    progress = tqdm(
        total=config.steps,
        initial=global_step,
        desc=f"stage {stage}",
        disable=not (config.show_progress and accelerator.is_local_main_process),
    )
    window: list[float] = []
    epochs = math.ceil((config.steps - global_step) * config.gradient_accumulation_steps / max(1, len(loader))) + 1
    with training_adapters(pipe, trained, config) as adapter_names:
        try:
            for _ in range(epochs):
                if global_step >= config.steps:
                    break
                for batch in loader:
                    with accelerator.accumulate(model):
                        encoded = encode_batch(pipe, batch, trigger_words, device, weight_dtype)
                        latents = encoded.latents
                        noise = torch.randn_like(latents)
                        timesteps = torch.randint(
                            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
                        ).long()
                        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                        target = diffusion_target(noise_scheduler, latents, noise, timesteps)
                        inputs = (unet, trained, stage, batch, noisy, timesteps, encoded, adapter_names)
                        if config.gradient_checkpointing:  # forward + backward per identity group
                            with accelerator.autocast():
                                loss = hyperlora_loss_backward(*inputs, target, accelerator.backward)
                        else:
                            with accelerator.autocast():
                                loss = diffusion_loss(hyperlora_unet_prediction(*inputs), target)
                            accelerator.backward(loss)
                        if accelerator.sync_gradients and accelerator.num_processes > 1:
                            # The predictor's submodules are called directly (not through the DDP wrapper's
                            # forward), so average the gradients across processes here.
                            for param in params:
                                if param.grad is not None:
                                    param.grad = accelerator.reduce(param.grad, reduction="mean")
                        if accelerator.sync_gradients and config.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    window.append(accelerator.gather(loss.detach()).mean().item())
                    if not accelerator.sync_gradients:
                        continue
                    global_step += 1
                    log = StepLog(stage, global_step, sum(window) / len(window), lr_scheduler.get_last_lr()[0])
                    window = []
                    progress.update(1)
                    progress.set_postfix(loss=f"{log.loss:.4f}")
                    if accelerator.is_main_process:
                        with losses_path.open("a") as handle:
                            handle.write(json.dumps(log.__dict__) + "\n")
                    if callback is not None:
                        callback(log)
                    if config.save_every and global_step % config.save_every == 0:
                        accelerator.save_state(str(output_dir / CHECKPOINTS_FOLDER / f"step-{global_step:06d}"))
                    if global_step >= config.steps:
                        break
        finally:
            progress.close()
            if config.gradient_checkpointing and not checkpointing_was_on:
                unet.disable_gradient_checkpointing()

    accelerator.wait_for_everyone()
    predictor = accelerator.unwrap_model(model)
    predictor.eval().requires_grad_(False)
    if accelerator.is_main_process:
        predictor.save_pretrained(output_dir / PREDICTOR_FOLDER)
    accelerator.free_memory()
    return predictor


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
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "training_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    for stage_config in stages:
        if stage_config.stage == "base" and not predictor.config.has_base and config.skip_base_without_branch:
            logger.warning("Skipping stage 'base': the predictor has no Base branch (base_rank=0).")
            continue
        logger.info(f"Training stage {stage_config.stage!r} ({STAGES.index(stage_config.stage) + 1}/3).")
        predictor = train_stage(pipe, predictor, dataset, stage_config, callback=callback)
    return predictor


__all__ = ["StepLog", "train_curriculum", "train_stage"]
