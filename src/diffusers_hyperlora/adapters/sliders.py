"""Sliders: a LoRA that moves any generation along the edit between two photo sets of one person.

From a neutral identity `n` and an edited one `e` (the same person aged, smiling, ...), the slider's update of
every target linear is exactly the difference of their ID LoRAs, `(alpha / r) * (up_e @ down_e - up_n @ down_n)`.
It is one ordinary PEFT adapter of rank `2r` with

    A = [down_e; down_n]   ([2r, in])        B = [up_e, -up_n]   ([out, 2r])        lora_alpha = 2 * alpha

so `B @ A = up_e @ down_e - up_n @ down_n` and the PEFT scale `lora_alpha / 2r` equals the ID adapter's `alpha / r`.
Its weight is set with `pipe.set_adapters` like any LoRA (negative weights move the other way), several sliders can
be active at once, and it exports to kohya / diffusers files like an identity. The adapter itself lives with the
ID and Base adapters (`HyperLoRAAdapters.put_slider` / `remove_adapters` in `peft_adapters.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from ..identities.identity import HyperLoRAIdentity
from ..model.config import HyperLoRAConfig
from .checks import check_adapter_weight

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
            f"Edited and neutral LoRAs cover {len(edited)} and {len(neutral)} linears; they must match: predict "
            "both with the same checkpoint."
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
                    "`pipe.predict_hyperlora_identity(images)` or load it with `HyperLoRAIdentity.load(path)`.",
                    argument=side,
                )

    def lora_weights(self, predictor: Any, device: torch.device | str | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Rank-`2r` `(A [2r, in], B [out, 2r])` float32 for every target linear (checkpoint order)."""
        edited = predictor.lora_weights(self.edited, "id", device=device)
        neutral = predictor.lora_weights(self.neutral, "id", device=device)
        return difference_factors(edited, neutral)


def check_slider_weight(weight: Any) -> float:
    """`weight` as a float, or `InvalidArgumentTypeError` / `InvalidArgumentError` for a non-number or NaN/inf."""
    return check_adapter_weight(weight, "add_hyperlora_slider()", "weight", example="0.7 (or -0.7)")
