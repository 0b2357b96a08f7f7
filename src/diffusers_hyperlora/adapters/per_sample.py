"""Per-sample identities: prompt *i* of a batch gets identity *i*'s LoRA on the adapters' target linears.

A PEFT layer applies one set of LoRA factors to the whole batch. For a batch of different people,
`PerSampleLoRA` keeps every identity's factors stacked (`[N, r, in]` / `[N, out, r]` per target linear) and adds
`scale * (x_j @ A_i^T) @ B_i^T` to the output of sample `j`, where `i` is sample `j`'s identity, through a forward
hook on each target layer. The live `"id"` / `"base"` adapters hold zeros meanwhile, so the adapters' own
forward adds nothing; every other adapter on the same layers (a style LoRA) runs as usual, and the scale is read
from the layer at every call, so `pipe.set_adapters(["id", "base"], [w_id, w_base])` applies.

Which identity a batch row belongs to follows diffusers' batch layout: the images of a call are split into `N`
equal consecutive groups, group `i` for identity `i` (one prompt per identity, its `num_images_per_prompt` copies
consecutive), and with classifier-free guidance the batch is `[uncond, cond]`, two halves of that layout. A
forward pre-hook on the denoiser works the row -> identity map out once per call, from the call itself
(`call_layout`): the guidance of the pipeline that runs it, whichever pipeline shares the denoiser, checked
against the batch. Fused adapters cannot be per-sample (the merged weight is one matrix for the whole batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import IdentityCountError, PerSampleFusedError
from ..model.bank import BankGroup
from ..utils.compat import (
    adapter_runs_in_forward,
    adapter_scale,
    calling_pipeline_guidance,
    denoiser_call_inputs,
    lora_factors,
    merged_adapter_names,
)

# For each branch ("id", "base"), one entry per identity: the bank's grouped factors (`BasisBank.mix`),
# `(down [G, r, in], up [G, out, r])` per shape group.
GroupedFactors = list[tuple[torch.Tensor, torch.Tensor]]


def batch_rows(num_identities: int, batch: int, guidance: bool) -> torch.Tensor:
    """The identity index of every row of a denoiser batch of size `batch`.

    >>> batch_rows(2, 4, guidance=False).tolist()  # 2 prompts x 2 images each
    [0, 0, 1, 1]
    >>> batch_rows(2, 4, guidance=True).tolist()  # [uncond, cond] halves, 1 image per prompt
    [0, 1, 0, 1]
    """
    halves = 2 if guidance else 1
    per_half, remainder = divmod(batch, halves)
    if remainder or per_half % num_identities or per_half == 0:
        layout = "two halves (classifier-free guidance) of " if guidance else ""
        raise IdentityCountError(
            f"The denoiser got a batch of {batch} rows, which is not {layout}`prompts x num_images_per_prompt` for "
            f"the {num_identities} identities given to `set_hyperlora_identities`. Pass exactly one identity per "
            "prompt, or call `pipe.set_hyperlora_identity(x)` to use one identity for the whole batch."
        )
    rows = torch.arange(num_identities).repeat_interleave(per_half // num_identities)
    return rows.repeat(halves)


def check_prompt_copies(prompt_embeds: torch.Tensor, num_identities: int, guidance: bool) -> None:
    """Raise `IdentityCountError` when rows that `batch_rows` gives one identity are not copies of one prompt.

    `k * N` different prompts for `N` identities have the row count of `N` prompts x `k` images each; only the
    conditioning tells them apart: diffusers repeats a prompt's embeddings for its `num_images_per_prompt` images.
    """
    halves = 2 if guidance else 1
    if prompt_embeds.shape[0] <= halves * num_identities:
        return  # one row per identity: nothing to tell apart
    blocks = prompt_embeds.reshape(halves * num_identities, prompt_embeds.shape[0] // (halves * num_identities), -1)
    if torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
        return
    raise IdentityCountError(
        f"The denoiser got a batch of {prompt_embeds.shape[0]} rows holding more different prompts than the "
        f"{num_identities} identities given to `set_hyperlora_identities`, so prompts would share an identity. Pass "
        "exactly one identity per prompt (several images of one prompt come from `num_images_per_prompt`), or call "
        "`pipe.set_hyperlora_identity(x)` to use one identity for the whole batch."
    )


def call_layout(sample: torch.Tensor, num_identities: int, guidance: bool | None) -> bool:
    """Whether one denoiser call's batch is `[uncond, cond]` halves (classifier-free guidance).

    Args:
        sample: the call's latents.
        num_identities: `N`.
        guidance: whether the pipeline running this call uses classifier-free guidance (read from the calling
            pipeline itself, whichever pipeline shares the denoiser), `None` for a direct denoiser call: a batch
            of `identities x copies` rows without guidance halves.

    diffusers' pipelines build a guided batch as `torch.cat([latents] * 2)`, so its two halves are bitwise equal.
    A guided call whose halves differ has another layout (several guidance branches, as perturbed-attention
    guidance makes): it raises `IdentityCountError` instead of guessing which row is whose.

    >>> noise = torch.randn(2, 4, 8, 8)
    >>> call_layout(torch.cat([noise, noise]), 2, guidance=True), call_layout(noise, 2, guidance=None)
    (True, False)
    """
    if not guidance:
        return False
    if num_identities > 1:
        half = sample.shape[0] // 2
        if sample.shape[0] % 2 or not torch.equal(sample[:half], sample[half:]):
            raise IdentityCountError(
                f"The pipeline runs classifier-free guidance, but its denoiser batch of {sample.shape[0]} rows is not "
                "two equal [unconditional, conditional] halves, the only guided layout per-sample identities can "
                "assign rows of (other guidance schemes add more branches). Use one identity for the whole batch "
                "with `pipe.set_hyperlora_identity(x)`."
            )
    return True


def stack_factors(per_identity: Sequence[GroupedFactors], dtype: torch.dtype, device: torch.device) -> GroupedFactors:
    """Identities' grouped factors -> per group `(down [G, N, r, in], up [G, N, out, r])` in the live dtype."""
    stacked = []
    for g in range(len(per_identity[0])):
        down = torch.stack([factors[g][0] for factors in per_identity], 1).to(device=device, dtype=dtype)
        up = torch.stack([factors[g][1] for factors in per_identity], 1).to(device=device, dtype=dtype)
        stacked.append((down, up))
    return stacked


