"""Sliders: a LoRA that moves any generation along the edit between two photo sets of one person.

From a neutral identity `n` and an edited one `e` (the same person aged, smiling, ...), the slider's update of
every target linear is exactly the difference of their ID LoRAs, `(alpha / r) * (up_e @ down_e - up_n @ down_n)`.
It is one ordinary PEFT adapter of rank `2r` with

    A = [down_e; down_n]   ([2r, in])        B = [up_e, -up_n]   ([out, 2r])        lora_alpha = 2 * alpha

so `B @ A = up_e @ down_e - up_n @ down_n` and the PEFT scale `lora_alpha / 2r` equals the ID adapter's `alpha / r`.
Its weight is set with `pipe.set_adapters` like any LoRA (negative weights move the other way), several sliders can
be active at once, and it exports to kohya / diffusers files like an identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import logging
from peft import LoraConfig
from torch import nn

from ..errors import AdapterNameConflictError, InvalidArgumentError, InvalidArgumentTypeError
from ..identities.identity import HyperLoRAIdentity
from ..model.config import HyperLoRAConfig
from .peft_adapters import (
    active_adapters,
    add_adapter,
    check_targets,
    set_active_adapters,
    unmerge_adapters,
    update_while_unmerged,
)

logger = logging.get_logger(__name__)

DEFAULT_SLIDER_NAME = "slider"
DEFAULT_SLIDER_WEIGHT = 0.7  # the reference slider workflows use +-0.7

LoraFactors = Sequence[tuple[torch.Tensor, torch.Tensor]]


def difference_factors(edited: LoraFactors, neutral: LoraFactors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank-`2r` factors `(A, B)` with `B @ A = up_e @ down_e - up_n @ down_n` for every linear (pure).

    >>> d_e, u_e, d_n, u_n = torch.randn(2, 5), torch.randn(3, 2), torch.randn(2, 5), torch.randn(3, 2)
    >>> ((a, b),) = difference_factors([(d_e, u_e)], [(d_n, u_n)])
    >>> a.shape, b.shape, torch.allclose(b @ a, u_e @ d_e - u_n @ d_n, atol=1e-6)
    (torch.Size([4, 5]), torch.Size([3, 4]), True)
    """
    if len(edited) != len(neutral):
        raise InvalidArgumentError(
            f"Edited and neutral LoRAs cover {len(edited)} and {len(neutral)} linears; they must match."
        )
    return [
        (torch.cat([down_e, down_n], dim=0), torch.cat([up_e, -up_n], dim=1))
        for (down_e, up_e), (down_n, up_n) in zip(edited, neutral)
    ]


def slider_rank(config: HyperLoRAConfig) -> int:
    """Rank of a slider adapter: twice the ID rank."""
    return 2 * config.rank("id")


def slider_alpha(config: HyperLoRAConfig) -> float:
    """`lora_alpha` of a slider adapter: twice the ID alpha, so its scale equals the ID adapter's."""
    return 2 * config.alpha("id")


@dataclass
class HyperLoRASlider:
    """The two identities a slider is the difference of.

    Attributes:
        neutral: the person as they are (the `-` side).
        edited: the same person with the edit (the `+` side).

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> predictor = tiny_hyperlora_predictor()
        >>> n = predictor.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
        >>> e = predictor.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
        >>> factors = HyperLoRASlider(n, e).lora_weights(predictor)
        >>> factors[0][0].shape[0] == 2 * predictor.config.id_rank
        True
    """

    neutral: HyperLoRAIdentity
    edited: HyperLoRAIdentity

    def __post_init__(self) -> None:
        for side in ("neutral", "edited"):
            value = getattr(self, side)
            if not isinstance(value, HyperLoRAIdentity):
                raise InvalidArgumentTypeError(
                    f"HyperLoRASlider.{side} must be a HyperLoRAIdentity, got {type(value).__name__}. Predict it with "
                    "`pipe.predict_hyperlora_identity(images)` or load it with `HyperLoRAIdentity.load(path)`."
                )

    def check_compatible(self, checkpoint: str, probe: torch.Tensor | None) -> None:
        """Raise `IdentityMismatchError` unless both sides belong to the given checkpoint."""
        self.neutral.check_compatible(checkpoint, probe)
        self.edited.check_compatible(checkpoint, probe)

    def lora_weights(self, predictor: Any, device: torch.device | str | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Rank-`2r` `(A [2r, in], B [out, 2r])` float32 for every target linear (checkpoint order)."""
        edited = predictor.lora_weights(self.edited, "id", device=device)
        neutral = predictor.lora_weights(self.neutral, "id", device=device)
        return difference_factors(edited, neutral)


# ---------------------------------------------------------------------------------------------- denoiser adapters
@torch.no_grad()
def write_slider_adapter(denoiser: nn.Module, config: HyperLoRAConfig, name: str, factors: LoraFactors) -> None:
    """Copy rank-`2r` factors into the existing slider adapter `name`, in place (merged layers are re-merged)."""
    modules = dict(denoiser.named_modules())
    layers = [modules[linear.module_path] for linear in config.linears]
    if len(layers) != len(factors):
        raise InvalidArgumentError(f"Expected slider factors for {len(layers)} linears, got {len(factors)}.")

    def update() -> None:
        destinations = [layer.lora_A[name].weight for layer in layers] + [layer.lora_B[name].weight for layer in layers]
        torch._foreach_copy_(destinations, [a for a, _ in factors] + [b for _, b in factors])

    update_while_unmerged(layers, name, update)


def add_slider_adapter(
    denoiser: nn.Module, config: HyperLoRAConfig, name: str, factors: LoraFactors, weight: float
) -> None:
    """Register a rank-`2r` PEFT adapter `name` on every target linear, fill it, and activate it at `weight`.

    The adapters that were active stay active (with their weights).
    """
    check_targets(denoiser, config.linears)
    if name in (getattr(denoiser, "peft_config", None) or {}):
        raise AdapterNameConflictError(
            f"The {denoiser.__class__.__name__} already has an adapter named {name!r}. Pick another slider name "
            f"(`adapter_name=...`) or delete that adapter first (`pipe.delete_adapters({name!r})`)."
        )
    previously_active = active_adapters(denoiser)
    lora_config = LoraConfig(
        r=slider_rank(config),
        lora_alpha=slider_alpha(config),
        target_modules=[linear.module_path for linear in config.linears],
    )
    add_adapter(denoiser, lora_config, name)
    write_slider_adapter(denoiser, config, name, factors)
    set_active_adapters(denoiser, previously_active + [name], {name: weight})


def delete_slider_adapters(denoiser: nn.Module, names: Sequence[str]) -> None:
    """Delete the named adapters that still exist on the denoiser (a user may have deleted some already)."""
    existing = set(getattr(denoiser, "peft_config", None) or {})
    present = [name for name in names if name in existing]
    if present:
        unmerge_adapters(denoiser.modules(), present)  # a fused slider's update leaves the base weights too
        denoiser.delete_adapters(present)


def check_slider_weight(weight: Any) -> float:
    """`weight` as a float, or `InvalidArgumentTypeError` / `InvalidArgumentError` for a non-number or NaN/inf."""
    try:
        value = float(weight)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentTypeError(
            f"add_hyperlora_slider(): `weight` must be a number (the adapter weight, e.g. 0.7, negative to move the "
            f"other way), got {weight!r}."
        ) from error
    if not math.isfinite(value):
        raise InvalidArgumentError(
            f"add_hyperlora_slider(): `weight` must be a finite number, got {value}; e.g. weight=0.7 (or -0.7)."
        )
    return value
