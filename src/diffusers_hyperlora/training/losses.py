"""The differentiable training forward: features -> coefficients -> LoRA -> UNet -> noise-prediction loss.

The predicted LoRA factors enter the UNet through `torch.func.functional_call`: the PEFT adapters registered by
`HyperLoRAAdapters.attach` provide the slots (`{module}.lora_A.{adapter}.weight`, `{module}.lora_B.{adapter}.weight`),
and each call substitutes the predicted tensors for them, so gradients flow from the loss through the UNet's
LoRA branches into the basis banks and the resampler(s). The UNet's own weights are never written.

Samples whose reference images are the same (equal `reference_key`) share one LoRA and one UNet call; every other
sample gets its own call (its own identity).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import TrainingConfigError, TrainingDataError
from ..identity import normalize_coefficients
from ..predictor import HyperLoRAPredictor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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

    The reference images of a group go through the resampler together with every other group's (one call), then
    their coefficients are averaged and L2-normalized exactly as `HyperLoRAPredictor.predict` does.
    ID coefficients in stage `id_clip` are computed without the ArcFace condition (attn2 skipped).
    """
    cast = {"device": predictor.device, "dtype": predictor.dtype}
    first = [group[0] for group in groups]

    def gather(kind: str) -> tuple[torch.Tensor, list[int]]:
        values = batch.get(kind)
        if values is None:
            raise TrainingDataError(f"Stage {stage!r} needs `{kind}` for every sample, but the batch has none.")
        chosen = [torch.as_tensor(values[i]) for i in first]
        return torch.cat(chosen).to(**cast), [v.shape[0] for v in chosen]

    if branch == "base":
        states, counts = gather("base_clip_hidden_states")
        per_image = predictor.forward_base(states)
    elif stage == "id_clip":
        states, counts = gather("clip_hidden_states")
        per_image = predictor.resampler(None, states)
    else:
        embeds, counts = gather("id_embeds") if predictor.config.use_id_embeds else (None, None)
        states, clip_counts = gather("clip_hidden_states") if predictor.config.use_image_embeds else (None, None)
        counts = counts or clip_counts
        per_image = predictor(embeds, states)
    means = torch.stack([chunk.float().mean(0) for chunk in per_image.split(counts)])
    return normalize_coefficients(means)


def lora_parameters(
    predictor: HyperLoRAPredictor, branch: str, coefficients: torch.Tensor, adapter_name: str
) -> dict[str, torch.Tensor]:
    """`{parameter name: tensor}` that puts the LoRA of `coefficients` `[num_tokens, K]` into a PEFT adapter.

    Names are those of the PEFT layers on the UNet (`{module path}.lora_A.{adapter_name}.weight` for the
    down factor `[r, in]`, `lora_B` for the up factor `[out, r]`); the tensors keep their autograd history.
    """
    bank = predictor.bank(branch)
    factors = bank.lora_weights(predictor.split_coefficients(coefficients))
    params = {}
    for linear, (down, up) in zip(predictor.config.linears, factors):
        params[f"{linear.module_path}.lora_A.{adapter_name}.weight"] = down
        params[f"{linear.module_path}.lora_B.{adapter_name}.weight"] = up
    return params


