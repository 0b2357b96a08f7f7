"""The PEFT adapters that carry a predicted LoRA inside the denoiser, written in place.

On load, `HyperLoRAAdapters.attach` registers two ordinary PEFT LoRA adapters on the denoiser (the UNet):
`"id"` on every target linear (rank r, alpha = r / 2), and `"base"`. For a checkpoint without a Base branch
(the public release) `"base"` is a rank-1 placeholder on a single linear whose up matrix stays zero: it exists
so `pipe.set_adapters(["id", "base"], ...)` works for every checkpoint, and it costs one tiny matmul per step.
An identity switch then copies new factors into the existing `lora_A` / `lora_B` weights: no re-injection, no
new parameters, and the tensors stay on whatever device and dtype the denoiser has. The copy is one
multi-tensor copy per shape group, straight from the bank's grouped result.

Sliders (`sliders.py`) are further adapters of the same object (`add_slider` / `remove_adapters`), written
through the same code. While the adapters are fused, writes go through the exact merge of `exact_merge.py`.
`target_layers` is the one place that finds the target layers of a checkpoint on a denoiser.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import logging
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import AdapterNameConflictError, InvalidArgumentError, TargetMismatchError
from ..model.bank import BankGroup
from ..model.config import HyperLoRAConfig
from ..model.targets import TargetLinear
from ..utils.compat import (
    adapter_configs,
    adapter_scale,
    foreach_copy_,
    foreach_zero_,
    lora_factors,
    merged_adapter_names,
    peft_unmerge,
    quiet_peft_adapter_warnings,
    remove_peft_wrappers,
    set_adapter_scale,
)
from .exact_merge import install_exact_merge, restore_base_weights
from .sliders import slider_alpha, slider_rank

logger = logging.get_logger(__name__)


def target_layers(denoiser: nn.Module, linears: Sequence[TargetLinear]) -> list[nn.Module]:
    """The denoiser's modules at the checkpoint's target linears, in checkpoint order (the PEFT layers once the
    adapters are attached). `check_targets` first: a missing path raises `KeyError` here."""
    modules = dict(denoiser.named_modules())
    return [modules[linear.module_path] for linear in linears]


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


def activate_adapter(denoiser: nn.Module, name: str, weight: float) -> None:
    """Make `name` active beside the adapters already active (kept with their weights) at `weight`."""
    names = active_adapters(denoiser)
    set_active_adapters(denoiser, names if name in names else [*names, name], {name: weight})


def add_adapter(denoiser: nn.Module, lora_config: LoraConfig, name: str) -> None:
    """`denoiser.add_adapter`, without PEFT's warning about a second adapter (several adapters are the point)."""
    with quiet_peft_adapter_warnings():
        denoiser.add_adapter(lora_config, adapter_name=name)


@torch.no_grad()
def update_while_unmerged(layers: list[BaseTunerLayer], name: str, update: Callable[[], object]) -> None:
    """Run `update()` with the layers where adapter `name` is merged restored to their base weights, then merge
    every adapter that was merged there again (with the new factors).

    The restore is bitwise where the layer has the exact merge of `exact_merge.py`, PEFT's subtraction otherwise
    (a layer merged before HyperLoRA was attached).
    """
    merged = [(layer, merged_adapter_names(layer)) for layer in layers if name in merged_adapter_names(layer)]
    for layer, _ in merged:
        if not restore_base_weights(layer, keep=True):
            peft_unmerge(layer)
    update()
    for layer, names in merged:
        layer.merge(adapter_names=names)


