"""The PEFT adapters that carry a predicted LoRA inside the denoiser, written in place.

On load, `HyperLoRAAdapters.attach` registers two ordinary PEFT LoRA adapters on the denoiser (the UNet):
`"id"` on every target linear (rank r, alpha = r / 2), and `"base"`. For a checkpoint without a Base branch
(the public release) `"base"` is a rank-1 placeholder on a single linear whose up matrix stays zero: it exists
so `pipe.set_adapters(["id", "base"], ...)` works for every checkpoint, and it costs one tiny matmul per step.
An identity switch then copies new factors into the existing `lora_A` / `lora_B` weights: no re-injection, no
new parameters, and the tensors stay on whatever device and dtype the denoiser has.
"""

from __future__ import annotations

import torch
from diffusers.utils import logging
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import HyperLoRAConfig
from .errors import AdapterNameConflictError, TargetMismatchError
from .targets import TargetLinear

logger = logging.get_logger(__name__)


def check_targets(denoiser: nn.Module, linears: list[TargetLinear]) -> None:
    """Raise `TargetMismatchError` naming the first target linear the denoiser lacks or has with other widths."""
    modules = dict(denoiser.named_modules())
    for linear in linears:
        module = modules.get(linear.module_path)
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if module is None or not isinstance(module, nn.Linear):
            raise TargetMismatchError(
                f"The {denoiser.__class__.__name__} has no linear layer {linear.module_path!r} that this HyperLoRA "
                f"checkpoint targets ({linear.kohya_name}). The checkpoint was made for another model family "
                "(the public release targets SDXL UNets); use a pipeline of that family."
            )
        if (module.in_features, module.out_features) != (linear.in_features, linear.out_features):
            raise TargetMismatchError(
                f"{linear.module_path!r} is {module.in_features} -> {module.out_features} wide in this "
                f"{denoiser.__class__.__name__}, but the checkpoint expects {linear.in_features} -> "
                f"{linear.out_features}. The checkpoint was made for another model (the public release targets "
                "SDXL UNets); use a pipeline of that family."
            )


def active_adapters(denoiser: nn.Module) -> list[str]:
    """The denoiser's active adapter names, `[]` when it has no PEFT layers."""
    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            return list(module.active_adapters)
    return []


def set_active_adapters(denoiser: nn.Module, names: list[str], weights: dict[str, float]) -> None:
    """Activate exactly `names` on every PEFT layer and set the weights given in `weights` (others untouched)."""
    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)
            for name, weight in weights.items():
                module.set_scale(name, weight)


class HyperLoRAAdapters:
    """The `"id"` and `"base"` adapters of one denoiser and how to write LoRA factors into them.

    Args:
        denoiser: the model that carries the adapters (the pipeline's UNet).
        config: the checkpoint's config (target linears, ranks).
        id_name, base_name: adapter names.
    """

    def __init__(self, denoiser: nn.Module, config: HyperLoRAConfig, id_name: str = "id", base_name: str = "base"):
        self.denoiser = denoiser
        self.config = config
        self.names = {"id": id_name, "base": base_name}
        modules = dict(denoiser.named_modules())
        self._layers = [modules[linear.module_path] for linear in config.linears]

    @classmethod
    def attach(
        cls,
        denoiser: nn.Module,
        config: HyperLoRAConfig,
        id_name: str = "id",
        base_name: str = "base",
        id_weight: float | None = None,
        base_weight: float | None = None,
    ) -> HyperLoRAAdapters:
        """Validate the denoiser, register both adapters once, activate them beside the user's own adapters."""
        linears = config.linears
        check_targets(denoiser, linears)
        if id_name == base_name:
            raise AdapterNameConflictError(f"The ID and Base adapters need different names, got {id_name!r} twice.")
        existing = set(getattr(denoiser, "peft_config", {}) or {})
        for name in (id_name, base_name):
            if name in existing:
                raise AdapterNameConflictError(
                    f"The {denoiser.__class__.__name__} already has an adapter named {name!r}. Delete it "
                    f"(`pipe.delete_adapters({name!r})`) or load HyperLoRA under other names, e.g. "
                    "`load_hyperlora(..., id_adapter_name='hyper_id', base_adapter_name='hyper_base')`."
                )
        previously_active = active_adapters(denoiser)
        paths = [linear.module_path for linear in linears]
        denoiser.add_adapter(
            LoraConfig(r=config.id_rank, lora_alpha=config.alpha("id"), target_modules=paths), adapter_name=id_name
        )
        if config.has_base:
            base_config = LoraConfig(r=config.base_rank, lora_alpha=config.alpha("base"), target_modules=paths)
        else:
            base_config = LoraConfig(r=1, lora_alpha=1, target_modules=[paths[0]])
        denoiser.add_adapter(base_config, adapter_name=base_name)
        weights = {
            id_name: config.default_id_weight if id_weight is None else id_weight,
            base_name: config.default_base_weight if base_weight is None else base_weight,
        }
        set_active_adapters(denoiser, previously_active + [id_name, base_name], weights)
        adapters = cls(denoiser, config, id_name, base_name)
        adapters.clear("id")
        adapters.clear("base")
        return adapters

    # ------------------------------------------------------------------ writing weights
    def _pairs(self, branch: str):
        name = self.names[branch]
        for layer in self._layers:
            if name in layer.lora_A:
                yield layer, layer.lora_A[name].weight, layer.lora_B[name].weight

    @torch.no_grad()
    def write(self, branch: str, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy `(down [r, in], up [out, r])` factors, one per target linear, into the adapter in place."""
        if branch == "base" and not self.config.has_base:
            raise ValueError("This checkpoint has no Base branch; its 'base' adapter is a zero placeholder.")
        pairs = list(self._pairs(branch))
        if len(pairs) != len(weights):
            raise ValueError(f"Expected {len(pairs)} (down, up) pairs for {branch!r}, got {len(weights)}.")
        name = self.names[branch]
        for (layer, lora_a, lora_b), (down, up) in zip(pairs, weights):
            merged = name in getattr(layer, "merged_adapters", [])
            if merged:
                layer.unmerge()
            lora_a.copy_(down)
            lora_b.copy_(up)
            if merged:
                layer.merge(adapter_names=[name])

    @torch.no_grad()
    def clear(self, branch: str) -> None:
        """Make a branch contribute nothing (its up matrices become zero)."""
        for _, _, lora_b in self._pairs(branch):
            lora_b.zero_()

    def lora_parameters(self, branch: str = "id") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live `(lora_A.weight, lora_B.weight)` of every target linear of a branch."""
        return [(a, b) for _, a, b in self._pairs(branch)]

    # ------------------------------------------------------------------ removal
    def detach(self) -> None:
        """Delete both adapters; remove the PEFT wrappers entirely when no other adapter is left."""
        names = list(self.names.values())
        self.denoiser.delete_adapters(names)
        if not getattr(self.denoiser, "peft_config", None):
            from diffusers.utils.peft_utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(self.denoiser)
            if hasattr(self.denoiser, "peft_config"):
                del self.denoiser.peft_config
            self.denoiser._hf_peft_config_loaded = None
        self._layers = []
