"""Exact fuse/unfuse for the PEFT layers HyperLoRA writes into.

`pipe.fuse_lora()` merges the adapters into the base weights through each PEFT layer's `merge`, and
PEFT's `unmerge` subtracts the delta again, which is not exact in 16-bit (each fuse/unfuse cycle leaves rounding
residue). Every target layer therefore gets an *exact* merge: the first merge keeps a copy of the layer's base
weight, and unmerging copies it back bitwise. An identity switch while fused restores the base weight from that
copy, writes the new factors and merges again, so after any number of switches a final `pipe.unfuse_lora()`
leaves the base weights bitwise equal to the originals. The copy costs the memory of the target linears' base
weights while (and only while) they are fused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..utils.compat import mark_unmerged, merged_adapter_names, override_merge, peft_merge, peft_unmerge

# Attribute of a PEFT layer that holds its pre-merge base weights while it is merged.
_SNAPSHOT = "_hyperlora_base_snapshot"


@dataclass
class _BaseSnapshot:
    """The base layer's weight (and bias) as they were before the first merge."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _take_snapshot(layer: BaseTunerLayer) -> None:
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    layer.__dict__[_SNAPSHOT] = _BaseSnapshot(
        base.weight.detach().clone(), None if bias is None else bias.detach().clone()
    )


@torch.no_grad()
def restore_base_weights(layer: BaseTunerLayer, keep: bool) -> bool:
    """Copy the pre-merge base weights back (bitwise) and mark the layer unmerged. False when there is no copy."""
    snapshot: _BaseSnapshot | None = layer.__dict__.get(_SNAPSHOT)
    if snapshot is None:
        return False
    base = layer.get_base_layer()
    base.weight.data.copy_(snapshot.weight)
    if snapshot.bias is not None:
        base.bias.data.copy_(snapshot.bias)
    mark_unmerged(layer)
    if not keep:
        del layer.__dict__[_SNAPSHOT]
    return True


def _exact_merge(self: BaseTunerLayer, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    """PEFT's `merge`, keeping a copy of the base weights first so that unmerging can be exact."""
    fresh = not merged_adapter_names(self) and _SNAPSHOT not in self.__dict__
    if fresh:
        _take_snapshot(self)
    peft_merge(self, adapter_names, safe_merge=safe_merge)
    if not merged_adapter_names(self) and _SNAPSHOT in self.__dict__:
        del self.__dict__[_SNAPSHOT]  # nothing was merged (no such adapter on this layer)


def _exact_unmerge(self: BaseTunerLayer) -> None:
    """Restore the base weights from the pre-merge copy (bitwise); PEFT's subtraction when there is none."""
    if not merged_adapter_names(self):
        return  # nothing merged (diffusers' unfuse_lora visits every layer)
    if restore_base_weights(self, keep=False):
        return
    peft_unmerge(self)


def install_exact_merge(layer: BaseTunerLayer) -> None:
    """Give one PEFT layer the exact merge / unmerge (instance methods; `copy.deepcopy` rebinds them)."""
    override_merge(layer, _exact_merge, _exact_unmerge)
