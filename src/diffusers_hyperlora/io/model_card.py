"""The Hub model card (`README.md`) of a checkpoint in the library's format.

Written by `HyperLoRAPredictor.save_pretrained` / `push_to_hub` (through `io.own_format.save_pretrained`) and by
`convert_checkpoint`. The YAML metadata makes the repo discoverable (library, base model, tags, licence) and
carries the trigger words (`instance_prompt`, as LoRA repos on the Hub do) and the recommended adapter weight.
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from ..config import HyperLoRAConfig

LIBRARY_NAME = "diffusers-hyperlora"
CARD_TAGS = ["lora", "text-to-image", "hyperlora", "stable-diffusion-xl", "diffusers"]
PAPER_URL = "https://arxiv.org/abs/2503.16944"


def hyperlora_model_card(
    config: HyperLoRAConfig,
    repo_id: str | None = None,
    source: str | None = None,
    dtype: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """A `ModelCard` describing a HyperLoRA checkpoint, with YAML metadata and a usage snippet.

    Args:
        config: the checkpoint's architecture and defaults (licence, trigger words, recommended weight).
        repo_id: the repo the card is for, used in the snippet (default: a placeholder).
        source: where the weights came from (e.g. the release repo and subfolder), mentioned in the card.
        dtype: the storage dtype, mentioned in the card.
        license: overrides `config.license`.

    Example:
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_config
        >>> card = hyperlora_model_card(tiny_hyperlora_config(license="cc-by-nc-4.0"), repo_id="me/hyperlora")
        >>> card.data.library_name, card.data.license, card.data.instance_prompt
        ('diffusers-hyperlora', 'cc-by-nc-4.0', 'fcsks fxhks fhyks')
    """
    license = license or config.license
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=config.base_model,
        license=license,
        tags=list(CARD_TAGS),
        pipeline_tag="text-to-image",
        instance_prompt=config.trigger_words or None,
        recommended_lora_scale=config.default_id_weight,
    )
    repo = repo_id or "<your-namespace>/<this-repo>"
    conditions = [name for name, on in (("ArcFace", config.use_id_embeds), ("CLIP", config.use_image_embeds)) if on]
    lines = [
        "# HyperLoRA for SDXL",
        "",
        "A HyperLoRA hypernetwork ([paper](" + PAPER_URL + ")): it reads face photos and predicts an identity "
        "LoRA for the SDXL UNet in one forward pass, without per-person training. Use it with "
        "[diffusers-hyperlora](https://github.com/diffusers-hyperlora/diffusers-hyperlora).",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionXLPipeline",
        "import diffusers_hyperlora  # adds pipe.load_hyperlora & co.",
        "",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{config.base_model}", torch_dtype=torch.float16)',
        'pipe.to("cuda")',
        f'pipe.load_hyperlora("{repo}", id_weight={config.default_id_weight})',
        'pipe.set_hyperlora_identity(["me_1.jpg", "me_2.jpg"])  # one or more photos of one person',
        f'image = pipe("{config.trigger_words + ", " if config.trigger_words else ""}a portrait photo of a person '
        'in a garden").images[0]',
        "```",
        "",
        "## Details",
        "",
        f"- Trigger words: start prompts with `{config.trigger_words}, `."
        if config.trigger_words
        else "- No trigger words.",
        f"- Recommended LoRA weight: {config.default_id_weight} (0.75-0.85 works well).",
        f"- Base model: `{config.base_model}`; works best on photoreal SDXL fine-tunes.",
        f"- Conditions: {' + '.join(conditions)}; CLIP vision encoder: `{config.image_encoder}`"
        + (f" (subfolder `{config.image_encoder_subfolder}`)" if config.image_encoder_subfolder else "")
        + (
            f"; face models: `{config.face_models}`."
            if config.face_models
            else "; face models: insightface AntelopeV2."
        ),
        f"- {len(config.targets)} attention modules, {config.num_basis} bases, LoRA rank {config.id_rank} "
        f"(alpha {config.alpha('id'):g})" + (f", Base branch rank {config.base_rank}" if config.has_base else "") + ".",
        f"- Resampler: width {config.resampler_dim}, depth {config.resampler_depth}, "
        f"{config.resampler_heads} x {config.resampler_dim_head} heads.",
    ]
    if dtype:
        lines.append(f"- Weights stored as {dtype}.")
    if source:
        lines.append(f"- Converted from `{source}` with `diffusers-hyperlora convert`.")
    if license:
        lines.append(f"- Licence: `{license}` (the licence of the original weights applies).")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)
