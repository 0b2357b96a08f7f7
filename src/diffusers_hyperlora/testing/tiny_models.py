"""A built-in tiny SDXL pipeline and HyperLoRA, built in code: for the demo, the tests and the docs.

Nothing is downloaded. The UNet is the one the `official-tiny` fixture was made for (diffusers' SDXL test
config); the tokenizers have a byte-level vocabulary, read from files in a temporary folder that is removed again
(nothing is left in the temp dir).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..model.config import HyperLoRAConfig
from ..model.predictor import HyperLoRAPredictor

TINY_UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
)


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def tiny_clip_tokenizer(folder: str | Path | None = None):
    """A `CLIPTokenizer` whose vocabulary is the 256 byte symbols (each alone and word-final) + specials.

    Args:
        folder: where to write `vocab.json` and `merges.txt` (kept). Default: a temporary folder, removed once the
            tokenizer has read them (the tokenizer holds its vocabulary in memory).
    """
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="hyperlora-tiny-tokenizer-") as temporary:
            return tiny_clip_tokenizer(temporary)
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # clean_up_tokenization_spaces as in the real CLIP tokenizers (transformers 4.45 warns when it is left unset)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, clean_up_tokenization_spaces=True
    )


def tiny_clip_text_config(tokenizer, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A tiny `CLIPTextConfig` for `tokenizer` (the text encoders of every tiny pipeline)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=num_hidden_layers,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=hidden_size,
    )


def tiny_unet_vae(**overrides):
    """The tiny `AutoencoderKL` (4 latent channels, 2x downscaling) of the tiny UNet pipelines (SDXL, SD 1.5)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        **overrides,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The components of a tiny `StableDiffusionXLPipeline` (random weights, seeded)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(seed)
    vae = tiny_unet_vae(sample_size=128)
    tokenizer = tiny_clip_tokenizer()
    text_config = tiny_clip_text_config(tokenizer, num_hidden_layers=5)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
    }


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny `StableDiffusionXLPipeline` on the CPU."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed))


def tiny_hyperlora_config(unet=None, **overrides) -> HyperLoRAConfig:
    """The `official-tiny` fixture's architecture (K 8, rank 8, D 32, E 48, depth 2), targeting the denoiser `unet`
    (any `HyperLoRAConfig.from_denoiser` supports: a UNet, an SD3 or FLUX transformer; default: the tiny SDXL UNet)."""
    if unet is None:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    values = dict(
        num_basis=8,
        id_rank=8,
        resampler_dim=32,
        resampler_depth=2,
        resampler_heads=12,
        resampler_dim_head=64,
        resampler_ff_mult=4,
        num_id_tokens=4,
        image_embed_dim=48,
    )
    values.update(overrides)
    if "targets" in values:  # explicit targets (e.g. a deliberately mismatched layer) win over the denoiser's
        return HyperLoRAConfig(**values)
    return HyperLoRAConfig.from_denoiser(unet, **values)


def tiny_hyperlora_predictor(unet=None, seed: int = 0, **overrides) -> HyperLoRAPredictor:
    """A randomly initialized tiny predictor (seeded) for the denoiser `unet` (a UNet, an SD3 or FLUX transformer;
    default: the tiny SDXL UNet)."""
    torch.manual_seed(seed)
    return HyperLoRAPredictor(tiny_hyperlora_config(unet, **overrides)).eval()
