"""Attention building blocks, with diffusers' parameter names so its checkpoints load as-is.

All attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU); tokens are laid out ``(batch, heads, tokens, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention; ``context=None`` is self-attention. Names as diffusers' ``Attention``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, h, N, d)
        k = rearrange(self.to_k(ctx), "b m (h d) -> b h m d", h=self.heads)  # (B, h, M, d)
        v = rearrange(self.to_v(ctx), "b m (h d) -> b h m d", h=self.heads)  # (B, h, M, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))  # (B, N, C)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attn, then attn2 (text cross-attn, or a second self-attn), then FF.

    diffusers' ``BasicTransformerBlock`` with ``norm_type="layer_norm"``; its temporal variant
    (``double_self_attention=True``) runs attn2 as self-attention too.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, C)
        x = x + self.attn2(self.norm2(x), context)  # (B, N, C)
        return x + self.ff(self.norm3(x))  # (B, N, C)


class SpatialTransformer(nn.Module):
    """Per-frame spatial self-attention + text cross-attention (diffusers ``Transformer2DModel``,
    linear projections, one block)."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, head_dim, context_dim)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape  # (BF, C, H, W)
        t = rearrange(self.norm(x), "n c h w -> n (h w) c")  # (BF, HW, C)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)  # context: (BF, L, D)
        t = self.proj_out(t)
        return x + rearrange(t, "n (h w) c -> n c h w", h=h, w=w)  # (BF, C, H, W)


class TemporalTransformer(nn.Module):
    """Self-attention along frames at every pixel (diffusers ``TransformerTemporalModel``).

    The group norm spans (frames, h, w) of each video, as in diffusers.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        _, _, h, w = x.shape  # (BF, C, H, W)
        v = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)  # (B, C, F, H, W)
        t = rearrange(self.norm(v), "b c f h w -> (b h w) f c")  # (BHW, F, C)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        t = rearrange(t, "(b h w) f c -> (b f) c h w", h=h, w=w)  # (BF, C, H, W)
        return x + t
