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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import logging
from peft import LoraConfig
from torch import nn

from .adapters import active_adapters, add_adapter, check_targets, set_active_adapters, update_while_unmerged
from .config import HyperLoRAConfig
from .errors import AdapterNameConflictError
from .identity import HyperLoRAIdentity

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
        raise ValueError(f"Edited and neutral LoRAs cover {len(edited)} and {len(neutral)} linears; they must match.")
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
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_predictor
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
                raise TypeError(
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
        raise ValueError(f"Expected slider factors for {len(layers)} linears, got {len(factors)}.")

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
        denoiser.delete_adapters(present)


# ---------------------------------------------------------------------------------------------- pipeline surface
def _as_identity(pipe: Any, value: Any, side: str, extractor_kwargs: dict) -> HyperLoRAIdentity:
    from .pipeline import predict_hyperlora_identity

    if isinstance(value, HyperLoRAIdentity):
        return value
    if value is None:
        raise ValueError(f"add_hyperlora_slider(): `{side}` is missing; pass images or a HyperLoRAIdentity.")
    return predict_hyperlora_identity(pipe, value, **extractor_kwargs)


@torch.no_grad()
def add_hyperlora_slider(
    pipe: Any,
    neutral: Any,
    edited: Any,
    adapter_name: str = DEFAULT_SLIDER_NAME,
    weight: float = DEFAULT_SLIDER_WEIGHT,
    **extractor_kwargs: Any,
) -> HyperLoRASlider:
    """Add (or rewrite) a slider adapter that moves generations from `neutral` towards `edited`.

    Args:
        pipe: a pipeline with a HyperLoRA loaded (`pipe.load_hyperlora(...)`).
        neutral: photos (one or a list, as for `set_hyperlora_identity`) or a `HyperLoRAIdentity` of the person.
        edited: the same for the edited photos of the same person (e.g. aged, smiling).
        adapter_name: name of the PEFT adapter; add several sliders under different names.
        weight: initial adapter weight (the reference slider workflows use +-0.7). Change it later with
            `pipe.set_adapters([...], [...])` like any LoRA; a negative weight moves the other way.
        extractor_kwargs: forwarded to the feature extractor for image inputs.

    Returns:
        The `HyperLoRASlider` (export it with `pipe.hyperlora.export_lora(slider, "slider.safetensors")`).

    Example:
        >>> slider = pipe.add_hyperlora_slider(["me.jpg"], ["me_aged.jpg"], adapter_name="age")  # doctest: +SKIP
        >>> pipe.set_adapters(["id", "age"], [0.8, -0.5])  # younger  # doctest: +SKIP
    """
    from .pipeline import _state, sync_predictor

    state = _state(pipe)
    if adapter_name in state.adapters.names.values():
        raise AdapterNameConflictError(
            f"{adapter_name!r} is one of HyperLoRA's own adapters ({sorted(state.adapters.names.values())}); "
            "give the slider another name, e.g. `adapter_name='slider'`."
        )
    slider = HyperLoRASlider(
        neutral=_as_identity(pipe, neutral, "neutral", extractor_kwargs),
        edited=_as_identity(pipe, edited, "edited", extractor_kwargs),
    )
    predictor = sync_predictor(pipe)
    factors = slider.lora_weights(predictor)
    denoiser, config = state.adapters.denoiser, predictor.config
    sliders = hyperlora_sliders(state)
    if adapter_name in sliders and adapter_name in (getattr(denoiser, "peft_config", None) or {}):
        write_slider_adapter(denoiser, config, adapter_name, factors)
        set_active_adapters(denoiser, _with(active_adapters(denoiser), adapter_name), {adapter_name: weight})
    else:
        add_slider_adapter(denoiser, config, adapter_name, factors, weight)
    sliders[adapter_name] = slider
    return slider


def _with(names: list[str], name: str) -> list[str]:
    return names if name in names else names + [name]


def hyperlora_sliders(state: Any) -> dict[str, HyperLoRASlider]:
    """The sliders a pipeline's HyperLoRA state created, by adapter name (created on first use)."""
    return state.sliders


def remove_hyperlora_slider(pipe: Any, adapter_name: str = DEFAULT_SLIDER_NAME) -> None:
    """Delete one slider adapter created by `add_hyperlora_slider`.

    Example:
        >>> pipe.remove_hyperlora_slider("age")  # doctest: +SKIP
    """
    from .pipeline import _state

    sliders = hyperlora_sliders(_state(pipe))
    if adapter_name not in sliders:
        raise ValueError(
            f"No HyperLoRA slider named {adapter_name!r} on this pipeline (sliders: {sorted(sliders) or 'none'}). "
            "Use the name given to `add_hyperlora_slider`."
        )
    state = _state(pipe)
    delete_slider_adapters(state.adapters.denoiser, [adapter_name])
    del sliders[adapter_name]


def remove_all_sliders(state: Any) -> None:
    """Delete every slider adapter of a HyperLoRA state (used by `unload_hyperlora`)."""
    sliders = hyperlora_sliders(state)
    delete_slider_adapters(state.adapters.denoiser, list(sliders))
    sliders.clear()
