"""The Hub model card (`README.md`) of a checkpoint in the library's format.

Written by `HyperLoRAPredictor.save_pretrained` / `push_to_hub` and by `convert_checkpoint`, with huggingface_hub's
`ModelCard.from_template` from `model_card_template.md`. The YAML metadata makes the repo discoverable (library,
base model, tags, licence) and carries the trigger words (`instance_prompt`, as LoRA repos on the Hub do) and the
recommended adapter weight.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..model.config import HyperLoRAConfig

LIBRARY_NAME = "diffusers-hyperlora"
CARD_TAGS = ["lora", "text-to-image", "hyperlora", "stable-diffusion-xl", "diffusers"]
PAPER_URL = "https://arxiv.org/abs/2503.16944"
TEMPLATE = Path(__file__).with_name("model_card_template.md")


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
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config
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
    conditions = [name for name, on in (("ArcFace", config.use_id_embeds), ("CLIP", config.use_image_embeds)) if on]
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        config=config,
        repo_id=repo_id or "<your-namespace>/<this-repo>",
        conditions=" + ".join(conditions),
        alpha=f"{config.alpha('id'):g}",
        paper_url=PAPER_URL,
        source=source,
        dtype=dtype,
        license=license,
    )