@dataclass
class EncodedBatch:
    """A batch after the frozen encoders: VAE latents and SDXL's text / size conditions."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None


@torch.no_grad()
def encode_batch(
    pipe: Any, batch: dict[str, Any], trigger_words: str, device: torch.device, dtype: torch.dtype
) -> EncodedBatch:
    """VAE latents (scaled) and prompt embeddings (trigger words prepended) with the frozen pipeline models.

    `added_cond_kwargs` (`text_embeds`: pooled text embedding, `time_ids`: original size, crop, target size) is
    given when the UNet has SDXL's `text_time` conditioning, else `None`.
    """
    vae = pipe.vae
    pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    latents = (latents * vae.config.scaling_factor).float()
    prompts = [prompt_with_trigger(caption, trigger_words) for caption in batch["caption"]]
    encoded = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    prompt_embeds = encoded[0].to(dtype)
    added = None
    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        target = tuple(batch["pixel_values"].shape[-2:])
        time_ids = [list(o) + list(c) + list(target) for o, c in zip(batch["original_size"], batch["crop_top_left"])]
        added = {
            "text_embeds": encoded[2].to(device=device, dtype=dtype),
            "time_ids": torch.tensor(time_ids, device=device, dtype=dtype),
        }
    return EncodedBatch(latents=latents, prompt_embeds=prompt_embeds, added_cond_kwargs=added)


def diffusion_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict under the scheduler's `prediction_type`."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise TrainingConfigError(f"Unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def _group_lora_parameters(
    predictor: HyperLoRAPredictor, stage: str, batch: dict[str, Any], adapter_names: dict[str, str]
):
    """`(sample indices, {parameter name: tensor})` for every identity group of the batch."""
    groups = identity_groups(batch["reference_key"])
    branches: list[tuple[str, bool]] = [("base", True)] if stage == "base" else [("id", True)]
    if stage != "base" and predictor.config.has_base:
        branches.append(("base", False))
    grad = torch.is_grad_enabled()
    per_branch = {}
    for branch, trains in branches:
        with torch.set_grad_enabled(trains and grad):
            per_branch[branch] = stage_coefficients(predictor, stage, branch, batch, groups)
    for g, members in enumerate(groups):
        params: dict[str, torch.Tensor] = {}
        for branch, trains in branches:
            with torch.set_grad_enabled(trains and grad):
                params.update(lora_parameters(predictor, branch, per_branch[branch][g], adapter_names[branch]))
        yield members, params


def _unet_inputs(
    members: list[int], noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedBatch
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    index = torch.tensor(members, device=noisy_latents.device)
    kwargs: dict[str, Any] = {"encoder_hidden_states": encoded.prompt_embeds[index], "return_dict": False}
    if encoded.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = {k: v[index] for k, v in encoded.added_cond_kwargs.items()}
    return (noisy_latents[index].to(encoded.prompt_embeds.dtype), timesteps[index]), kwargs


def hyperlora_unet_prediction(
    unet: torch.nn.Module,
    predictor: HyperLoRAPredictor,
    stage: str,
    batch: dict[str, Any],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoded: EncodedBatch,
    adapter_names: dict[str, str],
) -> torch.Tensor:
    """The UNet's output for every sample with its predicted LoRA(s) substituted in (differentiable).

    Stage `base` predicts the Base LoRA (with gradients); stages `id_clip` / `id_full` predict the ID LoRA (with
    gradients) and, when the predictor has a Base branch, the frozen Base LoRA (without). The adapters' weights
    and which are active are whatever the UNet's PEFT layers are set to (the training loop sets them per stage).

    Args:
        unet: the UNet carrying the adapters of `HyperLoRAAdapters.attach`.
        predictor: the hypernetwork.
        stage: `"base"`, `"id_clip"` or `"id_full"`.
        batch: a collated batch (features per sample, `reference_key`).
        noisy_latents, timesteps: the UNet's inputs `[B, C, h, w]`, `[B]`.
        encoded: the batch's text and size conditions.
        adapter_names: `{"id": ..., "base": ...}` adapter names on the UNet.
    """
    outputs, order = [], []
    for members, params in _group_lora_parameters(predictor, stage, batch, adapter_names):
        args, kwargs = _unet_inputs(members, noisy_latents, timesteps, encoded)
        outputs.append(functional_call(unet, params, args, kwargs, strict=False)[0])
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
            original = owner._parameters.pop(leaf)
            swapped.append((owner, leaf, original))
            setattr(owner, leaf, value)
        yield
    finally:
        for owner, leaf, original in reversed(swapped):
            delattr(owner, leaf)
            owner._parameters[leaf] = original


def hyperlora_loss_backward(
    unet: torch.nn.Module,
    predictor: HyperLoRAPredictor,
    stage: str,
    batch: dict[str, Any],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoded: EncodedBatch,
    adapter_names: dict[str, str],
    target: torch.Tensor,
    backward: Callable[..., None],
) -> torch.Tensor:
    """`diffusion_loss` of `hyperlora_unet_prediction`, back-propagated one identity group at a time.

    Each group's forward *and* backward run while its LoRA is substituted into the UNet, which is what gradient
    checkpointing needs (it recomputes the forward during the backward pass). The gradients equal those of
    `diffusion_loss(hyperlora_unet_prediction(...), target).backward()`.

    Args:
        backward: called as `backward(loss_part, retain_graph=...)`, e.g. `accelerator.backward`.

    Returns:
        The (detached) loss of the whole batch.
    """
    total = target.numel()
    groups = list(_group_lora_parameters(predictor, stage, batch, adapter_names))
    loss = torch.zeros((), device=target.device)
    for g, (members, params) in enumerate(groups):
        args, kwargs = _unet_inputs(members, noisy_latents, timesteps, encoded)
        index = torch.tensor(members, device=target.device)
        with substituted_parameters(unet, params):
            pred = unet(*args, **kwargs)[0]
            part = F.mse_loss(pred.float(), target[index].float(), reduction="sum") / total
            backward(part, retain_graph=g < len(groups) - 1)
        loss = loss + part.detach()
    return loss


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 over every element of the batch."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
