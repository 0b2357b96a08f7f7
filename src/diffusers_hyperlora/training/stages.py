"""The three-stage curriculum of the paper: what each stage reads, trains and freezes, and the configs.

| stage | condition of the trained branch | trains | frozen but active | off |
|---|---|---|---|---|
| `base` | CLIP of the face-blurred image | `base_resampler`, `base_bank` | - | ID adapter |
| `id_clip` | CLIP of the face crop (no ArcFace) | `resampler` minus its ArcFace path, `id_bank` | Base | - |
| `id_full` | CLIP + ArcFace | `id_projector`, all of `resampler`, `id_bank` | Base | - |

"ArcFace dropped" in `id_clip` means the resampler is called with no ID tokens: every layer skips its `attn2`
residual (and `proj_in`), so the queries see only themselves and the CLIP tokens. The ArcFace path
(`id_projector`, `resampler.proj_in`, `layers.*.attn2`, `layers.*.norm_attn2_*`) is neither used nor updated.
With `zero_init_id_attention=True` (the default curriculum's `id_full`), `id_full` starts by zeroing every
`attn2.to_out` weight, so its first step computes exactly what `id_clip` ended with and the ArcFace path grows
in from zero.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TrainingConfigError
from ..model.predictor import HyperLoRAPredictor
from ..utils.atomic_files import atomic_path

STAGES: tuple[str, ...] = ("base", "id_clip", "id_full")
MIXED_PRECISION = ("no", "fp16", "bf16")


def _is_id_path(name: str) -> bool:
    """Parameters of the resampler's ArcFace path (name relative to the resampler)."""
    parts = name.split(".")
    if parts[0] == "proj_in":
        return True
    return parts[0] == "layers" and len(parts) > 2 and parts[2] in ("attn2", "norm_attn2_l", "norm_attn2_x")


def trainable_parameter_names(predictor: HyperLoRAPredictor, stage: str) -> list[str]:
    """Names (as in `predictor.named_parameters()`) of the parameters that `stage` trains.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> names = trainable_parameter_names(tiny_hyperlora_predictor(), "id_clip")
        >>> any(n.startswith("id_bank.") for n in names), any(".attn2." in n for n in names)
        (True, False)
    """
    check_stage(predictor, stage)
    names = []
    for name, _ in predictor.named_parameters():
        module, _, rest = name.partition(".")
        if stage == "base":
            keep = module in ("base_resampler", "base_bank")
        elif stage == "id_clip":
            keep = module == "id_bank" or (module == "resampler" and not _is_id_path(rest))
        else:
            keep = module in ("id_projector", "resampler", "id_bank")
        if keep:
            names.append(name)
    return names


def freeze_for_stage(predictor: HyperLoRAPredictor, stage: str) -> list[nn.Parameter]:
    """Set `requires_grad` so that exactly the stage's parameters train; return them (in a stable order)."""
    wanted = set(trainable_parameter_names(predictor, stage))
    params = []
    for name, param in predictor.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params.append(param)
    return params


def check_stage(predictor: HyperLoRAPredictor, stage: str) -> None:
    """Raise `TrainingConfigError` when `stage` is unknown or the predictor cannot run it."""
    if stage not in STAGES:
        raise TrainingConfigError(f"Unknown training stage {stage!r}; the stages are {', '.join(STAGES)}.")
    config = predictor.config
    if stage == "base" and not config.has_base:
        raise TrainingConfigError(
            "Stage 'base' trains the Base branch, but this predictor has none (base_rank=0). Build it with "
            "`HyperLoRAConfig(base_rank=id_rank // 2, ...)` or skip the stage."
        )
    if stage == "id_clip" and not config.use_image_embeds:
        raise TrainingConfigError("Stage 'id_clip' trains on CLIP features, but this predictor has no CLIP condition.")
    if stage == "id_full" and not config.use_id_embeds:
        raise TrainingConfigError("Stage 'id_full' adds the ArcFace condition, but this predictor has none.")


@torch.no_grad()
def zero_id_attention(predictor: HyperLoRAPredictor) -> None:
    """Zero every `resampler.layers.*.attn2.to_out.0.weight`: the ArcFace path then adds nothing (yet)."""
    for layer in predictor.resampler.layers:
        attn2 = getattr(layer, "attn2", None)
        if attn2 is not None:
            attn2.to_out[0].weight.zero_()


