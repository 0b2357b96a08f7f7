"""Where the predictor computes and rests on one pipeline: its device/offload policy.

The predictor is not a pipeline component, so diffusers' device moves and accelerate's offload hooks never see
it. `Placement` follows the pipeline instead:

- it computes on the pipeline's execution device, in the denoiser's dtype (`sync`), with `offload_bank` keeping the
  basis banks in CPU memory (pinned when they feed a GPU);
- under `enable_model_cpu_offload` it goes back to the CPU after each use, like the offloaded models (`rest`);
- under `enable_sequential_cpu_offload` the live adapter weights are `meta` placeholders: writes run with the
  offload hooks lifted, and the offload is enabled again afterwards (`lifted`);
- diffusers' group offloading (`enable_group_offload`) keeps its own copies of the weights, which an in-place
  write would miss: it is refused with `UnsupportedPipelineError` (`check_supported`).

Without a pipeline (the command line predicts and exports with the predictor alone), `place_alone` puts it on a
device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedPipelineError
from ..utils.compat import (
    execution_device,
    group_offload_enabled,
    has_accelerate_hook,
    remove_accelerate_hooks,
    sequential_offload_device,
)

BANK_MODULES = ("id_bank", "base_bank")


class Placement:
    """The device/offload policy of the predictor on one pipeline.

    Args:
        pipe: the pipeline.
        denoiser: returns the pipeline's denoiser (asked each time: components can be replaced).
    """

    def __init__(self, pipe: Any, denoiser: Callable[[], nn.Module]) -> None:
        self.pipe = pipe
        self.denoiser = denoiser

    def check_supported(self) -> None:
        """Raise `UnsupportedPipelineError` when diffusers' group offloading manages the denoiser."""
        denoiser = self.denoiser()
        if group_offload_enabled(denoiser):
            raise UnsupportedPipelineError(
                f"The {denoiser.__class__.__name__} uses diffusers' group offloading (`enable_group_offload`), which "
                "keeps its own copies of the weights: HyperLoRA's in-place identity writes would not reach them. "
                "Use `pipe.enable_model_cpu_offload()` or `pipe.enable_sequential_cpu_offload()` instead (or none)."
            )

    def execution_device(self) -> torch.device:
        """Where the pipeline computes (accelerate's offload hooks included)."""
        device = execution_device(self.pipe)
        return device if device is not None else self.denoiser().device

    def offloaded(self) -> bool:
        """Whether accelerate's CPU offload hooks manage the denoiser (`enable_*_cpu_offload`)."""
        return has_accelerate_hook(self.denoiser())

    def sync(self, predictor: nn.Module, offload_bank: bool) -> nn.Module:
        """Put the predictor on the execution device in the denoiser's dtype; with `offload_bank` the banks stay
        in CPU memory (pinned when they feed a GPU) and are streamed during a switch."""
        device, dtype = self.execution_device(), self.denoiser().dtype
        if not offload_bank:
            if predictor.device != device or predictor.dtype != dtype:
                predictor.to(device=device, dtype=dtype)
            return predictor
        for name, module in predictor.named_children():
            if name in BANK_MODULES:
                keep_on_cpu(module, dtype, pin=device.type == "cuda")
            elif module is not None:
                module.to(device=device, dtype=dtype)
        return predictor

    def rest(self, predictor: nn.Module) -> bool:
        """Under CPU offload, send the predictor back to the CPU after use; whether it was moved."""
        if not self.offloaded():
            return False
        predictor.to("cpu")
        return True

    @contextmanager
    def lifted(self, live: tuple[torch.device, torch.dtype] | None) -> Iterator[bool]:
        """Under `enable_sequential_cpu_offload` (the live adapter weights `live` are on `meta`), lift the offload
        hooks so the real weights come back, run the block, then offload again. Yields whether it lifted."""
        if live is None or live[0].type != "meta":
            yield False
            return
        device = sequential_offload_device(self.pipe)
        remove_accelerate_hooks(self.pipe)
        try:
            yield True
        finally:
            self.pipe.enable_sequential_cpu_offload(device=device)


def place_alone(predictor: nn.Module, device: torch.device) -> nn.Module:
    """The predictor on `device` without a pipeline, in its own dtype, except on a CPU: there its small networks
    run in float32 (16-bit matmuls are slow, or missing, on CPUs), and the basis banks keep their dtype, since they
    accumulate in float32 whatever their storage dtype (half the memory)."""
    if device.type == "cpu":
        for name, module in predictor.named_children():
            if name not in BANK_MODULES and module is not None:
                module.float()
    return predictor.to(device)


def keep_on_cpu(bank: nn.Module, dtype: torch.dtype, pin: bool) -> None:
    """Keep a basis bank in CPU memory in the denoiser's dtype, page-locked when it feeds a GPU."""
    for param in bank.parameters():
        data = param.data
        if data.device.type != "cpu" or data.dtype != dtype:
            data = data.to(device="cpu", dtype=dtype)
        if pin and not data.is_pinned():
            data = data.pin_memory()
        param.data = data
