"""What a training step does differently per denoiser family, as one small strategy object per family.

- `unet` (`UNet2DConditionModel`: SD 1.5 / 2.x, SDXL): DDPM noise, the target of the scheduler's
  `prediction_type`; the UNet reads the prompt embeddings (and SDXL's pooled embedding and size condition).
- `sd3` (`SD3Transformer2DModel`): flow matching, target `noise - latents`; the transformer reads the prompt
  embeddings and the pooled projection.
- `flux` (`FluxTransformer2DModel`): flow matching on packed 2x2 latent patches with their `img_ids` / `txt_ids`,
  `timestep / 1000`, and `guidance` when the transformer is guidance-distilled.

Flow matching (SD3, FLUX) noises the latents as `x_t = (1 - sigma) * x0 + sigma * noise` with the scheduler's
sigmas, the timestep drawn with diffusers' `compute_density_for_timestep_sampling` and the loss weighted with
`compute_loss_weighting_for_sd3` (diffusers' own SD3 / FLUX training scripts do the same). Every random draw of a
sample comes from that sample's generator: the noise first, then the timestep.

`family_of(denoiser)` picks the family by the denoiser's class; `TRAINING_FAMILIES` lists them.

Example:
    >>> from diffusers_hyperlora.testing import tiny_flux_pipeline
    >>> pipe = tiny_flux_pipeline()
    >>> family_of(pipeline_denoiser(pipe)).name
    'flux'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingConfigError
from ..model.targets import DENOISER_COMPONENTS
from ..utils.compat import flux_latent_image_ids, flux_pack_latents, flux_unpack_latents

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Noised:
    """One batch's noise draw: the noise, the timesteps the denoiser sees, the noisy latents, the regression
    target and the per-sample loss weights (`None`: all ones)."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class DenoiserFamily:
    """What every family says: its name, the pipeline component of its denoiser and the denoiser's class."""

    name: str
    component: str
    denoiser_class: str

    def has_size_condition(self, denoiser: Any) -> bool:
        """Whether the denoiser reads SDXL's size condition (`time_ids`)."""
        return False

    def prediction(self, output: Any, noisy_latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's output (`return_dict=False`) in the latents' layout `[n, C, h, w]`."""
        return output[0]


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
    raise TrainingConfigError(
        f"Unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}. Train with a "
        "noise scheduler of one of these prediction types.",
        argument="noise_scheduler",
    )


@dataclass(frozen=True)
class UNetFamily(DenoiserFamily):
    """SD 1.5 / 2.x / SDXL: a `UNet2DConditionModel` trained with DDPM noise."""

    name: str = "unet"
    component: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"

    # ------------------------------------------------------------------ text
    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_embeds, pooled)` of one prompt; SD 1.5 / 2.x have no pooled embedding: an empty `[1, 0]`."""
        encoded = pipe.encode_prompt(
            prompt=[prompt], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return encoded[0], (encoded[2] if len(encoded) > 2 else encoded[0].new_zeros(1, 0))

    def has_size_condition(self, denoiser: Any) -> bool:
        """SDXL's `text_time` condition (pooled text embedding + original size, crop, target size)."""
        return getattr(denoiser.config, "addition_embed_type", None) == "text_time"

    # ------------------------------------------------------------------ noise
    def training_scheduler(self, pipe: Any) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def add_noise(self, scheduler: Any, latents: torch.Tensor, generators: list[torch.Generator]) -> Noised:
        """Per sample: its noise, then a timestep uniform over the scheduler's training steps."""
        noise = _noise_like(latents, generators)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, steps, (), generator=g) for g in generators]).to(noise.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return Noised(noise, timesteps, noisy, diffusion_target(scheduler, latents, noise, timesteps))

    # ------------------------------------------------------------------ the call
    def call_inputs(
        self, denoiser: Any, members: list[int], noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        index = torch.tensor(members, device=noisy_latents.device)
        kwargs: dict[str, Any] = {"encoder_hidden_states": encoded.prompt_embeds[index], "return_dict": False}
        if encoded.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {k: v[index] for k, v in encoded.added_cond_kwargs.items()}
        return (noisy_latents[index].to(encoded.prompt_embeds.dtype), timesteps[index]), kwargs


@dataclass(frozen=True)
class FlowMatchingFamily(DenoiserFamily):
    """The flow-matching noise of the transformer families (SD3, FLUX).

    `weighting_scheme` (`"logit_normal"`, `"mode"`, `"uniform"`, `"sigma_sqrt"`, `"cosmap"`), `logit_mean`,
    `logit_std` and `mode_scale` are the arguments of diffusers' `compute_density_for_timestep_sampling` and
    `compute_loss_weighting_for_sd3`, with the defaults of diffusers' SD3 / FLUX training scripts.
    """

    name: str = "flow"
    component: str = "transformer"
    denoiser_class: str = ""
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def training_scheduler(self, pipe: Any) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def add_noise(self, scheduler: Any, latents: torch.Tensor, generators: list[torch.Generator]) -> Noised:
        """Per sample: its noise, then `u` from the timestep density; `x_t = (1 - sigma) x0 + sigma noise`."""
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        noise = _noise_like(latents, generators)
        u = torch.cat(
            [
                compute_density_for_timestep_sampling(
                    self.weighting_scheme,
                    1,
                    logit_mean=self.logit_mean,
                    logit_std=self.logit_std,
                    mode_scale=self.mode_scale,
                    generator=g,
                )
                for g in generators
            ]
        )
        steps = scheduler.config.num_train_timesteps
        indices = (u * steps).long().clamp(0, len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(noise.device)
        sigmas = scheduler.sigmas[indices].to(device=noise.device, dtype=latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=sigmas.flatten())
        return Noised(noise, timesteps, noisy, noise - latents, weights.float())


@dataclass(frozen=True)
class SD3Family(FlowMatchingFamily):
    """SD3 / SD3.5: an `SD3Transformer2DModel` (two CLIP text encoders and T5; pooled projection)."""

    name: str = "sd3"
    denoiser_class: str = "SD3Transformer2DModel"

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = pipe.encode_prompt(
            prompt=[prompt],
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return encoded[0], encoded[2]

    def call_inputs(
        self, denoiser: Any, members: list[int], noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        index = torch.tensor(members, device=noisy_latents.device)
        dtype = encoded.prompt_embeds.dtype
        kwargs: dict[str, Any] = {
            "hidden_states": noisy_latents[index].to(dtype),
            "timestep": timesteps[index],
            "encoder_hidden_states": encoded.prompt_embeds[index],
            "pooled_projections": encoded.pooled_prompt_embeds[index],
            "return_dict": False,
        }
        return (), kwargs


@dataclass(frozen=True)
class FluxFamily(FlowMatchingFamily):
    """FLUX.1: a `FluxTransformer2DModel` trained with flow matching on packed 2x2 latent patches.

    `guidance_scale` is what a guidance-distilled transformer (`guidance_embeds`) is told during training (the
    value of diffusers' FLUX training scripts); `max_sequence_length` caps the T5 prompt length (the tokenizer's
    own `model_max_length` when smaller).
    """

    name: str = "flux"
    denoiser_class: str = "FluxTransformer2DModel"
    guidance_scale: float = 3.5
    max_sequence_length: int = 512

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        limit = getattr(getattr(pipe, "tokenizer_2", None), "model_max_length", self.max_sequence_length)
        encoded = pipe.encode_prompt(
            prompt=[prompt],
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=min(self.max_sequence_length, int(limit)),
        )
        return encoded[0], encoded[1]

    def call_inputs(
        self, denoiser: Any, members: list[int], noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        index = torch.tensor(members, device=noisy_latents.device)
        dtype = encoded.prompt_embeds.dtype
        latents = noisy_latents[index].to(dtype)
        height, width = latents.shape[-2:]
        prompt_embeds = encoded.prompt_embeds[index]
        guidance = None
        if getattr(denoiser.config, "guidance_embeds", False):
            guidance = torch.full((len(members),), self.guidance_scale, device=latents.device, dtype=torch.float32)
        kwargs: dict[str, Any] = {
            "hidden_states": flux_pack_latents(latents),
            "timestep": timesteps[index].to(dtype) / 1000,
            "guidance": guidance,
            "pooled_projections": encoded.pooled_prompt_embeds[index],
            "encoder_hidden_states": prompt_embeds,
            "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=dtype),
            "img_ids": flux_latent_image_ids(height // 2, width // 2, latents.device, dtype),
            "return_dict": False,
        }
        return (), kwargs

    def prediction(self, output: Any, noisy_latents: torch.Tensor) -> torch.Tensor:
        height, width = noisy_latents.shape[-2:]
        return flux_unpack_latents(output[0], height, width)


TRAINING_FAMILIES: dict[str, DenoiserFamily] = {
    family.denoiser_class: family for family in (UNetFamily(), SD3Family(), FluxFamily())
}
"""The trainable denoiser families, by denoiser class name."""


def _noise_like(latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    shape = latents.shape[1:]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(latents.device)


def pipeline_denoiser(pipe: Any) -> Any:
    """The pipeline's denoiser (`unet` or `transformer`), or `None` when it has neither."""
    for name in DENOISER_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    return None


def trainable_family(class_name: str) -> DenoiserFamily | None:
    """The family of a denoiser class name (as in a pipeline's `model_index.json`), `None` when not trainable."""
    return TRAINING_FAMILIES.get(class_name)


def family_of(denoiser: Any) -> DenoiserFamily:
    """The training family of `denoiser` (by its class or a base class); `TrainingConfigError` otherwise."""
    for cls in type(denoiser).__mro__:
        family = TRAINING_FAMILIES.get(cls.__name__)
        if family is not None:
            return family
    raise TrainingConfigError(
        f"Training runs on the denoisers {', '.join(TRAINING_FAMILIES)}; this pipeline's is a "
        f"{type(denoiser).__name__}. Train on an SD 1.5 / SD 2.x / SDXL, SD3 or FLUX pipeline (docs/base-models.md).",
        argument="pipe",
    )


__all__ = [
    "TRAINING_FAMILIES",
    "DenoiserFamily",
    "FlowMatchingFamily",
    "FluxFamily",
    "Noised",
    "SD3Family",
    "UNetFamily",
    "family_of",
    "pipeline_denoiser",
    "trainable_family",
]