@dataclass
class StageConfig:
    """Everything one training stage needs.

    Args:
        stage: `"base"`, `"id_clip"` or `"id_full"` (see the module docstring).
        steps: optimizer steps (each `gradient_accumulation_steps` micro-batches of `batch_size`).
        learning_rate, weight_decay, adam_beta1, adam_beta2, max_grad_norm: AdamW and gradient clipping.
        lr_scheduler, lr_warmup_steps: a `diffusers.optimization.get_scheduler` name and its warm-up.
        batch_size: images per micro-batch *per process*; every image gets the LoRA predicted from its own reference(s).
        gradient_accumulation_steps: micro-batches per optimizer step (accelerate's accumulation).
        mixed_precision: `"no"`, `"fp16"` or `"bf16"` (accelerate autocast; one value per process).
        seed: seeds data order, noise, timesteps, latent samples, caption dropout and reference draws (each a
            function of the seed, the epoch and the sample's dataset index: see `training.order`).
        output_dir: the stage's folder: `predictor/` (save_pretrained), `checkpoints/step-N` (save_state),
            `losses.jsonl`, `stage_config.json`.
        save_every: `accelerator.save_state` every this many optimizer steps (0: never).
        resume_from_checkpoint: a `checkpoints/step-N` folder to continue from (`"latest"`: the newest).
        id_weight, base_weight: adapter weights of the predicted LoRAs inside the UNet while training.
        num_references: images of the same person whose features predict a sample's LoRA (the sample's own
            image first, then others drawn anew each epoch, seeded); their coefficients are averaged as at inference.
        zero_init_id_attention: `id_full` only: zero `attn2.to_out` first (see the module docstring).
        gradient_checkpointing: recompute the UNet's activations in the backward pass (less memory).
        cache_latents: encode every image with the VAE once before the stage (its latent distribution; a fresh
            sample is still drawn every step), so neither the VAE nor the image files are used per step.
        cache_prompt_embeds: encode every distinct prompt with the text encoders once before the stage.
        caption_dropout: probability that a sample's caption is replaced by `""` (the trigger words stay).
        dataloader_num_workers: worker processes of the data loader.
        show_progress: a tqdm progress bar.

    Example:
        >>> StageConfig("id_clip", steps=2000, learning_rate=1e-4, batch_size=4).stage
        'id_clip'
    """

    stage: str
    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str | None = None
    save_every: int = 0
    resume_from_checkpoint: str | None = None
    id_weight: float = 1.0
    base_weight: float = 1.0
    num_references: int = 1
    zero_init_id_attention: bool = False
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    cache_prompt_embeds: bool = True
    caption_dropout: float = 0.0
    dataloader_num_workers: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainingConfigError(f"Unknown training stage {self.stage!r}; the stages are {', '.join(STAGES)}.")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "num_references"):
            if getattr(self, name) <= 0:
                raise TrainingConfigError(f"StageConfig.{name} must be positive, got {getattr(self, name)}.")
        for name in ("save_every", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise TrainingConfigError(f"StageConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise TrainingConfigError(f"StageConfig.learning_rate must be positive, got {self.learning_rate}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainingConfigError(
                f"StageConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}."
            )
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise TrainingConfigError(
                f"StageConfig.caption_dropout is a probability in [0, 1], got {self.caption_dropout}."
            )
        if self.zero_init_id_attention and self.stage != "id_full":
            raise TrainingConfigError("zero_init_id_attention only applies to stage 'id_full'.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2))


def default_curriculum(**common: Any) -> list[StageConfig]:
    """The paper's three stages in order; `common` sets any `StageConfig` field for all three.

    `id_full` starts with the ArcFace attention zeroed (`zero_init_id_attention=True`) and a lower learning
    rate (a fine-tune); pass per-stage values through `TrainingConfig(stages=[...])` to change that.

    Example:
        >>> [s.stage for s in default_curriculum(steps=10)]
        ['base', 'id_clip', 'id_full']
    """
    lr = common.pop("learning_rate", 1e-4)
    return [
        StageConfig("base", learning_rate=lr, **common),
        StageConfig("id_clip", learning_rate=lr, **common),
        StageConfig("id_full", learning_rate=lr / 2, zero_init_id_attention=True, **common),
    ]


@dataclass
class TrainingConfig:
    """The whole curriculum: a root folder and the stages, run in order by `train_curriculum`.

    A stage without its own `output_dir` writes to `output_dir/<stage>`. All stages must share one
    `mixed_precision` (accelerate allows one per process).

    Example:
        >>> config = TrainingConfig("runs/me", stages=default_curriculum(steps=500, batch_size=2))
        >>> [s.output_dir for s in config.resolved_stages()]
        ['runs/me/base', 'runs/me/id_clip', 'runs/me/id_full']
    """

    output_dir: str
    stages: list[StageConfig] = field(default_factory=default_curriculum)
    skip_base_without_branch: bool = True

    def __post_init__(self) -> None:
        self.stages = [StageConfig(**s) if isinstance(s, dict) else s for s in self.stages]
        if not self.stages:
            raise TrainingConfigError("TrainingConfig.stages is empty.")
        order = [STAGES.index(s.stage) for s in self.stages]
        if order != sorted(order) or len(set(order)) != len(order):
            raise TrainingConfigError(
                f"Stages must be distinct and in curriculum order {STAGES}, got {[s.stage for s in self.stages]}."
            )
        precisions = {s.mixed_precision for s in self.stages}
        if len(precisions) > 1:
            raise TrainingConfigError(f"All stages must use one mixed_precision (one per process), got {precisions}.")

    def resolved_stages(self) -> list[StageConfig]:
        """The stages with `output_dir` filled in."""
        return [
            s if s.output_dir is not None else replace(s, output_dir=str(Path(self.output_dir) / s.stage))
            for s in self.stages
        ]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"stages": [s.to_dict() for s in self.stages]}
