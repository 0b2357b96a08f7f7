"""Serving many people: identity switches through the prepared-identity cache, and per-sample identities.

`IdentityServing` is what the pipeline's controller (`pipe.hyperlora`) uses to write identities into its
adapters: one identity for the whole batch (`write`, the body of `pipe.set_hyperlora_identity`), or one identity
per prompt (`set_identities`, behind `pipe.set_hyperlora_identities`). Either way an identity's factors come from
the cache when it was prepared before, so returning to a person costs only the copy into the adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import IdentityCountError, PerSampleFusedError
from ..identities.cache import DEFAULT_CACHE_BYTES, PreparedFactors, PreparedIdentityCache
from ..identities.identity import HyperLoRAIdentity
from ..model.predictor import HyperLoRAPredictor
from ..utils.compat import merged_adapter_names
from .peft_adapters import HyperLoRAAdapters
from .per_sample import PerSampleLoRA, per_sample_branches


def mix_identity(predictor: HyperLoRAPredictor, identity: HyperLoRAIdentity) -> PreparedFactors:
    """The bank's grouped float32 factors of every branch the identity has (`{"id": ..., "base": ...}`)."""
    mixed = {}
    for branch in ("id", "base") if predictor.config.has_base else ("id",):
        coefficients = identity.coefficients(branch)
        if coefficients is not None:
            bank = predictor.bank(branch)
            mixed[branch] = bank.mix(predictor.split_coefficients(coefficients.to(predictor.device)))
    return mixed


class IdentityServing:
    """Identity writes of one loaded HyperLoRA: cached switches and the per-sample mode.

    Args:
        predictor: the loaded predictor (already on the device/dtype the caller wants it to mix on).
        adapters: its `"id"`/`"base"` adapters on the denoiser.
        cache_bytes: byte budget of the prepared-identity cache (0 disables it).
    """

    def __init__(
        self,
        predictor: HyperLoRAPredictor,
        adapters: HyperLoRAAdapters,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.predictor = predictor
        self.adapters = adapters
        self.cache = PreparedIdentityCache(cache_bytes)
        self._layers = adapters.layers
        self._per_sample = PerSampleLoRA(adapters.denoiser, self._layers, adapters.is_attached)
        self.identities: list[HyperLoRAIdentity] | None = None

    @property
    def per_sample_active(self) -> bool:
        """Whether the next denoiser calls use one identity per prompt (not once diffusers removed the adapters)."""
        return self._per_sample.active and self.adapters.is_attached()

    def prepare(self, identity: HyperLoRAIdentity) -> PreparedFactors:
        """The identity's factors in the live adapters' dtype and device (cached)."""
        live = self.adapters.live_device_dtype()
        device, dtype = live if live is not None else (self.predictor.device, torch.float32)
        return self.cache.prepare(identity, lambda: mix_identity(self.predictor, identity), dtype, device)

    def write(self, identity: HyperLoRAIdentity) -> None:
        """One identity for the whole batch: leave the per-sample mode, copy the factors into the adapters."""
        prepared = self.prepare(identity)
        self.leave_per_sample()
        if self.predictor.config.has_base and "base" not in prepared:
            self.adapters.clear("base")
        for branch, factors in prepared.items():
            self.adapters.write_mixed(branch, self.predictor.bank(branch).groups, factors)

    def set_identities(self, identities: Sequence[HyperLoRAIdentity]) -> None:
        """One identity per prompt from the next denoiser call on. Validated and prepared before anything
        changes; the live adapters then hold zeros and the per-sample hooks add each row's LoRA."""
        identities = list(identities)
        if not identities:
            raise IdentityCountError(
                "set_hyperlora_identities() got no identities: pass at least one identity (one per prompt).",
                argument="identities",
            )
        for identity in identities:
            self.predictor.check_identity(identity)
        self._check_unfused()
        prepared = [self.prepare(identity) for identity in identities]
        names = self.adapters.names
        groups = {"id": self.predictor.bank("id").groups}
        if self.predictor.config.has_base:
            groups["base"] = self.predictor.bank("base").groups
        self._per_sample.set_factors(per_sample_branches(names, groups, prepared), len(identities))
        self.adapters.clear("id")
        if self.predictor.config.has_base:
            self.adapters.clear("base")
        self.identities = identities

    def _check_unfused(self) -> None:
        names = set(self.adapters.names.values())
        for layer in self._layers:
            fused = names.intersection(merged_adapter_names(layer))
            if fused:
                raise PerSampleFusedError(
                    f"HyperLoRA's {sorted(fused)} adapter is fused; per-sample identities need it unfused (one merged "
                    "weight cannot hold several people). Call `pipe.unfuse_lora()` first, or keep one identity for "
                    "the whole batch with `pipe.set_hyperlora_identity(x)`."
                )

    def leave_per_sample(self) -> None:
        """Remove the per-sample hooks (the adapters' own factors apply again)."""
        self._per_sample.remove()
        self.identities = None

    def close(self) -> None:
        """Before the adapters go away (unload, re-attach): no hooks left behind, cache dropped."""
        self.leave_per_sample()
        self.cache.clear()
