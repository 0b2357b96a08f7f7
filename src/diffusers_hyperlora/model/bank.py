"""The basis bank: coefficients -> LoRA matrices for every target linear (docs/math.md, step 5).

For each LoRA'd linear there are `K` down bases `[K, in, r]` and `K` up bases `[K, r, out]`; a LoRA is a
weighted sum of them. Linears of the same shape are stacked into one tensor per shape ("group"), so mixing
the whole bank is a handful of batched matrix products that read every basis exactly once, which is what
bounds an identity switch by memory bandwidth. Accumulation is float32 whatever the storage dtype.

A 16-bit bank can instead be mixed by one compiled kernel (`BasisBank.compile_mix`): `torch.compile` (inductor)
turns `sum_k c[g, k] * float(bases[g, k])` into one reduction loop with the conversion inside, so no float32
copy of the bank is ever staged. It is opt-in because the first switch pays the compilation (seconds to a minute
on a small CPU); see docs/performance.md for what it gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import logging
from torch import nn

from ..errors import InvalidArgumentError
from .targets import TargetLinear

logger = logging.get_logger(__name__)

# A 16-bit bank (or one that lives on another device) is upcast / streamed this many elements at a time. The
# float32 staging copy of one chunk (32 MiB at 2**23 elements) fits a server CPU's last-level cache, and is one
# modest transfer over PCIe, so the bank is read from memory exactly once and no full-size float32 copy ever
# exists. Smaller chunks measured slower on CPU (per-chunk overhead of the copy + batched GEMV), larger ones spill
# the cache (see docs/performance.md).
STREAM_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class BankGroup:
    """Linears that share a shape, stacked together. `members` index the checkpoint's linear order."""

    in_features: int
    out_features: int
    members: tuple[int, ...]


def group_linears(linears: list[TargetLinear]) -> list[BankGroup]:
    """Group linears by `(in_features, out_features)`, groups in order of first appearance."""
    members: dict[tuple[int, int], list[int]] = {}
    for index, linear in enumerate(linears):
        members.setdefault((linear.in_features, linear.out_features), []).append(index)
    return [BankGroup(i, o, tuple(m)) for (i, o), m in members.items()]


