"""Helpers shared by the training tests (tests/test_training.py, tests/test_cli_train.py, tests/test_base_models.py):
a stand-in face pipeline, an interruption for resume tests, and the data and measures of the learning tests."""

from __future__ import annotations

import json

import torch
from diffusers import DDPMScheduler
from PIL import Image

from diffusers_hyperlora import HyperLoRAFeatures
from diffusers_hyperlora.training import (
    FrozenEncoders,
    StageConfig,
    cache_features,
    collate_examples,
    diffusion_loss,
    diffusion_target,
    family_of,
    hyperlora_unet_prediction,
    pipeline_denoiser,
    sample_generator,
    tiny_training_dataset,
)
from diffusers_hyperlora.training.loop import training_adapters

CPU = torch.device("cpu")


class MeanColourFeatures:
    """A stand-in face pipeline: features are a fixed function of each image's mean colour."""

    def __call__(self, images, *, device, dtype, with_base, **options):
        colours = torch.stack(
            [torch.tensor(Image.open(i).convert("RGB").resize((1, 1)).getpixel((0, 0))) for i in images]
        )
        colours = colours.float() / 255
        embeds = torch.nn.functional.normalize(colours.repeat(1, 171)[:, :512], dim=-1)
        clip = colours.repeat(1, 16)[:, None, :48].expand(-1, 17, -1).contiguous()
        return HyperLoRAFeatures(embeds, clip, clip * 0.5 if with_base else None, [str(i) for i in images])


COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def colour_dataset(root, colours=COLOURS):
    """A dataset folder of plain-coloured 40 px images, two people (image i is person `p{i % 2}`), with its
    feature cache written by `MeanColourFeatures`."""
    root.mkdir()
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 40), colour).save(root / f"{i}.png")
        rows.append({"file": f"{i}.png", "person": f"p{i % 2}", "caption": "a photo of a person"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache_features(root, MeanColourFeatures(), progress=False)
    return root


class Interrupt(Exception):
    """Raised from a training callback to stop a stage midway (as a crash or Ctrl-C would)."""


def resume_config(tmp_path, stage: str = "id_clip", **overrides) -> StageConfig:
    """`stage` (`id_clip`), 4 steps of 2 micro-batches of 1 image, a checkpoint every step, caption dropout."""
    settings = dict(
        steps=4,
        batch_size=1,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        save_every=1,
        num_references=2,
        caption_dropout=0.5,
        show_progress=False,
        output_dir=str(tmp_path),
    )
    return StageConfig(stage, **(settings | overrides))


def distinct_people(num_people, images_per_person, resolution):
    """Synthetic identities: a flat colour per person plus per-image pixel noise, with tiny_training_dataset's
    per-person feature signatures; one caption for everyone, so only the predicted LoRA can tell people apart."""
    colours = [(220, 60, 40), (40, 90, 220), (60, 200, 80)]
    data = tiny_training_dataset(
        num_people=num_people,
        images_per_person=images_per_person,
        resolution=resolution,
        with_base=False,
        captions=lambda person, view: "a photo of a person",
        seed=3,
    )
    generator = torch.Generator().manual_seed(0)
    for index, record in enumerate(data.records):
        colour = torch.tensor(colours[index // images_per_person], dtype=torch.float32)
        pixels = colour + 12 * torch.randn(resolution, resolution, 3, generator=generator)
        record.image = pixels.clamp(0, 255).round().to(torch.uint8).numpy()
    return data


def denoising_losses(pipe, predictor, data, held_out, lora_source, draws=8):
    """Denoising loss of each held-out image at timesteps 600..999 (fixed noise), with the ID-LoRA predicted from
    `lora_source(i)`'s features (`None`: no LoRA). For UNet pipelines (DDPM noise)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders = FrozenEncoders(pipe, predictor.config.trigger_words, CPU, torch.float32)
    losses = []
    for i in held_out:
        batch = collate_examples([data[i]] * draws)
        noisy = encoders.noisy_batch(batch, [sample_generator(123, d, i) for d in range(draws)], scheduler)
        timesteps = torch.linspace(600, 999, draws).long()
        latents = scheduler.add_noise(noisy.encoded.latents, noisy.noise, timesteps)
        target = diffusion_target(scheduler, noisy.encoded.latents, noisy.noise, timesteps)
        source = lora_source(i)
        with torch.no_grad(), training_adapters(pipe, predictor, StageConfig("id_clip", output_dir="x")) as names:
            if source is None:
                pipe.unet.set_adapters([names["id"]], [0.0])
                conditions = dict(
                    encoder_hidden_states=noisy.encoded.prompt_embeds,
                    added_cond_kwargs=noisy.encoded.added_cond_kwargs,
                )
                prediction = pipe.unet(latents, timesteps, **conditions).sample
            else:
                features = collate_examples([data[source]] * draws)
                features["reference_key"] = [(source,)] * draws
                args = (pipe.unet, predictor, "id_clip", features, latents, timesteps, noisy.encoded, names)
                prediction = hyperlora_unet_prediction(*args)
        losses.append(diffusion_loss(prediction, target).item())
    return torch.tensor(losses)


def flow_denoising_losses(pipe, predictor, data, held_out, lora_source, draws=8):
    """`denoising_losses` for the flow-matching pipelines (SD3, FLUX): the velocity loss of each held-out image at
    sigmas 0.6..1.0 (fixed noise), with the ID-LoRA predicted from `lora_source(i)`'s features (`None`: the LoRA
    at weight 0, i.e. none)."""
    denoiser = pipeline_denoiser(pipe)
    scheduler = family_of(denoiser).training_scheduler(pipe)
    encoders = FrozenEncoders(pipe, predictor.config.trigger_words, CPU, torch.float32)
    losses = []
    for i in held_out:
        batch = collate_examples([data[i]] * draws)
        noisy = encoders.noisy_batch(batch, [sample_generator(123, d, i) for d in range(draws)], scheduler)
        sigmas = torch.linspace(0.6, 1.0, draws).view(-1, 1, 1, 1)
        latents = (1 - sigmas) * noisy.encoded.latents + sigmas * noisy.noise
        target = noisy.noise - noisy.encoded.latents
        source = lora_source(i)
        with torch.no_grad(), training_adapters(pipe, predictor, StageConfig("id_clip", output_dir="x")) as names:
            if source is None:
                denoiser.set_adapters([names["id"]], [0.0])
                source = i
            features = collate_examples([data[source]] * draws)
            features["reference_key"] = [(source,)] * draws
            timesteps = sigmas.flatten() * scheduler.config.num_train_timesteps
            args = (denoiser, predictor, "id_clip", features, latents, timesteps, noisy.encoded, names)
            prediction = hyperlora_unet_prediction(*args)
        losses.append(diffusion_loss(prediction, target).item())
    return torch.tensor(losses)
