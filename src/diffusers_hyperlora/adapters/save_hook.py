"""Keep HyperLoRA's adapters out of the files `save_pretrained` writes, so `pipe.save_pretrained` is unchanged.

HyperLoRA's adapter weights are derived data (written from an identity on every switch); saving them into
the UNet's checkpoint would also rename every wrapped base weight to `...base_layer.weight`. While the denoiser's
`save_pretrained` runs (directly, or through `pipe.save_pretrained`), a state-dict post-hook drops the adapters'
keys and, for layers that carry no other adapter, restores the plain key names. Layers that also carry a user's
LoRA keep diffusers' usual layout for that LoRA.

Outside `save_pretrained`, `denoiser.state_dict()` is PEFT's usual one, with the adapters in it: accelerate's
`enable_sequential_cpu_offload` and other tools that rebuild the model from its state dict need every key.
Export a predicted LoRA with `pipe.hyperlora.export_lora(...)` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..utils.compat import (
    ADAPTER_CONTAINERS,
    BASE_LAYER_KEY,
    layer_adapter_names,
    override_save_pretrained,
    restore_save_pretrained,
)

_MARK = "_hyperlora_adapter_names"


def _is_adapter_key(parts: list[str], names: Collection[str]) -> bool:
    return any(part in ADAPTER_CONTAINERS and nxt in names for part, nxt in zip(parts, parts[1:]))


def _hiding_hook(adapter_names: Callable[[], Collection[str]]):
    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        names = frozenset(adapter_names())
        only_ours = {
            f"{prefix}{path}."
            for path, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and layer_adapter_names(layer) <= names
        }
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            if _is_adapter_key(key[len(prefix) :].split("."), names):
                del state_dict[key]
                continue
            head, sep, tail = key.rpartition(BASE_LAYER_KEY)
            if sep and f"{head}." in only_ours:
                state_dict[f"{head}.{tail}"] = state_dict.pop(key)

    return hook


def _save_pretrained_without_adapters(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    handle = self.register_state_dict_post_hook(_hiding_hook(getattr(self, _MARK)))
    try:
        return type(self).save_pretrained(self, *args, **kwargs)
    finally:
        handle.remove()


class _Unhide:
    """Handle returned by `hide_adapters_when_saving`; `remove()` undoes it."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser

    def remove(self) -> None:
        restore_save_pretrained(self.denoiser)
        self.denoiser.__dict__.pop(_MARK, None)


def hide_adapters_when_saving(denoiser: nn.Module, adapter_names: Callable[[], Collection[str]]) -> _Unhide:
    """Make `denoiser.save_pretrained` write the denoiser without the named adapters; `.remove()` the handle to
    undo it.

    `adapter_names` is asked at every save, so adapters added later (sliders) are left out too. The override is a
    bound method of this instance, so a `copy.deepcopy` of the denoiser saves itself.
    """
    denoiser.__dict__[_MARK] = adapter_names
    override_save_pretrained(denoiser, _save_pretrained_without_adapters)
    return _Unhide(denoiser)
