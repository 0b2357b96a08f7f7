"""`HyperLoRATrainingModule`: the predictor as accelerate sees it. Its forward returns the predicted LoRA factors.

`accelerator.prepare` wraps this module (DDP, FSDP, DeepSpeed, ...) and the training loop calls the wrapper, so
every process runs the predictor's forward through the wrapper and its backward through `accelerator.backward`:
gradient synchronisation, sharding and accumulation are accelerate's, as in any accelerate script.

The frozen UNet is not part of the module: it runs outside, on the factors the module returns (see
`losses.lora_denoising_loss`), so the wrappers never copy, broadcast or shard it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.predictor import HyperLoRAPredictor
from .losses import EncodedBatch, identity_groups, lora_parameters, lora_unet_prediction, stage_coefficients


class HyperLoRATrainingModule(nn.Module):
    """The predictor wrapped for one training stage.

    Args:
        predictor: the hypernetwork (registered as the submodule `predictor`, so checkpoints hold its weights
            under `predictor.*`).
        stage: `"base"`, `"id_clip"` or `"id_full"`.
        adapter_names: `{"id": ..., "base": ...}`: the PEFT adapter names the factors are meant for on the denoiser.

    `forward(batch)` returns one `{parameter name: tensor}` per identity group of the batch (groups as in
    `identity_groups(batch["reference_key"])`). The trained branch's tensors carry gradients; the frozen Base
    branch of stages `id_clip` / `id_full` is computed without.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> from diffusers_hyperlora.training import HyperLoRATrainingModule, collate_examples, tiny_training_dataset
        >>> module = HyperLoRATrainingModule(tiny_hyperlora_predictor(), "id_clip", {"id": "a", "base": "b"})
        >>> data = tiny_training_dataset(with_base=False)
        >>> factors = module(collate_examples([data[0], data[1]]))
        >>> len(factors), all(t.requires_grad for t in factors[0].values())
        (2, True)
    """

    def __init__(self, predictor: HyperLoRAPredictor, stage: str, adapter_names: dict[str, str]) -> None:
        super().__init__()
        self.predictor = predictor
        self.stage = stage
        self.adapter_names = dict(adapter_names)

    def branches(self) -> list[tuple[str, bool]]:
        """`(branch, trained)` for the LoRAs this stage puts into the denoiser."""
        if self.stage == "base":
            return [("base", True)]
        return [("id", True)] + ([("base", False)] if self.predictor.config.has_base else [])

    def forward(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        groups = identity_groups(batch["reference_key"])
        grad = torch.is_grad_enabled()
        coefficients = {}
        for branch, trained in self.branches():
            with torch.set_grad_enabled(trained and grad):
                coefficients[branch] = stage_coefficients(self.predictor, self.stage, branch, batch, groups)
        factors = []
        for g in range(len(groups)):
            params: dict[str, torch.Tensor] = {}
            for branch, trained in self.branches():
                with torch.set_grad_enabled(trained and grad):
                    name = self.adapter_names[branch]
                    params.update(lora_parameters(self.predictor, branch, coefficients[branch][g], name))
            factors.append(params)
        return factors


def hyperlora_unet_prediction(
    unet: nn.Module,
    predictor: HyperLoRAPredictor,
    stage: str,
    batch: dict[str, Any],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoded: EncodedBatch,
    adapter_names: dict[str, str],
) -> torch.Tensor:
    """The denoiser's output for every sample with its predicted LoRA(s) substituted in (differentiable).

    The training forward outside the loop (evaluation, tests): `HyperLoRATrainingModule` then
    `lora_unet_prediction`. The adapters' weights and which are active are whatever the denoiser's PEFT layers are set
    to (`train_stage` sets them per stage).
    """
    factors = HyperLoRATrainingModule(predictor, stage, adapter_names)(batch)
    groups = identity_groups(batch["reference_key"])
    return lora_unet_prediction(unet, factors, groups, noisy_latents, timesteps, encoded)


__all__ = ["HyperLoRATrainingModule", "hyperlora_unet_prediction"]
