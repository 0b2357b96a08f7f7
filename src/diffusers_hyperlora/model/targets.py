"""Which layers of a denoiser get a LoRA, described as data.

A HyperLoRA checkpoint targets a list of attention modules (the release's `hyper_lora_modules.json`), and
inside each module a tuple of linears (`TargetModule.linear_names`, by default `to_q`, `to_k`, `to_v`,
`to_out.0`). Nothing here is specific to SDXL except the defaults: the widths of every linear follow from the
module's `hidden_size` and `cross_attention_dim`, so other UNets or transformers are a different list of
`TargetModule`s, not new code. `DENOISER_LAYOUTS` says, per denoiser class, which pipeline component it is and
which linears of its attention modules are targeted (SD 1.5 / 2.x / SDXL UNets, SD3 and FLUX transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError, TargetMismatchError

# (name inside the attention module, kohya suffix, name in the release's bank file, reads the context?)
ATTENTION_LINEARS: tuple[tuple[str, str, str, bool], ...] = (
    ("to_q", "to_q", "to_q", False),
    ("to_k", "to_k", "to_k", True),
    ("to_v", "to_v", "to_v", True),
    ("to_out.0", "to_out_0", "to_out", False),
)

# Every linear a target module may name: attribute -> (kohya suffix, bank-file name, input width, output width),
# widths as "hidden" (the module's queries) or "context" (what `to_k`/`to_v` and the joint-attention `add_*`
# projections read; the hidden width for self-attention and for SD3 / FLUX joint attention).
KNOWN_LINEARS: dict[str, tuple[str, str, str, str]] = {
    "to_q": ("to_q", "to_q", "hidden", "hidden"),
    "to_k": ("to_k", "to_k", "context", "hidden"),
    "to_v": ("to_v", "to_v", "context", "hidden"),
    "to_out.0": ("to_out_0", "to_out", "hidden", "hidden"),
    "add_q_proj": ("add_q_proj", "add_q_proj", "context", "hidden"),
    "add_k_proj": ("add_k_proj", "add_k_proj", "context", "hidden"),
    "add_v_proj": ("add_v_proj", "add_v_proj", "context", "hidden"),
    "to_add_out": ("to_add_out", "to_add_out", "hidden", "context"),
}
DEFAULT_LINEARS: tuple[str, ...] = tuple(attr for attr, *_ in ATTENTION_LINEARS)
JOINT_ATTENTION_LINEARS: tuple[str, ...] = (*DEFAULT_LINEARS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

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
KOHYA_TRANSFORMER_PREFIX = "lora_transformer_"


@dataclass(frozen=True)
class DenoiserLayout:
    """What HyperLoRA targets in one kind of denoiser, as data.

    Args:
        component: the pipeline attribute holding the denoiser (`"unet"` or `"transformer"`); also the prefix of
            its keys in diffusers-format LoRA files.
        linears: the linears targeted in each attention module, where the module has them.
        kohya_prefix: prefix of the module keys (`name`) of its targets.
        lora_formats: the LoRA file layouts its exports can be written in.
    """

    component: str
    linears: tuple[str, ...]
    kohya_prefix: str
    lora_formats: tuple[str, ...]


UNET_LAYOUT = DenoiserLayout("unet", DEFAULT_LINEARS, KOHYA_UNET_PREFIX, ("kohya", "diffusers"))
JOINT_TRANSFORMER_LAYOUT = DenoiserLayout(
    "transformer", JOINT_ATTENTION_LINEARS, KOHYA_TRANSFORMER_PREFIX, ("diffusers",)
)
DENOISER_LAYOUTS: dict[str, DenoiserLayout] = {
    "UNet2DConditionModel": UNET_LAYOUT,  # SD 1.5, SD 2.x, SDXL
    "SD3Transformer2DModel": JOINT_TRANSFORMER_LAYOUT,  # SD3, SD3.5
    "FluxTransformer2DModel": JOINT_TRANSFORMER_LAYOUT,  # FLUX.1
}
LAYOUTS_BY_COMPONENT: dict[str, DenoiserLayout] = {"unet": UNET_LAYOUT, "transformer": JOINT_TRANSFORMER_LAYOUT}
DENOISER_COMPONENTS: tuple[str, ...] = tuple(LAYOUTS_BY_COMPONENT)
"""The pipeline attributes a denoiser is found in, in lookup order (`unet`, then `transformer`)."""


def has_denoiser_layout(denoiser: Any) -> bool:
    """Whether `denoiser`'s class (or a base class) is in `DENOISER_LAYOUTS`."""
    return any(cls.__name__ in DENOISER_LAYOUTS for cls in type(denoiser).__mro__)


