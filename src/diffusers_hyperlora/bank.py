"""The basis bank: coefficients -> LoRA matrices for every target linear (spec section 3.3, step 5).

For each LoRA'd linear there are `K` down bases `[K, in, r]` and `K` up bases `[K, r, out]`; a LoRA is a
weighted sum of them. Linears of the same shape are stacked into one tensor per shape ("group"), so mixing
the whole bank is a handful of batched matrix products that read every basis exactly once, which is what
bounds an identity switch by memory bandwidth. Accumulation is float32 whatever the storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .targets import TargetLinear

# Upcasting a 16-bit bank to float32 is done this many elements at a time, to bound the temporary copy.
_UPCAST_CHUNK_ELEMENTS = 1 << 24


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


def mix_bases(coefficients: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """`out[g] = sum_k coefficients[g, k] * bases[g, k]`, accumulated in float32.

    Args:
        coefficients: `[G, K]`.
        bases: `[G, K, ...]`, any float dtype, any device (the result lives on `coefficients.device`).

    Returns:
        `[G, ...]` float32.
    """
    groups, num_basis = bases.shape[:2]
    flat = bases.reshape(groups, num_basis, -1)
    coefficients = coefficients.to(torch.float32).unsqueeze(1)
    device = coefficients.device
    if flat.dtype == torch.float32 and flat.device == device:
        return torch.bmm(coefficients, flat).reshape(groups, *bases.shape[2:])
    out = torch.empty(groups, flat.shape[-1], dtype=torch.float32, device=device)
    step = max(1, _UPCAST_CHUNK_ELEMENTS // flat[0].numel())
    for start in range(0, groups, step):
        chunk = flat[start : start + step].to(device=device, dtype=torch.float32, non_blocking=True)
        torch.bmm(coefficients[start : start + step], chunk, out=out[start : start + step].unsqueeze(1))
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

    def mix(self, coefficients: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-group LoRA factors from `[num_linears, 2, K]` coefficients (token 0: down, token 1: up).

        Returns, for every group, `(down [G, r, in], up [G, out, r])` in float32, on `coefficients.device`.
        """
        if coefficients.shape != (self.num_linears, 2, self.num_basis):
            raise ValueError(
                f"Expected coefficients of shape {(self.num_linears, 2, self.num_basis)}, got {tuple(coefficients.shape)}."
            )
        result = []
        for g, group in enumerate(self.groups):
            index = torch.tensor(group.members, device=coefficients.device)
            picked = coefficients.index_select(0, index)
            down = mix_bases(picked[:, 0], self.down[g]).transpose(1, 2)  # [G, in, r] -> [G, r, in]
            up = mix_bases(picked[:, 1], self.up[g]).transpose(1, 2)  # [G, r, out] -> [G, out, r]
            result.append((down, up))
        return result

    def lora_weights(self, coefficients: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(down [r, in], up [out, r])` float32 for every linear, in checkpoint order."""
        mixed = self.mix(coefficients)
        return [(mixed[g][0][p], mixed[g][1][p]) for g, p in self.locations]
