"""The frozen encoders' side of a training step: VAE latents, prompt embeddings, caption dropout, noise.

`FrozenEncoders` turns a collated batch into the denoiser's inputs (how depends on the denoiser's family, see
`families`). It can cache what never changes between steps:

- **latents**: the VAE's latent distribution of every image (its mean and log-variance), computed once; each step
  still draws a fresh latent sample from it, so training on the cache is the same as encoding every step.
- **prompt embeddings**: the text encoders' output for every distinct prompt, computed once.

With both caches the VAE and the text encoders do not run per step (and the images are not read either).
Caption dropout replaces a sample's caption by `""` (the trigger words stay) with probability `caption_dropout`.
Every random draw of a sample comes from its own generator (`order.sample_generator`), in a fixed order:
caption dropout, latent sample, noise, timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..utils.compat import sample_latent_distribution
from .data import collate_examples
from .families import family_of, pipeline_denoiser
from .losses import EncodedBatch, prompt_with_trigger


@dataclass
class NoisyBatch:
    """`EncodedBatch` plus what the noise scheduler made of it: noisy latents, timesteps and the noise; the
    regression target and the per-sample loss weights (`None`: all ones)."""

    encoded: EncodedBatch
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class FrozenEncoders:
    """The frozen VAE and text encoders of `pipe`, with optional caches.

    Args:
        pipe: an SD 1.5 / SD 2.x / SDXL, SD3 or FLUX pipeline (`vae`, `encode_prompt`, `unet` or `transformer`).
        trigger_words: prepended to every caption (`prompt_with_trigger`).
        device, dtype: where the denoiser runs and its dtype (prompt embeddings are cast to it).
        caption_dropout: probability of dropping a sample's caption.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline
        >>> from diffusers_hyperlora.training import FrozenEncoders, tiny_training_dataset
        >>> encoders = FrozenEncoders(tiny_sdxl_pipeline(), "fcsks", torch.device("cpu"), torch.float32)
        >>> encoders.cache(tiny_training_dataset(), latents=True, prompts=True)
        >>> encoders.needs_pixels
        False
    """

    def __init__(
        self,
        pipe: Any,
        trigger_words: str,
        device: torch.device,
        dtype: torch.dtype,
        caption_dropout: float = 0.0,
    ) -> None:
        self.pipe, self.trigger_words = pipe, trigger_words
        self.denoiser = pipeline_denoiser(pipe)
        self.family = family_of(self.denoiser)
        self.device, self.dtype, self.caption_dropout = device, dtype, caption_dropout
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.time_ids_cache: dict[int, list[int]] = {}
        self.prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def needs_pixels(self) -> bool:
        """Whether batches must carry `pixel_values` (no latent cache)."""
        return not self.latent_cache

    # ------------------------------------------------------------------ caches
    @torch.no_grad()
    def cache(self, dataset: Any, *, latents: bool, prompts: bool, batch_size: int = 8) -> None:
        """Encode every image (`latents`) and every distinct prompt (`prompts`) of `dataset` once."""
        if not (latents or prompts):
            return
        captions: list[str] = []
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            batch = collate_examples([_item(dataset, i, with_pixels=latents) for i in indices])
            captions.extend(batch["caption"])
            if latents:
                parameters = self._latent_parameters_from_pixels(batch["pixel_values"]).cpu()
                for row, index in enumerate(indices):
                    self.latent_cache[index] = parameters[row]
                    self.time_ids_cache[index] = _time_ids(batch, row)
        if prompts:
            texts = {prompt_with_trigger(c, self.trigger_words) for c in captions}
            if self.caption_dropout > 0:
                texts.add(prompt_with_trigger("", self.trigger_words))
            ordered = sorted(texts)
            for start in range(0, len(ordered), batch_size):
                chunk = ordered[start : start + batch_size]
                embeds, pooled = self._encode_prompts(chunk)
                for row, text in enumerate(chunk):
                    self.prompt_cache[text] = (embeds[row].cpu(), pooled[row].cpu())

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generators: list[torch.Generator]) -> EncodedBatch:
        """Latents (sampled with each sample's generator) and conditions of `batch`, with caption dropout."""
        dropped = [bool(torch.rand((), generator=g) < self.caption_dropout) for g in generators]
        captions = ["" if drop else caption for drop, caption in zip(dropped, batch["caption"])]
        embeds, pooled = self._prompt_embeddings([prompt_with_trigger(c, self.trigger_words) for c in captions])
        parameters = self._latent_parameters(batch)
        latents = self._scaled(sample_latent_distribution(parameters, generators))
        pooled = pooled.to(device=self.device, dtype=self.dtype)
        added = None
        if self.family.has_size_condition(self.denoiser):
            added = {
                "text_embeds": pooled,
                "time_ids": torch.tensor(self._batch_time_ids(batch), device=self.device, dtype=self.dtype),
            }
        embeds = embeds.to(self.device, self.dtype)
        return EncodedBatch(latents=latents, prompt_embeds=embeds, added_cond_kwargs=added, pooled_prompt_embeds=pooled)

    def noisy_batch(self, batch: dict[str, Any], generators: list[torch.Generator], noise_scheduler: Any) -> NoisyBatch:
        """`encode`, then each sample's noise and timestep, the noisy latents and the target, as the denoiser's
        family trains (UNets: DDPM, timesteps uniform over the scheduler's training steps; SD3 / FLUX: flow
        matching; see `families`)."""
        encoded = self.encode(batch, generators)
        noised = self.family.add_noise(noise_scheduler, encoded.latents, generators)
        return NoisyBatch(
            encoded=encoded,
            noise=noised.noise,
            timesteps=noised.timesteps,
            noisy_latents=noised.noisy_latents,
            target=noised.target,
            weights=noised.weights,
        )

    # ------------------------------------------------------------------ pieces
    def _latent_parameters_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """One image at a time, so a sample's latents do not depend on its batch (or on caching)."""
        vae = self.pipe.vae
        pixels = pixels.to(device=self.device, dtype=vae.dtype)
        return torch.cat([vae.encode(image[None]).latent_dist.parameters for image in pixels])

    def _latent_parameters(self, batch: dict[str, Any]) -> torch.Tensor:
        if "pixel_values" in batch:
            return self._latent_parameters_from_pixels(batch["pixel_values"])
        vae = self.pipe.vae
        return torch.stack([self.latent_cache[i] for i in batch["index"]]).to(self.device, vae.dtype)

    def _scaled(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * config.scaling_factor).float()

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt at a time, for the same reason, with the pipeline's own `encode_prompt` (called the family's
        way). SD 1.5 / 2.x pipelines have no pooled embedding: an empty `[1, 0]` stands for it (their UNet reads
        none)."""
        encoded = [self.family.encode_prompt(self.pipe, prompt, self.device) for prompt in prompts]
        return torch.cat([e for e, _ in encoded]), torch.cat([p for _, p in encoded])

    def _prompt_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prompt_cache:
            embeds = torch.stack([self.prompt_cache[p][0] for p in prompts])
            pooled = torch.stack([self.prompt_cache[p][1] for p in prompts])
            return embeds.to(self.device), pooled.to(self.device)
        return self._encode_prompts(prompts)

    def _batch_time_ids(self, batch: dict[str, Any]) -> list[list[int]]:
        if "original_size" in batch:
            return [_time_ids(batch, row) for row in range(len(batch["caption"]))]
        return [self.time_ids_cache[i] for i in batch["index"]]


def _item(dataset: Any, index: int, with_pixels: bool) -> dict[str, Any]:
    item_of = getattr(dataset, "item", None)
    if item_of is not None:
        return item_of(index, with_pixels=with_pixels)
    return dataset[index]


def _time_ids(batch: dict[str, Any], row: int) -> list[int]:
    """SDXL's size condition: original size, crop top-left, target size."""
    target = tuple(batch["pixel_values"].shape[-2:])
    return list(batch["original_size"][row]) + list(batch["crop_top_left"][row]) + list(target)


@torch.no_grad()
def encode_batch(
    pipe: Any,
    batch: dict[str, Any],
    trigger_words: str,
    device: torch.device,
    dtype: torch.dtype,
    generators: list[torch.Generator] | None = None,
) -> EncodedBatch:
    """VAE latents (scaled) and prompt embeddings (trigger words prepended) with the frozen pipeline models.

    `added_cond_kwargs` (`text_embeds`: pooled text embedding, `time_ids`: original size, crop, target size) is
    given when the UNet has SDXL's `text_time` conditioning, else `None`; `pooled_prompt_embeds` is the pooled text
    embedding (SD3 / FLUX read it as `pooled_projections`). `generators` (one per sample) draw the
    latent samples; by default, generators seeded from `torch`'s global random state.
    """
    if generators is None:
        seeds = torch.randint(0, 2**62, (len(batch["caption"]),)).tolist()
        generators = [torch.Generator().manual_seed(s) for s in seeds]
    return FrozenEncoders(pipe, trigger_words, device, dtype).encode(batch, generators)


__all__ = ["FrozenEncoders", "NoisyBatch", "encode_batch"]
