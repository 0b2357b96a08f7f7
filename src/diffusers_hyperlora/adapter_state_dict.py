"""Keep HyperLoRA's adapters out of the denoiser's `state_dict`, so `pipe.save_pretrained` is unchanged.

HyperLoRA's adapter weights are derived data (written from an identity on every switch); saving them into
the UNet's checkpoint would also rename every wrapped base weight to `...base_layer.weight`. A state-dict
post-hook on the denoiser drops the adapters' keys and, for layers that carry no other adapter, restores the
plain key names. Layers that also carry a user's LoRA keep diffusers' usual layout for that LoRA.
Export a predicted LoRA with `pipe.hyperlora.export_lora(...)` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _is_adapter_key(parts: list[str], names: Collection[str]) -> bool:
    return any(part in _ADAPTER_CONTAINERS and nxt in names for part, nxt in zip(parts, parts[1:]))


def hide_adapters_from_state_dict(
    denoiser: nn.Module, adapter_names: Callable[[], Collection[str]]
) -> RemovableHandle:
    """Register the hook on `denoiser`; call `.remove()` on the returned handle to undo it.

    `adapter_names` is asked at every `state_dict()` call, so adapters added later (sliders) are hidden too.
    """

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        names = frozenset(adapter_names())
        only_ours = {
            f"{prefix}{path}."
            for path, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and set(layer.lora_A.keys()) <= names
        }
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            if _is_adapter_key(key[len(prefix) :].split("."), names):
                del state_dict[key]
                continue
            head, sep, tail = key.rpartition(".base_layer.")
            if sep and f"{head}." in only_ours:
                state_dict[f"{head}.{tail}"] = state_dict.pop(key)

    return denoiser.register_state_dict_post_hook(hook)
