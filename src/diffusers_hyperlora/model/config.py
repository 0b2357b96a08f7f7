"""`HyperLoRAConfig`: every number of a HyperLoRA architecture, and its `config.json` form."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from ..errors import CheckpointFormatError, InvalidArgumentError
from .targets import (
    ATTENTION_LINEARS,
    LAYOUTS_BY_COMPONENT,
    TargetLinear,
    TargetModule,
    denoiser_layout,
    target_linears,
    targets_from_denoiser,
)

DEFAULT_TRIGGER_WORDS = "fcsks fxhks fhyks"
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1  # of config.json; a newer one is refused

_POSITIVE_INTS = (
    "num_basis id_rank resampler_dim resampler_depth resampler_heads resampler_dim_head resampler_ff_mult "
    "num_id_tokens id_embed_dim image_embed_dim"
).split()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target(entry: TargetModule | dict) -> TargetModule:
    target = TargetModule(**entry) if isinstance(entry, dict) else entry
    widths = (target.hidden_size, target.context_size) if isinstance(target, TargetModule) else ()
    if not widths or not all(_is_int(width) and width > 0 for width in widths):
        raise InvalidArgumentError(
            "HyperLoRAConfig.targets entries must be target modules with a positive integer hidden_size and "
            f"cross_attention_dim (or null for self-attention), got {entry!r}.",
            argument="targets",
        )
    return target


@dataclass
class HyperLoRAConfig:
    """The architecture of a HyperLoRA predictor.

    The defaults are the public release's numbers (K = 128 bases, ID rank 8, resampler 1024 wide, 4 layers of
    12 x 64 heads). `targets` is the ordered list of attention modules (the release's JSON order): entry `i`
    owns resampler tokens `[tokens_per_module * i, tokens_per_module * (i + 1))`.

    Example:
        >>> from diffusers_hyperlora import HyperLoRAConfig
        >>> from diffusers_hyperlora.model.targets import TargetModule
        >>> name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1"
        >>> config = HyperLoRAConfig(targets=[TargetModule(name, hidden_size=64)])
        >>> config.num_tokens, config.has_base
        (8, False)
    """

    targets: list[TargetModule] = field(default_factory=list)
    num_basis: int = 128
    id_rank: int = 8
    base_rank: int = 0  # 0: no Base branch (the public release)
    lora_alpha_ratio: float = 0.5  # alpha = ratio * rank; the release uses alpha = rank / 2
    resampler_dim: int = 1024
    resampler_depth: int = 4
    resampler_heads: int = 12
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    num_id_tokens: int = 16
    id_embed_dim: int = 512
    image_embed_dim: int = 1024  # CLIP hidden size, the resampler's input width
    use_id_embeds: bool = True  # ArcFace condition (attn2 of each resampler layer)
    use_image_embeds: bool = True  # CLIP condition (attn3 of each resampler layer)
    trigger_words: str = DEFAULT_TRIGGER_WORDS
    default_id_weight: float = 0.8
    default_base_weight: float = 0.25
    image_encoder: str = DEFAULT_IMAGE_ENCODER  # repo id, or a subfolder of the checkpoint's repo
    image_encoder_subfolder: str | None = None
    face_models: str | None = None  # subfolder of the checkpoint's repo or an insightface root
    base_model: str = DEFAULT_BASE_MODEL
    license: str | None = None
    denoiser: str = "unet"  # the pipeline component the targets live in: "unet" or "transformer"

    def __post_init__(self) -> None:
        if not isinstance(self.targets, list):
            raise InvalidArgumentError(
                f"HyperLoRAConfig.targets must be a list of target modules, got {self.targets!r}.", argument="targets"
            )
        self.targets = [_target(t) for t in self.targets]
        if not (isinstance(self.use_id_embeds, bool) and isinstance(self.use_image_embeds, bool)):
            raise InvalidArgumentError(
                "HyperLoRAConfig.use_id_embeds and use_image_embeds must be true or false.",
                argument="use_id_embeds" if not isinstance(self.use_id_embeds, bool) else "use_image_embeds",
            )
        if not (self.use_id_embeds or self.use_image_embeds):
            raise InvalidArgumentError(
                "HyperLoRAConfig needs at least one condition: use_id_embeds or use_image_embeds.",
                argument="use_id_embeds",
            )
        for name in _POSITIVE_INTS:
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise InvalidArgumentError(
                    f"HyperLoRAConfig.{name} must be a positive integer, got {getattr(self, name)!r}.", argument=name
                )
        if self.denoiser not in LAYOUTS_BY_COMPONENT:
            raise InvalidArgumentError(
                f"HyperLoRAConfig.denoiser must be one of {list(LAYOUTS_BY_COMPONENT)} (the pipeline component the "
                f"targets live in), got {self.denoiser!r}.",
                argument="denoiser",
            )
        if not _is_int(self.base_rank) or self.base_rank < 0:
            raise InvalidArgumentError(
                f"HyperLoRAConfig.base_rank must be an integer >= 0 (0 = no Base branch), got {self.base_rank!r}.",
                argument="base_rank",
            )

    @property
    def has_base(self) -> bool:
        return self.base_rank > 0

    @property
    def tokens_per_module(self) -> int:
        """Two coefficient tokens (down, up) for each LoRA'd linear of a default (q, k, v, out) module."""
        return 2 * len(ATTENTION_LINEARS)

    @property
    def num_tokens(self) -> int:
        """Two coefficient tokens (down, up) for each LoRA'd linear, module by module."""
        return 2 * sum(len(target.linear_names) for target in self.targets)

    @property
    def lora_formats(self) -> tuple[str, ...]:
        """The LoRA file layouts exports of this checkpoint can be written in (`kohya` only for UNets)."""
        return LAYOUTS_BY_COMPONENT[self.denoiser].lora_formats

    @property
    def linears(self) -> list[TargetLinear]:
        return target_linears(self.targets)

    def alpha(self, branch: str = "id") -> float:
        return self.lora_alpha_ratio * self.rank(branch)

    def rank(self, branch: str = "id") -> int:
        if branch == "id":
            return self.id_rank
        if branch == "base":
            return self.base_rank
        raise InvalidArgumentError(f"branch must be 'id' or 'base', got {branch!r}.", argument="branch")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = [target.to_dict() for target in self.targets]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperLoRAConfig:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_denoiser(
        cls, denoiser: Any, linears: tuple[str, ...] | list[str] | None = None, **sizes: Any
    ) -> HyperLoRAConfig:
        """A config targeting every attention module of `denoiser` (a diffusers `UNet2DConditionModel`,
        `SD3Transformer2DModel` or `FluxTransformer2DModel`; see `DENOISER_LAYOUTS`).

        `linears` chooses the linears of each attention module (default: the denoiser's layout, e.g. the
        joint-attention context projections too for SD3 / FLUX); `sizes` are the other fields (`num_basis`, ...).

        Example:
            >>> from diffusers_hyperlora import HyperLoRAConfig
            >>> from diffusers_hyperlora.testing.tiny_base_models import tiny_sd3_components
            >>> config = HyperLoRAConfig.from_denoiser(tiny_sd3_components()["transformer"], num_basis=8)
            >>> config.denoiser, len(config.targets), len(config.linears), config.num_tokens
            ('transformer', 2, 15, 30)
        """
        layout = denoiser_layout(denoiser)
        return cls(targets=targets_from_denoiser(denoiser, linears), denoiser=layout.component, **sizes)

    def architecture_hash(self) -> str:
        """A short digest of everything that decides tensor shapes and token order (not trigger words etc.)."""
        keys = (
            "targets num_basis id_rank base_rank resampler_dim resampler_depth resampler_heads resampler_dim_head "
            "resampler_ff_mult num_id_tokens id_embed_dim image_embed_dim use_id_embeds use_image_embeds"
        ).split()
        # `denoiser` is left out: it decides no shape, and older configs (all UNet) keep their hash.
        data = {k: v for k, v in self.to_dict().items() if k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ config.json
    def to_json_dict(self) -> dict[str, Any]:
        """The content of `config.json`: the fields plus `_class_name`, `_format_version`, `_library_version`.

        Example:
            >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config
            >>> data = tiny_hyperlora_config().to_json_dict()
            >>> data["_class_name"], data["num_basis"], len(data["targets"])
            ('HyperLoRAPredictor', 8, 24)
        """
        try:
            version = metadata.version("diffusers-hyperlora")
        except metadata.PackageNotFoundError:  # running from a source tree
            version = "unknown"
        header = {"_class_name": "HyperLoRAPredictor", "_format_version": FORMAT_VERSION, "_library_version": version}
        return {**header, **self.to_dict()}

    @classmethod
    def from_json_dict(cls, raw: Mapping, where: str = CONFIG_NAME) -> HyperLoRAConfig:
        """Parse `config.json` (also the older `{"config": {...}}` nesting); `where` names it in errors."""
        raw = raw["config"] if isinstance(raw.get("config"), Mapping) else raw
        version = raw.get("_format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{where} is format version {version!r}; this diffusers-hyperlora reads up to {FORMAT_VERSION}. "
                "Upgrade diffusers-hyperlora."
            )
        try:
            return cls.from_dict(dict(raw))
        except (TypeError, ValueError) as error:
            raise CheckpointFormatError(
                f"{where} is not a valid HyperLoRAConfig: {error}. Fix that field, or download or save the checkpoint "
                "again."
            ) from error


def read_config_json(path: str | os.PathLike) -> Mapping | None:
    """The parsed `config.json` at `path` when it is a HyperLoRA config; `None` when missing, unreadable, or another
    model's config (no `targets` list / `num_basis`)."""
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except (OSError, ValueError):
        return None
    inner = raw.get("config", raw) if isinstance(raw, dict) else None
    return raw if isinstance(inner, dict) and isinstance(inner.get("targets"), list) and "num_basis" in inner else None
