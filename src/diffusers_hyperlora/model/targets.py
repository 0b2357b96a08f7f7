"""Which layers of a denoiser get a LoRA, described as data.

A HyperLoRA checkpoint targets a list of attention modules (the release's `hyper_lora_modules.json`), and
inside each module a fixed tuple of linears. Nothing here is specific to SDXL except the defaults: the
input width of every linear follows from the module's `hidden_size` and `cross_attention_dim`, so other
UNets or transformers are a different list of `TargetModule`s, not new code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# (name inside the attention module, kohya suffix, name in the release's bank file, reads the context?)
ATTENTION_LINEARS: tuple[tuple[str, str, str, bool], ...] = (
    ("to_q", "to_q", "to_q", False),
    ("to_k", "to_k", "to_k", True),
    ("to_v", "to_v", "to_v", True),
    ("to_out.0", "to_out_0", "to_out", False),
)

# Words of diffusers module paths that contain an underscore; used to turn a kohya name back into a path.
_COMPOUND_WORDS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "single_transformer_blocks",
    "temp_attentions",
    "to_out",
    "to_add_out",
)

KOHYA_UNET_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class TargetModule:
    """One attention module that receives a LoRA on each of its linears.

    Args:
        name: kohya-style key, as in the release's JSON (`lora_unet_mid_block_attentions_0_..._attn1`).
        hidden_size: width of the module's queries and outputs.
        cross_attention_dim: width of the context read by `to_k`/`to_v`, or `None` for self-attention.
        module_path: the diffusers module path (`mid_block.attentions.0.transformer_blocks.0.attn1`);
            derived from `name` when not given.
    """

    name: str
    hidden_size: int
    cross_attention_dim: int | None = None
    module_path: str = ""

    def __post_init__(self) -> None:
        if not self.module_path:
            object.__setattr__(self, "module_path", module_path_from_kohya(self.name))

    @property
    def context_size(self) -> int:
        return self.cross_attention_dim if self.cross_attention_dim is not None else self.hidden_size

    def linears(self) -> list[TargetLinear]:
        """The LoRA'd linears of this module, in bank order (q, k, v, out)."""
        return [
            TargetLinear(
                module_path=f"{self.module_path}.{attr}",
                kohya_name=f"{self.name}_{suffix}",
                release_name=release_name,
                in_features=self.context_size if reads_context else self.hidden_size,
                out_features=self.hidden_size,
            )
            for attr, suffix, release_name, reads_context in ATTENTION_LINEARS
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TargetLinear:
    """One linear layer that receives a LoRA: where it lives and its widths."""

    module_path: str
    kohya_name: str
    release_name: str
    in_features: int
    out_features: int


def module_path_from_kohya(name: str) -> str:
    """Turn a kohya-style module key back into a diffusers module path.

    >>> module_path_from_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1")
    'down_blocks.1.attentions.0.transformer_blocks.0.attn1'
    """
    body = name[len(KOHYA_UNET_PREFIX) :] if name.startswith(KOHYA_UNET_PREFIX) else name
    words = body.split("_")
    parts: list[str] = []
    i = 0
    while i < len(words):
        for compound in sorted(_COMPOUND_WORDS, key=len, reverse=True):
            pieces = compound.split("_")
            if words[i : i + len(pieces)] == pieces:
                parts.append(compound)
                i += len(pieces)
                break
        else:
            parts.append(words[i])
            i += 1
    return ".".join(parts)


def kohya_from_module_path(path: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1` -> `lora_unet_down_blocks_1_..._attn1`."""
    return KOHYA_UNET_PREFIX + path.replace(".", "_")


def target_linears(targets: list[TargetModule]) -> list[TargetLinear]:
    """All LoRA'd linears of `targets`, module by module in the given (checkpoint) order."""
    return [linear for target in targets for linear in target.linears()]


def targets_from_unet(unet: Any) -> list[TargetModule]:
    """Every `attn1`/`attn2` of every transformer block of a diffusers UNet, in `attn_processors` order.

    This is the layout the release was trained on and what new checkpoints default to: for SDXL, 140 attention
    modules covering 560 linears (`to_q`, `to_k`, `to_v`, `to_out.0` of each).

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_components
        >>> targets = targets_from_unet(tiny_sdxl_components()["unet"])
        >>> len(targets), len(target_linears(targets))  # the tiny UNet: 24 modules, 96 linears
        (24, 96)
        >>> targets[0].name
        'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1'
    """
    targets = []
    for processor_name in unet.attn_processors:
        path = processor_name.removesuffix(".processor")
        attention = unet.get_submodule(path)
        context = attention.to_k.in_features
        hidden = attention.to_q.in_features
        is_cross = path.endswith("attn2")
        targets.append(
            TargetModule(
                name=kohya_from_module_path(path),
                hidden_size=hidden,
                cross_attention_dim=context if is_cross else None,
                module_path=path,
            )
        )
    return targets


# The SDXL base UNet's layout (its published config.json): `UNet2DConditionModel(**SDXL_UNET_CONFIG)` on the meta
# device gives the full-size target layers without weights (benchmarks, documentation pictures).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
