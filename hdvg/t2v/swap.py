"""Swap attention (arXiv 2305.10874, section 3.2): cross-attention between the spatial and the
temporal branch inside 3D windows, with the query role swapping from block to block.

How it sits in a U-Net block (``unet.py``)::

    s = spatial(x)        # per-frame self-attention + text cross-attention
    t = temporal(s)       # per-pixel self-attention along frames
    y = t + swap(s, t)    # queries from one branch, keys/values from the other, in 3D windows

In even-numbered swap blocks (counted over the whole U-Net, down -> mid -> up) the spatial
branch asks and the temporal branch answers; in odd ones the roles swap (``first_query``
chooses which comes first). The output projection starts at zero, so a freshly built swap
block adds exactly 0 and a loaded ModelScope / diffusers U-Net keeps its output bit for bit.

Window size: the paper does not publish it. We use ``(16, 8, 8)`` (frames, h, w) in latent
cells by default -- all 16 frames of a training clip times an 8x8 latent patch (64x64 pixels):

- 1,024 tokens per window, the shape at which SDPA forward+backward reached ~294 TFLOP/s on
  an H100 (against ~4 TFLOP/s for 16-token per-pixel temporal attention), so the added
  attention runs at matmul speed;
- the window spans the whole clip in time, so every query sees every frame of its patch, and
  8x8 cells at 256x256 training size tile level 0 into 4x4 windows, level 1 (16x16) into 2x2
  and level 2 (8x8) into one global window: locality where the features are fine, global
  context where they are coarse;
- an axis smaller than (or not divisible by) its window uses the largest divisor of its size
  not above the configured window, so no padding or masks are needed (masks would knock SDPA
  off its flash kernel). Configurable as ``model.unet.swap_window``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from hdvg.t2v.layers import Attention, is_channels_last, layer_norm


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def effective_window(
    frames: int, height: int, width: int, window: tuple[int, int, int]
) -> tuple[int, int, int]:
    """The window actually used for a (frames, height, width) grid: see the module docstring."""
    return (
        largest_divisor_at_most(frames, window[0]),
        largest_divisor_at_most(height, window[1]),
        largest_divisor_at_most(width, window[2]),
    )


WINDOWED = "b nf nh nw wf wh ww c"  # the 8D view of window_view; rows: "(b nf nh nw)"
TOKENS = "(b nf nh nw) (wf wh ww) c"


def window_view(x: torch.Tensor, num_frames: int, window: tuple[int, int, int]) -> torch.Tensor:
    """``(B*F, C, H, W)`` -> a view ``(B, nF, nH, nW, wf, wh, ww, C)``: window-major, no copy."""
    wf, wh, ww = window
    pattern = f"(b nf wf) c (nh wh) (nw ww) -> {WINDOWED}"
    return rearrange(x, pattern, nf=num_frames // wf, wf=wf, wh=wh, ww=ww)


def window_partition(
    x: torch.Tensor, num_frames: int, window: tuple[int, int, int]
) -> torch.Tensor:
    """``(B*F, C, H, W)`` -> ``(B*nF*nH*nW, wf*wh*ww, C)``: one row of tokens per 3D window."""
    return rearrange(window_view(x, num_frames, window), f"{WINDOWED} -> {TOKENS}")


def window_merge(
    tokens: torch.Tensor,
    num_frames: int,
    height: int,
    width: int,
    window: tuple[int, int, int],
    channels_last: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, wf*wh*ww, C)`` -> ``(B*F, C, H, W)``,
    NCHW-contiguous or, with ``channels_last``, laid out ``(b f h w c)`` in memory."""
    sizes = _window_sizes(num_frames, height, width, window)
    if channels_last:  # the same copy, into the layout of a channels-last residual stream
        cl = rearrange(tokens, f"{TOKENS} -> (b nf wf) (nh wh) (nw ww) c", **sizes)
        return cl.permute(0, 3, 1, 2)  # (BF, C, H, W)
    return rearrange(tokens, f"{TOKENS} -> (b nf wf) c (nh wh) (nw ww)", **sizes)


def _window_sizes(num_frames: int, height: int, width: int, window: tuple[int, int, int]):
    """The einops sizes that fold ``TOKENS`` rows back into windows."""
    wf, wh, ww = window
    return {"nf": num_frames // wf, "nh": height // wh, "nw": width // ww,
            "wf": wf, "wh": wh, "ww": ww}  # fmt: skip


class SwapAttention(nn.Module):
    """Windowed cross-attention from the ``query`` branch to the other branch; returns the update.

    ``query="spatial"``: Q from the spatial branch, K/V from the temporal branch; and vice versa.
    """

    def __init__(self, channels: int, head_dim: int, window: tuple[int, int, int], query: str):
        super().__init__()
        if query not in ("spatial", "temporal"):
            raise ValueError(f"query must be 'spatial' or 'temporal', got {query!r}")
        self.query = query
        self.window = tuple(window)
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.attn = Attention(channels, channels // head_dim, head_dim, cross=True, kind="swap")
        # zero-init: a new block is the identity on the residual stream (ControlNet's trick)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(
        self,
        spatial: torch.Tensor,
        temporal: torch.Tensor,
        num_frames: int,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The update ``(BF, C, H, W)``; given ``residual`` (same shape), ``residual + update``,
        the add reading the windows' token layout in place of a copy back to ``(BF, C, H, W)``."""
        _, _, h, w = spatial.shape  # (BF, C, H, W), both branches
        q_src, kv_src = (spatial, temporal) if self.query == "spatial" else (temporal, spatial)
        win = effective_window(num_frames, h, w, self.window)
        # the norms read the windows as strided views and write the tokens' layout: no copy in
        q = layer_norm(self.norm_q, window_view(q_src, num_frames, win))  # (B, nF, ..., C)
        kv = layer_norm(self.norm_kv, window_view(kv_src, num_frames, win))
        to_tokens = f"{WINDOWED} -> {TOKENS}"
        out = self.attn(rearrange(q, to_tokens), rearrange(kv, to_tokens))  # (B*nW, T, C)
        if residual is None:
            return window_merge(out, num_frames, h, w, win, is_channels_last(spatial))
        sizes = _window_sizes(num_frames, h, w, win)
        update = rearrange(out, f"{TOKENS} -> {WINDOWED}", **sizes)  # a view
        # the sum takes residual's layout (NCHW or channels-last): the fold back is a view too
        out = window_view(residual, num_frames, win) + update
        return rearrange(out, f"{WINDOWED} -> (b nf wf) c (nh wh) (nw ww)")  # (BF, C, H, W)