def denoiser_layout(denoiser: Any) -> DenoiserLayout:
    """The `DenoiserLayout` of a diffusers denoiser, by class (subclasses included); else `TargetMismatchError`."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in DENOISER_LAYOUTS:
            return DENOISER_LAYOUTS[cls.__name__]
    raise TargetMismatchError(
        f"{type(denoiser).__name__} is not a denoiser diffusers-hyperlora has targets for (supported: "
        f"{', '.join(DENOISER_LAYOUTS)}). Pass the pipeline's `unet` or `transformer`, or list the target modules "
        "yourself: HyperLoRAConfig(targets=[TargetModule(...), ...]).",
        argument="denoiser",
    )


@dataclass(frozen=True)
class TargetModule:
    """One attention module that receives a LoRA on each of its linears.

    Args:
        name: kohya-style key, as in the release's JSON (`lora_unet_mid_block_attentions_0_..._attn1`).
        hidden_size: width of the module's queries and outputs.
        cross_attention_dim: width of the context read by `to_k`/`to_v`, or `None` for self-attention.
        module_path: the diffusers module path (`mid_block.attentions.0.transformer_blocks.0.attn1`);
            derived from `name` when not given.
        linear_names: the module's linears that get a LoRA, in bank order (names in `KNOWN_LINEARS`); default
            `to_q`, `to_k`, `to_v`, `to_out.0`. Written to `config.json` only when not the default.
    """

    name: str
    hidden_size: int
    cross_attention_dim: int | None = None
    module_path: str = ""
    linear_names: tuple[str, ...] = field(default=DEFAULT_LINEARS)

    def __post_init__(self) -> None:
        if not self.module_path:
            object.__setattr__(self, "module_path", module_path_from_kohya(self.name))
        names = self.linear_names
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise InvalidArgumentError(
                f"TargetModule.linear_names must be a non-empty list of linear names, got {names!r}.",
                argument="linear_names",
            )
        unknown = [name for name in names if name not in KNOWN_LINEARS]
        if unknown or len(set(names)) != len(names):
            raise InvalidArgumentError(
                f"TargetModule.linear_names of {self.name} must be distinct names among {list(KNOWN_LINEARS)}, "
                f"got {list(names)!r}.",
                argument="linear_names",
            )
        object.__setattr__(self, "linear_names", tuple(names))

    @property
    def context_size(self) -> int:
        return self.cross_attention_dim if self.cross_attention_dim is not None else self.hidden_size

    def linears(self) -> list[TargetLinear]:
        """The LoRA'd linears of this module, in bank order (`linear_names`: q, k, v, out by default)."""
        widths = {"hidden": self.hidden_size, "context": self.context_size}
        linears = []
        for attr in self.linear_names:
            suffix, release_name, width_in, width_out = KNOWN_LINEARS[attr]
            linears.append(
                TargetLinear(
                    module_path=f"{self.module_path}.{attr}",
                    kohya_name=f"{self.name}_{suffix}",
                    release_name=release_name,
                    in_features=widths[width_in],
                    out_features=widths[width_out],
                )
            )
        return linears

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` form; `linear_names` only when not the default, so older configs read (and hash) the
        same."""
        data: dict[str, Any] = {
            "name": self.name,
            "hidden_size": self.hidden_size,
            "cross_attention_dim": self.cross_attention_dim,
            "module_path": self.module_path,
        }
        if self.linear_names != DEFAULT_LINEARS:
            data["linear_names"] = list(self.linear_names)
        return data


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
    body = name
    for prefix in (KOHYA_UNET_PREFIX, KOHYA_TRANSFORMER_PREFIX):
        body = body[len(prefix) :] if body.startswith(prefix) else body
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
    return targets_from_denoiser(unet)


def targets_from_denoiser(denoiser: Any, linears: tuple[str, ...] | list[str] | None = None) -> list[TargetModule]:
    """Every attention module of a supported denoiser (`DENOISER_LAYOUTS`), in `attn_processors` order.

    Each module targets the linears of `linears` (default: the layout's) that it has: for a UNet `to_q`, `to_k`,
    `to_v`, `to_out.0` of every `attn1`/`attn2`; for SD3 / FLUX also the joint-attention context projections
    `add_q_proj`, `add_k_proj`, `add_v_proj` and `to_add_out` (FLUX's single blocks have only `to_q/k/v`).
    Raises `TargetMismatchError` for another denoiser class, or when a linear's widths do not follow the module's.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_base_models import tiny_flux_components
        >>> targets = targets_from_denoiser(tiny_flux_components()["transformer"])
        >>> [(t.module_path, len(t.linear_names)) for t in targets]
        [('transformer_blocks.0.attn', 8), ('single_transformer_blocks.0.attn', 3)]
    """
    layout = denoiser_layout(denoiser)
    wanted = layout.linears if linears is None else tuple(linears)
    unknown = [name for name in wanted if name not in KNOWN_LINEARS]
    if unknown or not wanted:
        raise TargetMismatchError(
            f"linears must name linears among {list(KNOWN_LINEARS)}, got {list(wanted)!r}.", argument="linears"
        )
    targets = []
    for processor_name in denoiser.attn_processors:
        path = processor_name.removesuffix(".processor")
        attention = denoiser.get_submodule(path)
        present = tuple(name for name in wanted if _linear_of(attention, name) is not None)
        if not present:
            continue
        hidden, context = attention.to_q.in_features, attention.to_k.in_features
        is_cross = path.endswith("attn2") or context != hidden
        target = TargetModule(
            name=layout.kohya_prefix + path.replace(".", "_"),
            hidden_size=hidden,
            cross_attention_dim=context if is_cross else None,
            module_path=path,
            linear_names=present,
        )
        _check_widths(attention, target)
        targets.append(target)
    return targets


def _linear_of(attention: Any, name: str) -> Any:
    try:
        module = attention.get_submodule(name)
    except AttributeError:
        return None
    return module if hasattr(module, "in_features") and hasattr(module, "out_features") else None


def _check_widths(attention: Any, target: TargetModule) -> None:
    for name, linear in zip(target.linear_names, target.linears()):
        module = _linear_of(attention, name)
        if (module.in_features, module.out_features) != (linear.in_features, linear.out_features):
            raise TargetMismatchError(
                f"{linear.module_path} is a [{module.in_features} -> {module.out_features}] linear, but its module's "
                f"widths give [{linear.in_features} -> {linear.out_features}]; this attention layout is not "
                "supported. Leave that linear out (linears=...) or list the targets yourself.",
                argument="denoiser",
            )


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
