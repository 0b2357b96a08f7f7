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
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TrainingConfigError
from ..model.predictor import HyperLoRAPredictor
from ..utils.atomic_files import atomic_path

STAGES: tuple[str, ...] = ("base", "id_clip", "id_full")
MIXED_PRECISION = ("no", "fp16", "bf16")
# `diffusers.optimization.get_scheduler` names that need no extra arguments.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
_INT_FIELDS = {  # name -> smallest allowed value
    "steps": 1,
    "batch_size": 1,
    "gradient_accumulation_steps": 1,
    "num_references": 1,
    "save_every": 0,
    "lr_warmup_steps": 0,
    "dataloader_num_workers": 0,
    "seed": 0,
}
_INT_MAX = {"seed": 2**32 - 1}  # numpy's seed range (accelerate's set_seed seeds numpy too)
_FLOAT_FIELDS = {  # name -> (low, high, high included)
    "learning_rate": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, False),
    "adam_beta1": (0.0, 1.0, False),
    "adam_beta2": (0.0, 1.0, False),
    "max_grad_norm": (0.0, math.inf, False),
    "id_weight": (-math.inf, math.inf, False),
    "base_weight": (-math.inf, math.inf, False),
    "caption_dropout": (0.0, 1.0, True),
}
_BOOL_FIELDS = (
    "zero_init_id_attention",
    "gradient_checkpointing",
    "cache_latents",
    "cache_prompt_embeds",
    "show_progress",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        raise TrainingConfigError(
            f"Unknown training stage {stage!r}; the stages are {', '.join(STAGES)}.", argument="stage"
        )
    config = predictor.config
    if stage == "base" and not config.has_base:
        raise TrainingConfigError(
            "Stage 'base' trains the Base branch, but this predictor has none (base_rank=0). Build it with "
            "`HyperLoRAConfig(base_rank=id_rank // 2, ...)` or skip the stage.",
            argument="stage",
        )
    if stage == "id_clip" and not config.use_image_embeds:
        raise TrainingConfigError(
            "Stage 'id_clip' trains on CLIP features, but this predictor has no CLIP condition. Build it with "
            "`HyperLoRAConfig(use_image_embeds=True, ...)` or skip the stage.",
            argument="stage",
        )
    if stage == "id_full" and not config.use_id_embeds:
        raise TrainingConfigError(
            "Stage 'id_full' adds the ArcFace condition, but this predictor has none. Build it with "
            "`HyperLoRAConfig(use_id_embeds=True, ...)` or skip the stage.",
            argument="stage",
        )


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
        id_weight, base_weight: adapter weights of the predicted LoRAs inside the denoiser while training.
        num_references: images of the same person whose features predict a sample's LoRA (the sample's own
            image first, then others drawn anew each epoch, seeded); their coefficients are averaged as at inference.
        zero_init_id_attention: `id_full` only: zero `attn2.to_out` first (see the module docstring).
        gradient_checkpointing: recompute the denoiser's activations in the backward pass (less memory).
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
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.resume_from_checkpoint, os.PathLike):
            self.resume_from_checkpoint = os.fspath(self.resume_from_checkpoint)
        self.validate()

    def validate(self) -> None:
        """Check every field (type and range) without touching any file or model: `TrainingConfigError` naming
        the field (`error.argument`). Called on construction and again by `train_stage` (fields may be changed)."""
        if self.stage not in STAGES:
            raise TrainingConfigError(
                f"Unknown training stage {self.stage!r}; the stages are {', '.join(STAGES)}.", argument="stage"
            )
        for name, low in _INT_FIELDS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low or value > _INT_MAX.get(name, 2**62):
                bound = "positive" if low == 1 else ">= 0"
                top = f" and at most {_INT_MAX[name]}" if name in _INT_MAX else ""
                raise TrainingConfigError(
                    f"StageConfig.{name} must be an integer {bound}{top}, got {value!r}.", argument=name
                )
        for name, (low, high, closed_high) in _FLOAT_FIELDS.items():
            self._check_float(name, low, high, closed_high)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TrainingConfigError(
                    f"StageConfig.{name} must be True or False, got {getattr(self, name)!r}.", argument=name
                )
        self._check_choices()
        if self.zero_init_id_attention and self.stage != "id_full":
            raise TrainingConfigError(
                "zero_init_id_attention only applies to stage 'id_full'.", argument="zero_init_id_attention"
            )

    def _check_float(self, name: str, low: float, high: float, closed_high: bool) -> None:
        value = getattr(self, name)
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        above = number > high if closed_high else number >= high
        if not math.isfinite(number) or number < low or above or (name == "learning_rate" and number == 0):
            if name == "learning_rate":
                expected = "a finite number > 0"
            elif math.isinf(high):
                expected = f"a finite number >= {low:g}"
            else:
                expected = f"a number in [{low:g}, {high:g}{']' if closed_high else ')'}"
            fix = " (a probability)" if name == "caption_dropout" else ""
            raise TrainingConfigError(f"StageConfig.{name} must be {expected}{fix}, got {value!r}.", argument=name)

    def _check_choices(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainingConfigError(
                f"StageConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.",
                argument="mixed_precision",
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise TrainingConfigError(
                f"StageConfig.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.",
                argument="lr_scheduler",
            )
        for name in ("output_dir", "resume_from_checkpoint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TrainingConfigError(
                    f"StageConfig.{name} must be a folder path (a non-empty string) or None, got {value!r}.",
                    argument=name,
                )

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
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.stages, (list, tuple)):
            raise TrainingConfigError(
                f"TrainingConfig.stages must be a list of StageConfig, got {type(self.stages).__name__}.",
                argument="stages",
            )
        self.stages = [_stage_config(s) for s in self.stages]
        self.validate()

    def validate(self) -> None:
        """Check the whole curriculum (every stage's fields, their order, one mixed precision) without touching any
        file or model, so a front end can check a run before loading SDXL. `TrainingConfigError` names the field."""
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise TrainingConfigError(
                f"TrainingConfig.output_dir must be a folder path, got {self.output_dir!r}.", argument="output_dir"
            )
        if not isinstance(self.skip_base_without_branch, bool):
            raise TrainingConfigError(
                "TrainingConfig.skip_base_without_branch must be True or False, "
                f"got {self.skip_base_without_branch!r}.",
                argument="skip_base_without_branch",
            )
        if not self.stages:
            raise TrainingConfigError("TrainingConfig.stages is empty.", argument="stages")
        for stage in self.stages:
            stage.validate()
        order = [STAGES.index(s.stage) for s in self.stages]
        if order != sorted(order) or len(set(order)) != len(order):
            raise TrainingConfigError(
                f"Stages must be distinct and in curriculum order {STAGES}, got {[s.stage for s in self.stages]}.",
                argument="stages",
            )
        precisions = {s.mixed_precision for s in self.stages}
        if len(precisions) > 1:
            raise TrainingConfigError(
                f"All stages must use one mixed_precision (one per process), got {precisions}.",
                argument="mixed_precision",
            )

    def resolved_stages(self) -> list[StageConfig]:
        """The stages with `output_dir` filled in."""
        return [
            s if s.output_dir is not None else replace(s, output_dir=str(Path(self.output_dir) / s.stage))
            for s in self.stages
        ]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"stages": [s.to_dict() for s in self.stages]}


def _stage_config(value: Any) -> StageConfig:
    if isinstance(value, StageConfig):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(StageConfig)})
        if unknown:
            raise TrainingConfigError(f"Unknown StageConfig field(s) {unknown}.", argument=unknown[0])
        if "stage" not in value:
            raise TrainingConfigError("A stage given as a dict needs its 'stage' name.", argument="stage")
        return StageConfig(**value)
    raise TrainingConfigError(
        f"TrainingConfig.stages holds {type(value).__name__}; expected StageConfig (or its dict).", argument="stages"
    )


STAGE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(StageConfig) if f.default is not MISSING}
"""Every `StageConfig` default by field name (e.g. `STAGE_DEFAULTS["steps"]`), for front ends' help texts.
`default_curriculum` halves the learning rate of `id_full`."""