def _fused_mix(coefficients: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """`[G, K] x [G, K, N] -> [G, N]`: the reduction the compiled kernel is generated from."""
    return (coefficients.unsqueeze(-1) * bases.to(torch.float32)).sum(1)


_COMPILED_MIX: dict[str, object] = {}


def compiled_mix(coefficients: torch.Tensor, bases: torch.Tensor) -> torch.Tensor | None:
    """`out[g] = sum_k coefficients[g, k] * bases[g, k]` by one compiled inductor kernel, float32 accumulation.

    The kernel is compiled once per process for dynamic shapes (every shape group shares it). Returns `None` when
    compilation is unavailable here (no C++ compiler, unsupported device): the caller then uses `mix_bases`.
    """
    kernel = _COMPILED_MIX.get("kernel")
    if kernel is False:
        return None
    if kernel is None:
        kernel = _COMPILED_MIX["kernel"] = torch.compile(_fused_mix, dynamic=True, fullgraph=True)
    groups, num_basis = bases.shape[:2]
    try:
        out = kernel(coefficients.to(torch.float32), bases.reshape(groups, num_basis, -1))
    except Exception as error:  # noqa: BLE001  (inductor raises many kinds; any of them means "not here")
        logger.warning(f"Compiled bank mixing is not available ({type(error).__name__}); using the eager path.")
        _COMPILED_MIX["kernel"] = False
        return None
    return out.reshape(groups, *bases.shape[2:])


def mix_bases(
    coefficients: torch.Tensor,
    bases: torch.Tensor,
    chunk_elements: int | None = None,
    staging: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out[g] = sum_k coefficients[g, k] * bases[g, k]`, accumulated in float32.

    A float32 bank on the coefficients' device is one batched matrix product. Any other bank (16-bit, or kept on
    another device such as CPU memory while the coefficients are on a GPU) is streamed: slices of at most
    `chunk_elements` (default `STREAM_CHUNK_ELEMENTS`) are moved to the coefficients' device, upcast into one
    reused float32 staging buffer and multiplied there. Every basis element is read once either way.

    Args:
        coefficients: `[G, K]`.
        bases: `[G, K, ...]`, any float dtype, any device (the result lives on `coefficients.device`).
        chunk_elements: force the streamed path with this chunk size (tests and tuning).
        staging: a reusable float32 buffer on the coefficients' device for the streamed path (allocated when
            missing or too small).

    Returns:
        `[G, ...]` float32.
    """
    groups, num_basis = bases.shape[:2]
    flat = bases.reshape(groups, num_basis, -1)
    width = flat.shape[-1]
    device = coefficients.device
    coefficients = coefficients.to(torch.float32).unsqueeze(1)  # [G, 1, K]
    if chunk_elements is None and flat.dtype == torch.float32 and flat.device == device:
        return torch.bmm(coefficients, flat).reshape(groups, *bases.shape[2:])
    if torch.is_grad_enabled() and (bases.requires_grad or coefficients.requires_grad):
        # Differentiable (training): one upcast copy, no in-place staging.
        return torch.bmm(coefficients, flat.to(device=device, dtype=torch.float32)).reshape(groups, *bases.shape[2:])
    chunk = max(num_basis, chunk_elements or STREAM_CHUNK_ELEMENTS)
    columns = min(width, max(1, chunk // num_basis))
    members = max(1, chunk // (num_basis * width)) if columns == width else 1
    members = min(members, groups)
    out = torch.empty(groups, 1, width, dtype=torch.float32, device=device)
    needed = members * num_basis * columns
    if staging is None or staging.numel() < needed or staging.device != device or staging.dtype != torch.float32:
        staging = torch.empty(needed, dtype=torch.float32, device=device)
    result = torch.empty(members * columns, dtype=torch.float32, device=device)
    for start in range(0, groups, members):
        stop = min(groups, start + members)
        for first in range(0, width, columns):
            last = min(width, first + columns)
            source = flat[start:stop, :, first:last]
            if source.device != device:
                source = source.to(device, non_blocking=True)
            upcast = staging[: (stop - start) * num_basis * (last - first)].view(stop - start, num_basis, last - first)
            upcast.copy_(source)
            if last - first == width:
                torch.bmm(coefficients[start:stop], upcast, out=out[start:stop])
            else:
                part = result[: last - first].view(1, 1, last - first)
                torch.bmm(coefficients[start:stop], upcast, out=part)
                out[start:stop, :, first:last].copy_(part)
    return out.reshape(groups, *bases.shape[2:])


class BasisBank(nn.Module):
    """The down and up bases of one branch (ID or Base) for every target linear.

    Parameters `down.{g}` are `[G, K, in, r]` and `up.{g}` are `[G, K, r, out]` for shape group `g`.

    Args:
        linears: the target linears, in checkpoint order.
        num_basis: `K`.
        rank: LoRA rank `r` of this branch.
    """

    def __init__(
        self,
        linears: list[TargetLinear],
        num_basis: int,
        rank: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_basis = num_basis
        self.rank = rank
        self.num_linears = len(linears)
        self.groups = group_linears(linears)
        self._orders: dict[torch.device, torch.Tensor] = {}
        self._staging: dict[torch.device, torch.Tensor] = {}
        self.compiled = False
        factory = {"dtype": dtype, "device": device}
        self.down = nn.ParameterList(
            nn.Parameter(torch.empty(len(g.members), num_basis, g.in_features, rank, **factory)) for g in self.groups
        )
        self.up = nn.ParameterList(
            nn.Parameter(torch.empty(len(g.members), num_basis, rank, g.out_features, **factory)) for g in self.groups
        )
        # (group, position in group) of every linear, in checkpoint order.
        self.locations: list[tuple[int, int]] = [(0, 0)] * len(linears)
        for g, group in enumerate(self.groups):
            for position, index in enumerate(group.members):
                self.locations[index] = (g, position)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random bases: a unit-norm coefficient vector then gives LoRA factors of the usual init scale."""
        for g, group in enumerate(self.groups):
            nn.init.normal_(self.down[g], std=group.in_features**-0.5)
            nn.init.normal_(self.up[g], std=0.02)

    def _group_order(self, device: torch.device) -> torch.Tensor:
        """Linear indices grouped by shape group (cached per device): one gather sorts all coefficients."""
        order = self._orders.get(device)
        if order is None:
            members = [index for group in self.groups for index in group.members]
            order = torch.tensor(members, dtype=torch.long, device=device)
            self._orders[device] = order
        return order

    def compile_mix(self, enabled: bool = True) -> None:
        """Mix 16-bit banks with one compiled fused kernel (`compiled_mix`) instead of chunked upcasts.

        Same numbers within float32 rounding; several times faster on CPU, where there is no fast 16-bit matrix
        product. The first switch afterwards compiles the kernel. Float32 banks keep the batched matrix product
        (measured faster than the compiled reduction), and so does training (autograd).
        """
        self.compiled = enabled

    def _mix_group(
        self, coefficients: torch.Tensor, bases: torch.Tensor, chunk_elements: int | None, staging
    ) -> torch.Tensor:
        use_kernel = (
            self.compiled
            and chunk_elements is None
            and bases.dtype != torch.float32
            and bases.device == coefficients.device
            and not (torch.is_grad_enabled() and bases.requires_grad)
        )
        if use_kernel:
            out = compiled_mix(coefficients, bases.detach())
            if out is not None:
                return out
        return mix_bases(coefficients, bases, chunk_elements, staging)

    def mix(
        self, coefficients: torch.Tensor, chunk_elements: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-group LoRA factors from `[num_linears, 2, K]` coefficients (token 0: down, token 1: up).

        Args:
            coefficients: `[num_linears, 2, K]`, on the device where the result is wanted.
            chunk_elements: force streaming the bank in chunks of this many elements (see `mix_bases`).

        Returns, for every group, `(down [G, r, in], up [G, out, r])` in float32, on `coefficients.device`
        (transposed views of the mixed `[G, in, r]` / `[G, r, out]` products).
        """
        if coefficients.shape != (self.num_linears, 2, self.num_basis):
            expected = (self.num_linears, 2, self.num_basis)
            raise InvalidArgumentError(
                f"Expected coefficients of shape {expected}, got {tuple(coefficients.shape)}.", argument="coefficients"
            )
        device = coefficients.device
        ordered = coefficients.to(torch.float32).index_select(0, self._group_order(device))
        staging = self._staging_buffer(device, chunk_elements)
        result = []
        for g, picked in enumerate(ordered.split([len(group.members) for group in self.groups])):
            down = self._mix_group(picked[:, 0], self.down[g], chunk_elements, staging).transpose(1, 2)  # [G, r, in]
            up = self._mix_group(picked[:, 1], self.up[g], chunk_elements, staging).transpose(1, 2)  # [G, out, r]
            result.append((down, up))
        return result

    def _staging_buffer(self, device: torch.device, chunk_elements: int | None) -> torch.Tensor | None:
        """The float32 staging buffer of the streamed path, kept per device (None when nothing is streamed)."""
        streamed = chunk_elements is not None or any(
            p.dtype != torch.float32 or p.device != device for p in (*self.down, *self.up)
        )
        if not streamed:
            return None
        size = max(chunk_elements or STREAM_CHUNK_ELEMENTS, self.num_basis)
        buffer = self._staging.get(device)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.float32, device=device)
            self._staging = {device: buffer}
        return buffer

    def lora_weights(
        self, coefficients: torch.Tensor, chunk_elements: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(down [r, in], up [out, r])` float32 for every linear, in checkpoint order."""
        mixed = self.mix(coefficients, chunk_elements)
        return [(mixed[g][0][p], mixed[g][1][p]) for g, p in self.locations]