class PerSampleLoRA:
    """Per-sample LoRA factors of one or two adapters, applied by forward hooks on their target layers.

    Args:
        denoiser: the model carrying the adapters (the UNet, or an SD3 / FLUX transformer).
        layers: the target PEFT layers, in the checkpoint's linear order.
        attached: called once per denoiser forward; whether the adapters are still on the denoiser. When diffusers
            removed them (`unload_lora_weights`, `delete_adapters`), the per-sample mode removes itself.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        layers: Sequence[BaseTunerLayer],
        attached: Callable[[], bool] = lambda: True,
    ) -> None:
        self.denoiser = denoiser
        self.layers = list(layers)
        self.attached = attached
        self.num_identities = 0
        self._factors: dict[str, tuple[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._rows: torch.Tensor | None = None
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def set_factors(
        self, branches: dict[str, tuple[str, list[BankGroup], Sequence[GroupedFactors]]], num_identities: int
    ) -> None:
        """Use these per-identity factors from the next forward on (hooks are installed on first use).

        Args:
            branches: `{branch: (adapter name, bank groups, [grouped factors of identity 0, 1, ...])}`.
            num_identities: `N`, the number of identities (every branch has `N` entries).
        """
        factors = {}
        for branch, (name, groups, per_identity) in branches.items():
            reference = lora_factors(self.layers[groups[0].members[0]], name)[0]
            stacked = stack_factors(per_identity, reference.dtype, reference.device)
            by_layer = {}
            for (down, up), group in zip(stacked, groups):
                for position, index in enumerate(group.members):
                    by_layer[index] = (down[position], up[position])  # [N, r, in], [N, out, r]
            factors[branch] = (name, by_layer)
        self._factors = factors
        self.num_identities = num_identities
        if not self._handles:
            self._install()

    def _install(self) -> None:
        self._handles.append(self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))

    def remove(self) -> None:
        """Back to ordinary adapters: remove every hook and drop the stacked factors."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._factors, self._rows, self.num_identities = [], {}, None, 0

    def _before_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.attached():
            self.remove()  # the adapters are gone: nothing per-sample is left to apply
            return
        sample, prompts = denoiser_call_inputs(args, kwargs)
        guidance = call_layout(sample, self.num_identities, calling_pipeline_guidance())
        rows = batch_rows(self.num_identities, sample.shape[0], guidance)
        if prompts is not None and prompts.shape[0] == sample.shape[0]:
            check_prompt_copies(prompts, self.num_identities, guidance)
        self._rows = rows.to(sample.device)

    def _layer_hook(self, index: int) -> Callable:
        def hook(layer: BaseTunerLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
            for name, by_layer in self._factors.values():
                if index not in by_layer:
                    continue
                if name in merged_adapter_names(layer):
                    raise PerSampleFusedError(
                        f"The {name!r} adapter is fused, but per-sample identities need it unfused (one merged "
                        "weight cannot hold several people). Call `pipe.unfuse_lora()`, or return to one identity "
                        "with `pipe.set_hyperlora_identity(x)` before fusing."
                    )
                if not adapter_runs_in_forward(layer, name):
                    continue  # what PEFT's own forward would skip
                output = output + self._delta(args[0], *by_layer[index], adapter_scale(layer, name)).to(output.dtype)
            return output

        return hook

    def _delta(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
        """`scale * (x_j @ down[i_j]^T) @ up[i_j]^T` for every row `j`."""
        rows = self._rows
        if rows is None or rows.shape[0] != x.shape[0]:
            raise IdentityCountError(
                f"A target layer got a batch of {x.shape[0]} rows outside a denoiser call laid out for "
                f"{self.num_identities} identities; call the denoiser (or the pipeline) itself."
            )
        if down.device != x.device:  # e.g. sequential CPU offload computes on another device than it stores
            down, up, rows = down.to(x.device), up.to(x.device), rows.to(x.device)
        flat = x.to(down.dtype).reshape(x.shape[0], -1, x.shape[-1])  # [B, L, in]
        hidden = torch.bmm(flat, down[rows].transpose(1, 2))  # [B, L, r]
        delta = torch.bmm(hidden, up[rows].transpose(1, 2)) * scale  # [B, L, out]
        return delta.reshape(*x.shape[:-1], delta.shape[-1])


def per_sample_branches(
    names: dict[str, str], groups: dict[str, list[BankGroup]], prepared: Sequence[dict[str, GroupedFactors]]
) -> dict[str, tuple[str, list[BankGroup], list[GroupedFactors]]]:
    """`PerSampleLoRA.set_factors`' argument from every identity's prepared factors (`{branch: grouped}`).

    A branch is per-sample when at least one identity has it; identities without it get zero factors there.
    """
    branches = {}
    for branch in ("id", "base"):
        present = [factors[branch] for factors in prepared if branch in factors]
        if not present:
            continue
        zeros = [(torch.zeros_like(down), torch.zeros_like(up)) for down, up in present[0]]
        per_identity = [factors.get(branch, zeros) for factors in prepared]
        branches[branch] = (names[branch], groups[branch], per_identity)
    return branches
