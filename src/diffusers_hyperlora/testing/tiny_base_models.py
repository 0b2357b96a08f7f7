"""Tiny SD 1.5, SD3 and FLUX pipelines built in code (random weights, seeded): the stand-ins the tests and the
docs (docs/base-models.md) run HyperLoRA on for base models other than SDXL.

Nothing is downloaded: the CLIP tokenizer is `tiny_clip_tokenizer`'s byte-level vocabulary, the T5 tokenizer of
FLUX a character-level table built with `tokenizers`. The tiny SD3 pipeline has no third (T5) text encoder, which
`StableDiffusion3Pipeline` allows (its T5 embeddings are then zeros).

Example:
    >>> from diffusers_hyperlora.testing import tiny_flux_pipeline, tiny_hyperlora_predictor
    >>> pipe = tiny_flux_pipeline()
    >>> tiny_hyperlora_predictor(pipe.transformer).config.denoiser
    'transformer'
"""

from __future__ import annotations

import torch

from .tiny_models import tiny_clip_text_config, tiny_clip_tokenizer, tiny_unet_vae

TINY_SD15_UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
)
TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=32,
    patch_size=1,
    in_channels=4,
    num_layers=2,  # the last block is `context_pre_only` (no `to_add_out`), as in the real SD3
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    out_channels=4,
)
TINY_T5_MAX_LENGTH = 32
TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)


def tiny_t5_tokenizer():
    """A T5 tokenizer whose vocabulary is `<pad>`, `</s>`, `<unk>`, the word mark `▁` and one token per printable
    character (built offline, with T5's own `Metaspace` splitting, so a saved pipeline reloads it unchanged);
    prompts are at most 32 tokens (`model_max_length`), which is what training encodes them to."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(code), -1.0) for code in range(33, 127)]
    table = Tokenizer(models.Unigram(pieces, unk_id=2))
    table.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    table.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=table,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=TINY_T5_MAX_LENGTH,
    )


def _flow_vae(seed: int, block_out_channels=(4,), latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _eval(components: dict) -> dict:
    """Models built in code start in training mode; loaded ones are in eval mode (no dropout: deterministic)."""
    for value in components.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    return components


def tiny_sd15_components(seed: int = 0) -> dict:
    """The components of a tiny `StableDiffusionPipeline` (SD 1.5 layout: one CLIP text encoder, a UNet)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SD15_UNET_CONFIG)
    torch.manual_seed(seed)
    vae = tiny_unet_vae()
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return _eval(
        {
            "unet": unet,
            "scheduler": scheduler,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        }
    )


def tiny_sd3_components(seed: int = 0, latent_channels: int = 4) -> dict:
    """The components of a tiny `StableDiffusion3Pipeline` (two CLIP text encoders, no T5, an MMDiT).

    `latent_channels=16` (the real SD3's) makes them fit `StableDiffusion3InpaintPipeline`, which needs 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    channels = dict(in_channels=latent_channels, out_channels=latent_channels)
    transformer = SD3Transformer2DModel(**{**TINY_SD3_TRANSFORMER_CONFIG, **channels})
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))
    return _eval(
        {
            "transformer": transformer,
            "scheduler": FlowMatchEulerDiscreteScheduler(),
            "vae": _flow_vae(seed, latent_channels=latent_channels),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer,
            "text_encoder_3": None,
            "tokenizer_3": None,
        }
    )


def tiny_flux_components(seed: int = 0) -> dict:
    """The components of a tiny `FluxPipeline` (a CLIP and a T5 text encoder, a FLUX transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    tokenizer_2 = tiny_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(t5_config)
    return _eval(
        {
            "transformer": transformer,
            "scheduler": FlowMatchEulerDiscreteScheduler(),
            "vae": _flow_vae(seed, latent_channels=1),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2,
        }
    )


def tiny_sd15_pipeline(seed: int = 0, img2img: bool = False):
    """A tiny `StableDiffusionPipeline` (or `StableDiffusionImg2ImgPipeline`) on the CPU."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    return cls(**tiny_sd15_components(seed))


def tiny_sd3_pipeline(seed: int = 0, img2img: bool = False, latent_channels: int = 4):
    """A tiny `StableDiffusion3Pipeline` (or `StableDiffusion3Img2ImgPipeline`) on the CPU."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    return cls(**tiny_sd3_components(seed, latent_channels=latent_channels))


def tiny_flux_pipeline(seed: int = 0, img2img: bool = False):
    """A tiny `FluxPipeline` (or `FluxImg2ImgPipeline`) on the CPU; call it with `max_sequence_length=32`."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    return cls(**tiny_flux_components(seed))
