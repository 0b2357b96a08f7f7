"""Training HyperLoRA with the paper's three-stage curriculum (`base` -> `id_clip` -> `id_full`).

Needs `accelerate` (`pip install "diffusers-hyperlora[train]"`; from a clone: `pip install -e ".[train]"`). See
docs/training.md.

Example:
    >>> from diffusers_hyperlora.training import TrainingConfig, default_curriculum
    >>> config = TrainingConfig("runs/me", stages=default_curriculum(steps=1000, batch_size=4))
    >>> [s.stage for s in config.stages]
    ['base', 'id_clip', 'id_full']
"""

from .conditioning import FrozenEncoders, NoisyBatch, encode_batch
from .data import (
    FEATURE_KINDS,
    FEATURES_FILE,
    METADATA_FILE,
    HyperLoRATrainingDataset,
    TrainingRecord,
    cache_features,
    check_resolution,
    collate_examples,
    load_feature_cache,
    read_metadata,
    tiny_training_dataset,
)
from .families import (
    TRAINING_FAMILIES,
    DenoiserFamily,
    FlowMatchingFamily,
    FluxFamily,
    Noised,
    SD3Family,
    UNetFamily,
    diffusion_target,
    family_of,
    pipeline_denoiser,
    trainable_family,
)
from .loop import StepLog, train_curriculum, train_stage
from .losses import (
    EncodedBatch,
    diffusion_loss,
    identity_groups,
    lora_denoising_loss,
    lora_parameters,
    lora_unet_prediction,
    prompt_with_trigger,
    stage_coefficients,
    substituted_parameters,
)
from .module import HyperLoRATrainingModule, hyperlora_unet_prediction
from .order import EpochSampler, TrainingView, sample_generator
from .sizes import default_resolution, fresh_predictor_config, predictor_sizes
from .stages import (
    STAGE_DEFAULTS,
    STAGES,
    StageConfig,
    TrainingConfig,
    check_stage,
    default_curriculum,
    freeze_for_stage,
    trainable_parameter_names,
    zero_id_attention,
)

__all__ = [
    "FEATURE_KINDS",
    "FEATURES_FILE",
    "METADATA_FILE",
    "STAGE_DEFAULTS",
    "STAGES",
    "TRAINING_FAMILIES",
    "DenoiserFamily",
    "FlowMatchingFamily",
    "FluxFamily",
    "Noised",
    "SD3Family",
    "UNetFamily",
    "EncodedBatch",
    "EpochSampler",
    "FrozenEncoders",
    "HyperLoRATrainingDataset",
    "HyperLoRATrainingModule",
    "NoisyBatch",
    "StageConfig",
    "StepLog",
    "TrainingConfig",
    "TrainingRecord",
    "TrainingView",
    "cache_features",
    "check_resolution",
    "check_stage",
    "collate_examples",
    "default_curriculum",
    "default_resolution",
    "diffusion_loss",
    "diffusion_target",
    "encode_batch",
    "family_of",
    "freeze_for_stage",
    "fresh_predictor_config",
    "hyperlora_unet_prediction",
    "identity_groups",
    "load_feature_cache",
    "pipeline_denoiser",
    "lora_denoising_loss",
    "lora_parameters",
    "lora_unet_prediction",
    "predictor_sizes",
    "prompt_with_trigger",
    "read_metadata",
    "sample_generator",
    "stage_coefficients",
    "substituted_parameters",
    "tiny_training_dataset",
    "trainable_family",
    "train_curriculum",
    "train_stage",
    "trainable_parameter_names",
    "zero_id_attention",
]
