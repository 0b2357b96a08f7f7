"""The differentiable pieces of a training step: features -> coefficients -> LoRA -> denoiser -> denoising loss.

The denoiser is a UNet or an SD3 / FLUX transformer; how it is called is its family's (`families`).

The predicted LoRA factors enter the denoiser in place of the `lora_A` / `lora_B` weights of the PEFT adapters
registered by `HyperLoRAAdapters.attach` (`{module}.lora_A.{adapter}.weight`, `{module}.lora_B.{adapter}.weight`):
through `torch.func.functional_call` (`lora_unet_prediction`) or `substituted_parameters` (`lora_denoising_loss`).
Gradients flow from the loss through the denoiser's LoRA branches into the basis banks and the resampler(s). The
denoiser's own weights are never written.

Samples whose reference images are the same (equal `reference_key`) share one LoRA and one denoiser call; every other
sample gets its own call (its own identity).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import TrainingDataError
from ..identities.identity import normalize_coefficients
from ..model.predictor import HyperLoRAPredictor
from ..utils.compat import lora_parameter_name, put_parameter, take_parameter
from .families import family_of


def prompt_with_trigger(caption: str, trigger_words: str) -> str:
    """`"{trigger_words}, {caption}"`, unless the caption already starts with the trigger words.

    Example:
        >>> prompt_with_trigger("a photo of a man", "fcsks fxhks fhyks")
        'fcsks fxhks fhyks, a photo of a man'
    """
    trigger_words = trigger_words.strip()
    if not trigger_words or caption.startswith(trigger_words):
        return caption
    return f"{trigger_words}, {caption}" if caption else trigger_words


def identity_groups(reference_keys: list[Any]) -> list[list[int]]:
    """Sample indices grouped by equal reference key, groups in order of first appearance.

    Example:
        >>> identity_groups([(0,), (2,), (0,)])
        [[0, 2], [1]]
    """
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(reference_keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def stage_coefficients(
    predictor: HyperLoRAPredictor, stage: str, branch: str, batch: dict[str, Any], groups: list[list[int]]
) -> torch.Tensor:
    """Normalized coefficients `[num_groups, num_tokens, K]` of `branch` for each identity group.

    The reference images of each group go through the resampler (one call per group, so a sample's numbers do not
    depend on what else is in its batch or on which process it lands), then their coefficients are averaged and
    L2-normalized exactly as `HyperLoRAPredictor.predict` does. ID coefficients in stage `id_clip` are computed
    without the ArcFace condition (attn2 skipped).
    """
    cast = {"device": predictor.device, "dtype": predictor.dtype}

    def features(kind: str, sample: int) -> torch.Tensor | None:
        values = batch.get(kind)
        if values is None:
            raise TrainingDataError(
                f"Stage {stage!r} needs `{kind}` for every sample, but the batch has none. Cache the features with "
                "`cache_features(root, extractor)`, or give every record its `{kind}`."
            )
        return torch.as_tensor(values[sample]).to(**cast)

    def per_image(sample: int) -> torch.Tensor:
        if branch == "base":
            return predictor.forward_base(features("base_clip_hidden_states", sample))
        if stage == "id_clip":
            return predictor.resampler(None, features("clip_hidden_states", sample))
        config = predictor.config
        embeds = features("id_embeds", sample) if config.use_id_embeds else None
        return predictor(embeds, features("clip_hidden_states", sample) if config.use_image_embeds else None)

    means = torch.stack([per_image(group[0]).float().mean(0) for group in groups])
    return normalize_coefficients(means)


def lora_parameters(
    predictor: HyperLoRAPredictor, branch: str, coefficients: torch.Tensor, adapter_name: str
) -> dict[str, torch.Tensor]:
    """`{parameter name: tensor}` that puts the LoRA of `coefficients` `[num_tokens, K]` into a PEFT adapter.

    Names are those of the PEFT layers on the denoiser (`{module path}.lora_A.{adapter_name}.weight` for the
    down factor `[r, in]`, `lora_B` for the up factor `[out, r]`); the tensors keep their autograd history.
    """
    bank = predictor.bank(branch)
    factors = bank.lora_weights(predictor.split_coefficients(coefficients))
    params = {}
    for linear, (down, up) in zip(predictor.config.linears, factors):
        params[lora_parameter_name(linear.module_path, "A", adapter_name)] = down
        params[lora_parameter_name(linear.module_path, "B", adapter_name)] = up
    return params


@dataclass
class EncodedBatch:
    """A batch after the frozen encoders: VAE latents, the prompt embeddings, SDXL's text / size conditions
    (`added_cond_kwargs`) and the pooled text embedding (SD3 / FLUX's `pooled_projections`)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None
    pooled_prompt_embeds: torch.Tensor | None = None


def lora_unet_prediction(
    unet: torch.nn.Module,
    factors: list[dict[str, torch.Tensor]],
    groups: list[list[int]],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoded: EncodedBatch,
) -> torch.Tensor:
    """The denoiser's output for every sample, each identity group with its LoRA factors substituted
    (differentiable), in the latents' layout.

    Args:
        unet: the denoiser (a UNet, or an SD3 / FLUX transformer: called its family's way, see `families`)
            carrying the PEFT adapters the factors are named for (`HyperLoRAAdapters.attach`).
        factors: one `{parameter name: tensor}` per group (`HyperLoRATrainingModule`'s output).
        groups: the samples of each group (`identity_groups`).
        noisy_latents, timesteps: the denoiser's inputs `[B, C, h, w]`, `[B]`.
        encoded: the batch's text and size conditions.
    """
    family = family_of(unet)
    outputs, order = [], []
    for members, params in zip(groups, factors):
        args, kwargs = family.call_inputs(unet, members, noisy_latents, timesteps, encoded)
        output = functional_call(unet, params, args, kwargs, strict=False)
        outputs.append(family.prediction(output, noisy_latents))
        order.extend(members)
    stacked = torch.cat(outputs)
    inverse = torch.argsort(torch.tensor(order, device=stacked.device))
    return stacked[inverse]


@contextmanager
def substituted_parameters(module: torch.nn.Module, params: dict[str, torch.Tensor]):
    """Use `params` (name -> tensor) in place of `module`'s parameters of those names inside the block.

    Unlike `functional_call`, the substitution lasts for the whole block, so a backward pass run inside it sees the
    same tensors when gradient checkpointing recomputes the forward.
    """
    swapped = []
    try:
        for name, value in params.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            # No public API swaps a registered parameter for a plain tensor for longer than one call.
            original = take_parameter(owner, leaf)
            swapped.append((owner, leaf, original))
            setattr(owner, leaf, value)
        yield
    finally:
        for owner, leaf, original in reversed(swapped):
            delattr(owner, leaf)
            put_parameter(owner, leaf, original)


def lora_denoising_loss(
    unet: torch.nn.Module,
    factors: list[dict[str, torch.Tensor]],
    groups: list[list[int]],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoded: EncodedBatch,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's `diffusion_loss`, as a tensor whose backward reaches the predictor through `factors` only.

    `weights` `[B]` scale each sample's squared error (flow matching's loss weighting); `None`: plain MSE.

    The frozen denoiser runs one identity group at a time: its forward *and* backward (down to that group's factors)
    happen while the group's LoRA is substituted into the denoiser, which is what gradient checkpointing needs (it
    recomputes the forward during the backward). The factors' gradients are then attached to the returned
    tensor: its value is the loss, and `accelerator.backward(loss)` carries those gradients into the predictor
    in one backward pass through the prepared (DDP / FSDP / DeepSpeed) module. With grad disabled it is the plain
    loss.
    """
    family = family_of(unet)
    total = target.numel()
    loss = torch.zeros((), device=target.device)
    carrier = torch.zeros((), device=target.device)
    for members, params in zip(groups, factors):
        leaves = {name: t.detach().requires_grad_(t.requires_grad) for name, t in params.items()}
        trained = [name for name, t in params.items() if t.requires_grad]
        args, kwargs = family.call_inputs(unet, members, noisy_latents, timesteps, encoded)
        index = torch.tensor(members, device=target.device)
        with substituted_parameters(unet, leaves):
            prediction = family.prediction(unet(*args, **kwargs), noisy_latents)
            part = _squared_error(prediction, target[index], None if weights is None else weights[index]) / total
            grads = torch.autograd.grad(part, [leaves[name] for name in trained]) if trained else ()
        loss = loss + part.detach()
        for name, grad in zip(trained, grads):
            carrier = carrier + (params[name].float() * grad.float()).sum()
    return carrier - carrier.detach() + loss


def _squared_error(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The summed squared error in float32, each sample's scaled by its weight when given."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="sum")
    errors = (prediction.float() - target.float()) ** 2
    return (weights.float().view(-1, *([1] * (errors.ndim - 1))) * errors).sum()


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 over every element of the batch."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
