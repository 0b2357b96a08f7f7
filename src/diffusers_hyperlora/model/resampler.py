"""The Perceiver resampler that turns image features into LoRA coefficients (docs/math.md, step 2).

Learned query tokens attend to themselves, then to the projected ArcFace tokens, then to the CLIP hidden
states, each step a pre-norm residual; a final linear maps every query to `num_basis` coefficients.
State-dict keys follow the release's `resampler.safetensors`.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class IDProjector(nn.Sequential):
    """ArcFace embedding `[B, 512]` -> `num_tokens` tokens `[B, num_tokens, dim]` (Linear, reshape, LayerNorm).

    A `Sequential` so its keys are the release's `0.weight`, `0.bias`, `2.weight`, `2.bias`.
    """

    def __init__(self, embed_dim: int, num_tokens: int, dim: int) -> None:
        super().__init__(
            nn.Linear(embed_dim, num_tokens * dim),
            nn.Unflatten(-1, (num_tokens, dim)),
            nn.LayerNorm(dim),
        )


def _attention(dim: int, heads: int, dim_head: int) -> Attention:
    return Attention(query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim_head, bias=False, out_bias=False)


class ResamplerLayer(nn.Module):
    """One layer: self-attention, attention to the ID tokens, attention to the CLIP tokens, feed-forward."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, ff_inner_dim: int, use_id_embeds: bool, use_image_embeds: bool
    ) -> None:
        super().__init__()
        self.norm_attn1 = nn.LayerNorm(dim)
        self.attn1 = _attention(dim, heads, dim_head)
        if use_id_embeds:
            self.norm_attn2_l = nn.LayerNorm(dim)
            self.norm_attn2_x = nn.LayerNorm(dim)
            self.attn2 = _attention(dim, heads, dim_head)
        if use_image_embeds:
            self.norm_attn3_l = nn.LayerNorm(dim)
            self.norm_attn3_y = nn.LayerNorm(dim)
            self.attn3 = _attention(dim, heads, dim_head)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, inner_dim=ff_inner_dim, activation_fn="gelu", bias=True)

    def forward(self, latents: torch.Tensor, id_tokens: torch.Tensor | None, image_tokens: torch.Tensor | None):
        normed = self.norm_attn1(latents)
        latents = latents + self.attn1(normed, normed)
        if id_tokens is not None:
            latents = latents + self.attn2(self.norm_attn2_l(latents), self.norm_attn2_x(id_tokens))
        if image_tokens is not None:
            latents = latents + self.attn3(self.norm_attn3_l(latents), self.norm_attn3_y(image_tokens))
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    """Learned queries `[1, num_queries, dim]` read the conditions and give `[B, num_queries, num_basis]`.

    Args:
        num_queries: number of output tokens (8 per target module).
        dim: width of the queries (`D`).
        depth, heads, dim_head, ff_mult: the layer stack.
        num_basis: coefficients per token (`K`).
        id_dim: width of the projected ArcFace tokens, or `None` without that condition.
        image_dim: width of the CLIP hidden states, or `None` without that condition.
    """

    def __init__(
        self,
        num_queries: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: int,
        num_basis: int,
        id_dim: int | None,
        image_dim: int | None,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(id_dim, dim) if id_dim is not None else None
        self.proj_in_2 = nn.Linear(image_dim, dim) if image_dim is not None else None
        self.proj_out = nn.Linear(dim, num_basis)
        self.layers = nn.ModuleList(
            ResamplerLayer(dim, heads, dim_head, ff_mult * dim, id_dim is not None, image_dim is not None)
            for _ in range(depth)
        )

    def forward(self, id_tokens: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        batch = (id_tokens if id_tokens is not None else image_tokens).shape[0]
        # `id_tokens=None` on a resampler that has the ArcFace condition skips attn2 (training stage `id_clip`).
        if self.proj_in is not None and id_tokens is not None:
            id_tokens = self.proj_in(id_tokens)
        if self.proj_in_2 is not None:
            image_tokens = self.proj_in_2(image_tokens)
        latents = self.latents.expand(batch, -1, -1)
        for layer in self.layers:
            latents = layer(latents, id_tokens, image_tokens)
        return self.proj_out(latents)