class HyperLoRAAdapters:
    """The `"id"` and `"base"` adapters (and the sliders) of one denoiser and how to write LoRA factors into them.

    Args:
        denoiser: the model that carries the adapters (the pipeline's UNet).
        config: the checkpoint's config (target linears, ranks).
        id_name, base_name: adapter names.
    """

    def __init__(self, denoiser: nn.Module, config: HyperLoRAConfig, id_name: str = "id", base_name: str = "base"):
        self.denoiser = denoiser
        self.config = config
        self.names = {"id": id_name, "base": base_name}
        self._layers = target_layers(denoiser, config.linears)
        self._destinations: dict = {}
        for layer in self._layers:
            install_exact_merge(layer)

    @staticmethod
    def check_attachable(
        denoiser: nn.Module, config: HyperLoRAConfig, id_name: str, base_name: str, replacing: Collection[str] = ()
    ) -> None:
        """Raise unless `attach` would succeed: the target layers exist and both names are free.

        Args:
            replacing: adapter names that will be removed before attaching (the HyperLoRA being replaced).
        """
        check_targets(denoiser, config.linears)
        if id_name == base_name:
            raise AdapterNameConflictError(
                f"The ID and Base adapters need different names, got {id_name!r} twice: pass another "
                "`base_adapter_name`.",
                argument="base_adapter_name",
            )
        existing = set(adapter_configs(denoiser)) - set(replacing)
        for name in (id_name, base_name):
            if name in existing:
                raise AdapterNameConflictError(
                    f"The {denoiser.__class__.__name__} already has an adapter named {name!r}. Delete it "
                    f"(`pipe.delete_adapters({name!r})`) or load HyperLoRA under other names, e.g. "
                    "`load_hyperlora(..., id_adapter_name='hyper_id', base_adapter_name='hyper_base')`.",
                    argument="id_adapter_name" if name == id_name else "base_adapter_name",
                )

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
        cls.check_attachable(denoiser, config, id_name, base_name)
        previously_active = active_adapters(denoiser)
        try:
            return cls._attach(denoiser, config, id_name, base_name, previously_active, id_weight, base_weight)
        except BaseException:
            remove_partial_adapters(denoiser, [id_name, base_name], previously_active)
            raise

    @classmethod
    def _attach(
        cls,
        denoiser: nn.Module,
        config: HyperLoRAConfig,
        id_name: str,
        base_name: str,
        previously_active: list[str],
        id_weight: float | None,
        base_weight: float | None,
    ) -> HyperLoRAAdapters:
        paths = [linear.module_path for linear in config.linears]
        add_adapter(
            denoiser, LoraConfig(r=config.id_rank, lora_alpha=config.alpha("id"), target_modules=paths), id_name
        )
        if config.has_base:
            base_config = LoraConfig(r=config.base_rank, lora_alpha=config.alpha("base"), target_modules=paths)
        else:
            base_config = LoraConfig(r=1, lora_alpha=1, target_modules=[paths[0]])
        add_adapter(denoiser, base_config, base_name)
        weights = {
            id_name: config.default_id_weight if id_weight is None else id_weight,
            base_name: config.default_base_weight if base_weight is None else base_weight,
        }
        set_active_adapters(denoiser, previously_active + [id_name, base_name], weights)
        adapters = cls(denoiser, config, id_name, base_name)
        adapters.clear("id")
        adapters.clear("base")
        return adapters

    def snapshot(self, slider_names: Sequence[str]) -> AdapterSnapshot | None:
        """What `AdapterSnapshot.restore` needs to put these adapters (and the named sliders) back bitwise after
        they are detached: references to their factors (kept alive by the snapshot), the active adapters, every
        layer's scales and what was fused. `None` when they are not attached (nothing to put back)."""
        if not self.is_attached():
            return None
        ours = [*self.names.values(), *slider_names]
        layers = [(path, m) for path, m in self.denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
        return AdapterSnapshot(
            config=self.config,
            names=dict(self.names),
            factors={name: self._pairs(name) for name in ours},
            active=active_adapters(self.denoiser),
            scales={
                path: {name: adapter_scale(layer, name) for name in ours if lora_factors(layer, name) is not None}
                for path, layer in layers
            },
            merged={path: [n for n in merged_adapter_names(layer) if n in ours] for path, layer in layers},
        )

    @property
    def layers(self) -> list[BaseTunerLayer]:
        """The PEFT layers of the target linears, in checkpoint order (empty once detached)."""
        return list(self._layers)

    def is_attached(self) -> bool:
        """Whether both adapters are still on the denoiser (diffusers' `unload_lora_weights`, `delete_adapters` or
        `unet.unload_lora()` remove them behind our back)."""
        if not self._layers:
            return False
        existing = adapter_configs(self.denoiser)
        if any(name not in existing for name in self.names.values()):
            return False
        path = self.config.linears[0].module_path
        try:
            return self.denoiser.get_submodule(path) is self._layers[0]
        except AttributeError:
            return False

    # ------------------------------------------------------------------ writing weights
    def _pairs(self, adapter_name: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """`(lora_A.weight, lora_B.weight)` of an adapter on every target layer that has it."""
        return [pair for pair in (lora_factors(layer, adapter_name) for layer in self._layers) if pair is not None]

    def _check_branch(self, branch: str) -> None:
        if branch == "base" and not self.config.has_base:
            raise InvalidArgumentError(
                "This checkpoint has no Base branch; its 'base' adapter is a zero placeholder: write branch 'id'.",
                argument="branch",
            )

    def _group_destinations(self, branch: str, groups: list[BankGroup]) -> list[tuple[list[nn.Parameter], ...]]:
        """`(lora_A weights, lora_B weights)` of every shape group's members, cached per branch."""
        key = (branch, tuple(group.members for group in groups))
        cached = self._destinations.get(key)
        name = self.names[branch]
        if cached is not None and cached[0][0][0] is not lora_factors(self._layers[groups[0].members[0]], name)[0]:
            cached = None  # parameters were replaced (e.g. `load_state_dict(..., assign=True)`)
        if cached is None:
            cached = []
            for group in groups:
                pairs = [lora_factors(self._layers[i], name) for i in group.members]
                cached.append(([a for a, _ in pairs], [b for _, b in pairs]))
            self._destinations = {key: cached}
        return cached

    def _while_unmerged(self, branch: str, update: Callable[[], object]) -> None:
        update_while_unmerged(self._layers, self.names[branch], update)

    @torch.no_grad()
    def write(self, branch: str, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy `(down [r, in], up [out, r])` factors, one per target linear, into the adapter in place."""
        self._check_branch(branch)
        self.write_factors(self.names[branch], weights)

    def write_factors(self, adapter_name: str, weights: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one `(A, B)` pair per target linear into adapter `adapter_name` (merged layers are re-merged): `write`
        by adapter name, for any of this object's adapters (a Base placeholder or a slider too)."""
        pairs = self._pairs(adapter_name)
        if len(pairs) != len(weights):
            raise InvalidArgumentError(
                f"Expected {len(pairs)} (down, up) pairs for {adapter_name!r}, got {len(weights)}: pass one pair per "
                "target linear of this checkpoint (`predictor.lora_weights(identity, branch)`)."
            )

        def update() -> None:
            destinations = [a for a, _ in pairs] + [b for _, b in pairs]
            foreach_copy_(destinations, [down for down, _ in weights] + [up for _, up in weights])

        update_while_unmerged(self._layers, adapter_name, update)

    @torch.no_grad()
    def write_mixed(self, branch: str, groups: list[BankGroup], mixed: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a bank's grouped result (`BasisBank.mix`) into the adapter: a few ops per shape group.

        Args:
            branch: `"id"` or `"base"`.
            groups: the bank's shape groups (`BasisBank.groups`), members in checkpoint order.
            mixed: for every group `(down [G, r, in], up [G, out, r])`, any dtype and device.
        """
        self._check_branch(branch)
        if len(groups) != len(mixed):
            raise InvalidArgumentError(
                f"Expected factors for {len(groups)} shape groups, got {len(mixed)}: pass what this checkpoint's "
                "`BasisBank.mix` returns."
            )
        destinations = self._group_destinations(branch, groups)

        def update() -> None:
            targets, sources = [], []
            for (lora_a, lora_b), (down, up) in zip(destinations, mixed):
                for params, factors in ((lora_a, down), (lora_b, up)):
                    first = params[0]
                    # One contiguous copy per group in the live dtype/device, then per-linear views of it.
                    staged = torch.empty(factors.shape, dtype=first.dtype, device=first.device).copy_(factors)
                    targets.extend(params)
                    sources.extend(staged.unbind(0))
            foreach_copy_(targets, sources)

        self._while_unmerged(branch, update)

    @torch.no_grad()
    def clear(self, branch: str) -> None:
        """Make a branch contribute nothing (its up matrices become zero)."""
        ups = [lora_b for _, lora_b in self._pairs(self.names[branch])]
        self._while_unmerged(branch, lambda: foreach_zero_(ups))

    def live_device_dtype(self) -> tuple[torch.device, torch.dtype] | None:
        """Device and dtype of the live ID factors (one parameter looked at), `None` when detached."""
        pairs = self._pairs(self.names["id"])
        return (pairs[0][0].device, pairs[0][0].dtype) if pairs else None

    def lora_parameters(self, branch: str = "id") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live `(lora_A.weight, lora_B.weight)` of every target linear of a branch."""
        return self._pairs(self.names[branch])

    # ------------------------------------------------------------------ sliders
    @torch.no_grad()
    def put_slider(
        self, name: str, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float, replace: bool = False
    ) -> None:
        """Write rank-`2r` slider factors into adapter `name` and make it active at `weight` (other active adapters
        stay active with their weights).

        Args:
            replace: `name` is a slider of ours already on the denoiser: its factors are rewritten in place.
                Otherwise a new adapter is registered; a name any adapter already has is refused.
        """
        exists = name in adapter_configs(self.denoiser)
        if exists and not replace:
            raise AdapterNameConflictError(
                f"The {self.denoiser.__class__.__name__} already has an adapter named {name!r}. Pick another "
                f"slider name (`adapter_name=...`) or delete that adapter first (`pipe.delete_adapters({name!r})`).",
                argument="adapter_name",
            )
        if not exists:
            if len(factors) != len(self._layers):
                raise InvalidArgumentError(
                    f"Expected slider factors for {len(self._layers)} linears, got {len(factors)}: pass one pair per "
                    "target linear of this checkpoint (`HyperLoRASlider.lora_weights(predictor)`)."
                )
            paths = [linear.module_path for linear in self.config.linears]
            lora_config = LoraConfig(
                r=slider_rank(self.config), lora_alpha=slider_alpha(self.config), target_modules=paths
            )
            previously_active = active_adapters(self.denoiser)
            add_adapter(self.denoiser, lora_config, name)
            set_active_adapters(self.denoiser, previously_active, {})  # activated below, beside these
        self.write_factors(name, factors)
        activate_adapter(self.denoiser, name, weight)

    def remove_adapters(self, names: Collection[str]) -> None:
        """Delete the named adapters that are still on the denoiser (a user may have deleted some already); fused
        ones are first taken out of the base weights."""
        present = [name for name in names if name in adapter_configs(self.denoiser)]
        if present:
            unmerge_adapters(self.denoiser.modules(), present)  # a fused update leaves the base weights too
            self.denoiser.delete_adapters(present)

    # ------------------------------------------------------------------ removal
    def detach(self) -> None:
        """Delete both adapters; remove the PEFT wrappers entirely when no other adapter is left.

        Fused layers are first restored exactly and the user's other fused adapters merged again; layers that
        keep other adapters keep the exact merge/unmerge. Adapters already removed by diffusers are skipped, so
        detaching twice, or after `pipe.unload_lora_weights()`, is a no-op.
        """
        names = list(self.names.values())
        if self.is_attached():
            unmerge_adapters(self._layers, names)
        self._destinations = {}
        self._layers = []
        _delete_adapters(self.denoiser, names)


def remove_partial_adapters(denoiser: nn.Module, names: Collection[str], active: list[str]) -> None:
    """Undo a failed `attach`: delete the named adapters it added, re-activate `active`, and remove the PEFT
    wrappers when no adapter is left (as `detach` does)."""
    _delete_adapters(denoiser, names)
    remaining = adapter_configs(denoiser)
    if remaining and active:
        set_active_adapters(denoiser, [name for name in active if name in remaining], {})


def _delete_adapters(denoiser: nn.Module, names: Collection[str]) -> None:
    """Delete the named adapters still on the denoiser (diffusers may have removed some already); remove the PEFT
    wrappers entirely when no adapter is left."""
    present = [name for name in names if name in adapter_configs(denoiser)]
    if present:
        denoiser.delete_adapters(present)
    if not adapter_configs(denoiser):
        remove_peft_wrappers(denoiser)


@dataclass
class AdapterSnapshot:
    """Detached HyperLoRA adapters, ready to be put back bitwise (`HyperLoRAAdapters.snapshot`): used to roll back
    a load that failed after the old adapters were removed."""

    config: HyperLoRAConfig
    names: dict[str, str]
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # by adapter name: ID, Base, then the sliders
    active: list[str]
    scales: dict[str, dict[str, float]]  # by layer path: adapter name -> PEFT scale
    merged: dict[str, list[str]]  # by layer path: our adapters that were fused there

    @torch.no_grad()
    def restore(self, denoiser: nn.Module) -> HyperLoRAAdapters:
        """Attach the adapters again with the same factors, sliders, active set, scales and fused state."""
        adapters = HyperLoRAAdapters.attach(denoiser, self.config, self.names["id"], self.names["base"])
        for name, factors in self.factors.items():
            if name in self.names.values():  # ID and Base (a zero placeholder too) as they were
                adapters.write_factors(name, factors)
            else:
                adapters.put_slider(name, factors, weight=1.0)  # the scale is put back below
        set_active_adapters(denoiser, self.active, {})
        for path, module in denoiser.named_modules():
            for name, scale in self.scales.get(path, {}).items():
                set_adapter_scale(module, name, scale)
            if self.merged.get(path):
                module.merge(adapter_names=self.merged[path])
        return adapters


@torch.no_grad()
def unmerge_adapters(layers: Iterable[nn.Module], names: Collection[str]) -> None:
    """Take the named adapters out of the base weights where they are fused; other fused adapters stay fused.

    Call before deleting fused adapters: PEFT's `delete_adapter` leaves a merged update in the base weight.
    """
    for layer in layers:
        if not isinstance(layer, BaseTunerLayer) or not any(n in names for n in merged_adapter_names(layer)):
            continue
        others = [n for n in merged_adapter_names(layer) if n not in names]
        layer.unmerge()  # exact restore of the base weights
        if others:  # other fused adapters stay fused, with a fresh exact snapshot
            layer.merge(adapter_names=others)
