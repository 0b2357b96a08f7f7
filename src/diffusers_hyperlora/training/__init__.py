"""Training HyperLoRA with the paper's three-stage curriculum (`base` -> `id_clip` -> `id_full`).

Needs `accelerate` (`pip install "diffusers-hyperlora[train]"`). See docs/training.md.

Example:
    >>> from diffusers_hyperlora.training import TrainingConfig, default_curriculum
    >>> config = TrainingConfig("runs/me", stages=default_curriculum(steps=1000, batch_size=4))
    >>> [s.stage for s in config.stages]
    ['base', 'id_clip', 'id_full']
"""

from .data import (
    FEATURE_KINDS,
    FEATURES_FILE,
    METADATA_FILE,
    HyperLoRATrainingDataset,
    TrainingRecord,
    cache_features,
    collate_examples,
    features_of,
    load_feature_cache,
    read_metadata,
    tiny_training_dataset,
)
from .loop import StepLog, train_curriculum, train_stage
from .losses import (
    EncodedBatch,
    diffusion_loss,
    diffusion_target,
    encode_batch,
    hyperlora_loss_backward,
    hyperlora_unet_prediction,
    identity_groups,
    lora_parameters,
    prompt_with_trigger,
    stage_coefficients,
    substituted_parameters,
)
from .stages import (
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
    "STAGES",
    "EncodedBatch",
    "HyperLoRATrainingDataset",
    "StageConfig",
    "StepLog",
    "TrainingConfig",
    "TrainingRecord",
    "cache_features",
    "check_stage",
    "collate_examples",
    "default_curriculum",
    "diffusion_loss",
    "diffusion_target",
    "encode_batch",
    "features_of",
    "freeze_for_stage",
    "hyperlora_loss_backward",
    "hyperlora_unet_prediction",
    "identity_groups",
    "load_feature_cache",
    "lora_parameters",
    "prompt_with_trigger",
    "read_metadata",
    "stage_coefficients",
    "substituted_parameters",
    "tiny_training_dataset",
    "train_curriculum",
    "train_stage",
    "trainable_parameter_names",
    "zero_id_attention",
]
