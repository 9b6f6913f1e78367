"""The latent video U-Net: ModelScope-T2V / SD-2.x layout plus swap attention.

Layout (``UNetConfig`` defaults): widths 320*[1,2,4,4], two res-blocks per level going down
(three going up), a temporal conv after every spatial res-block, and at the three highest
resolutions spatial self-attention + text cross-attention, temporal self-attention and swap
attention. Module and parameter names follow diffusers' ``UNet3DConditionModel`` (itself the
port of ModelScope's ``UNetSD``), so a diffusers state dict loads with ``strict=False`` and
the only missing keys are the new ``swaps.*`` modules -- see ``weights.py``.

Activations flow as ``(B*F, C, H, W)`` (frames folded into the batch) so every 2D conv and
the spatial attention see plain image batches; temporal layers unfold ``(b f)`` as needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from hdvg.t2v.config import UNetConfig
from hdvg.t2v.layers import (
    SpatialTransformer,
    TemporalTransformer,
    compute_dtype,
    group_norm_silu,
    is_channels_last,
    raise_recompile_limit,
)
from hdvg.t2v.swap import SwapAttention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first (diffusers ``Timesteps(dim, flip_sin_to_cos=True, 0)``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added in between (``ResnetBlock2D``)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.conv1(group_norm_silu(self.norm1, x))  # (BF, Co, H, W)
        emb = self.time_emb_proj(F.silu(temb))  # (B, Co): once per video, not per frame
        h = h + emb.repeat_interleave(num_frames, dim=0)[:, :, None, None]
        h = self.conv2(group_norm_silu(self.norm2, h))  # (BF, Co, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class TemporalConv(nn.Module):
    """Four (3,1,1) convs along frames, last one zero-initialized (ModelScope ``TemporalConvBlock_v2``).

    Each norm + SiLU keeps one tensor for backward (``layers.group_norm_silu``).
    """

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()

        def conv() -> nn.Conv3d:
            return nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

        self.conv1 = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Dropout(dropout), conv()
        )
        self.conv3 = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Dropout(dropout), conv()
        )
        self.conv4 = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Dropout(dropout), conv()
        )
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if is_channels_last(x):  # (3,1) Conv2d over (B, C, F, HW): see _frame_conv2d
            v = rearrange(x, "(b f) c h w -> b c f (h w)", f=num_frames)  # (B, C, F, HW), a view
            h = self._convs(v, _frame_conv2d)
            out = (v + h).contiguous(memory_format=torch.channels_last)  # (b f hw c) in memory
            return rearrange(out, "b c f (h w) -> (b f) c h w", w=x.shape[-1])  # a view
        v = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)  # (B, C, F, H, W)
        h = self._convs(v, lambda conv, h: conv(h))  # diffusers' Conv3d, bit for bit
        return rearrange(v + h, "b c f h w -> (b f) c h w")  # (BF, C, H, W)

    def _convs(self, h: torch.Tensor, conv) -> torch.Tensor:
        for seq in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = group_norm_silu(seq[0], h)  # seq = [norm, SiLU, (dropout,) conv]
            if len(seq) == 4:
                h = seq[2](h)
            h = conv(seq[-1], h)
        return h


def _frame_conv2d(conv: nn.Conv3d, h: torch.Tensor) -> torch.Tensor:
    """The (3,1,1) Conv3d as a (3,1) Conv2d over ``(B, C, F, H*W)`` on a channels-last stream:
    the same sums through the 2D cuDNN kernels, which take NHWC bf16 natively (NDHWC 3D convs
    have fewer fast paths), and ``(B, C, F, HW)`` of an NHWC ``(B*F, C, H, W)`` is itself
    NHWC, so no copy. The NCHW path keeps the Conv3d: its bf16 rounding is diffusers' bit
    for bit, which the 2D kernel's is not (the CPU equivalence test tells them apart). The
    parameter is the Conv3d's either way, so checkpoints load unchanged."""
    h = h.contiguous(memory_format=torch.channels_last)  # a no-op unless a norm made it NCHW
    w = conv.weight.squeeze(-1)  # (Co, Ci, 3, 1)
    return F.conv2d(h, w, conv.bias, padding=(conv.padding[0], 0))  # (B, C, F, HW)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``n`` layers of [res-block, temporal conv, (spatial attn, temporal
    attn, swap attn)], then an optional down/up-sampler. Used for down, mid and up blocks."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: list[int],
        out_channels: int,
        temb_dim: int,
        attention: bool,
        swap_index: int,
        mid: bool = False,
    ):
        super().__init__()
        c, g, eps = out_channels, cfg.norm_num_groups, cfg.norm_eps
        n = len(in_channels)
        self.mid = mid
        self.resnets = nn.ModuleList([ResnetBlock(ci, c, temb_dim, g, eps) for ci in in_channels])
        self.temp_convs = nn.ModuleList(
            [TemporalConv(c, g, cfg.temporal_conv_dropout) for _ in in_channels]
        )
        n_attn = (n - 1 if mid else n) if attention else 0
        heads = c // cfg.head_dim
        self.attentions = nn.ModuleList(
            [SpatialTransformer(c, cfg.head_dim, cfg.cross_attention_dim, g) for _ in range(n_attn)]
        )
        self.temp_attentions = nn.ModuleList(
            [TemporalTransformer(c, heads, cfg.head_dim, g) for _ in range(n_attn)]
        )
        other = {"spatial": "temporal", "temporal": "spatial"}
        self.swaps = nn.ModuleList(
            [
                SwapAttention(
                    c,
                    cfg.head_dim,
                    cfg.swap_window,
                    cfg.swap_first_query
                    if (swap_index + i) % 2 == 0
                    else other[cfg.swap_first_query],
                )
                for i in range(n_attn if cfg.swap else 0)
            ]
        )
        self.downsamplers: nn.ModuleList | None = None
        self.upsamplers: nn.ModuleList | None = None
        # None, or a mode of CKPT_MODES: what one checkpoint spans (see set_gradient_checkpointing)
        self.gradient_checkpointing = _ckpt_mode(cfg.gradient_checkpointing)
        self.resolution = 0  # 0 = the highest-resolution level; set by SwapUNet

    @property
    def num_swaps(self) -> int:
        return len(self.attentions)

    def attend(
        self, i: int, x: torch.Tensor, ctx: torch.Tensor, num_frames: int, each: bool = False
    ) -> torch.Tensor:
        s = _maybe_ckpt(each, self.attentions[i], x, ctx)  # spatial self + text cross
        t = _maybe_ckpt(each, self.temp_attentions[i], s, num_frames)  # temporal self
        if len(self.swaps):  # swap cross-attention in 3D windows, added onto t
            t = _maybe_ckpt(each, self.swaps[i], s, t, num_frames, t)
        return t  # (BF, C, H, W)

    def layer(
        self,
        i: int,
        x: torch.Tensor,
        temb: torch.Tensor,
        ctx: torch.Tensor,
        num_frames: int,
        mode: str | None = None,
    ) -> torch.Tensor:
        each = mode == "block"  # every res-block, temporal conv and attention block apart
        attn = mode in ("block", "attention")

        def convs(x: torch.Tensor) -> torch.Tensor:
            x = _maybe_ckpt(each, self.resnets[i], x, temb, num_frames)
            return _maybe_ckpt(each, self.temp_convs[i], x, num_frames)

        def attend(j: int, x: torch.Tensor) -> torch.Tensor:
            if attn and not each:  # the attention triple as one checkpoint
                return checkpoint(self.attend, j, x, ctx, num_frames, use_reentrant=False)
            return self.attend(j, x, ctx, num_frames, each)

        if self.mid:  # mid block: resnet0, then [attn, resnet] pairs (diffusers' order)
            if i > 0:
                x = attend(i - 1, x)
            return convs(x)
        x = convs(x)
        if len(self.attentions):
            x = attend(i, x)
        return x

    def run_layer(
        self, i: int, x: torch.Tensor, temb: torch.Tensor, ctx: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        mode = self.gradient_checkpointing
        if not (mode and self.training and torch.is_grad_enabled()):
            return self.layer(i, x, temb, ctx, num_frames)
        if mode == "layer":
            return checkpoint(self.layer, i, x, temb, ctx, num_frames, use_reentrant=False)
        return self.layer(i, x, temb, ctx, num_frames, mode)


CKPT_MODES = ("layer", "attention", "block")


def _ckpt_mode(value: bool | str | None) -> str | None:
    """``True`` -> ``"layer"``; ``False``/``None``/``"none"`` -> ``None``; else a mode name."""
    if value is True:
        return "layer"
    if not value or value == "none":
        return None
    if value not in CKPT_MODES:
        raise ValueError(f"gradient checkpointing mode must be one of {CKPT_MODES}, got {value!r}")
    return value


def _maybe_ckpt(on: bool, fn, *args):
    return checkpoint(fn, *args, use_reentrant=False) if on else fn(*args)


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights for the 2D convs (and NDHWC for the temporal ones, whose ``squeeze(-1)``
    is then an NHWC 4D weight): cuDNN's bf16 convs run NHWC natively; NCHW ones pay transposes
    in and out of every conv. Feed the input through :func:`channels_last_input` so that the
    ``(b f)`` fold keeps it NHWC."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
        elif isinstance(m, nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
    return model


def channels_last_input(sample: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W)`` laid out ``(b f h w c)`` in memory: each frame of the ``(b f)`` fold
    is then NHWC, as :func:`to_channels_last` wants. Same shape and values, one copy."""
    return sample.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)


REGION_TYPES = (ResnetBlock, TemporalConv, SpatialTransformer, TemporalTransformer, SwapAttention)


def compile_regions(model: nn.Module, **compile_kwargs) -> int:
    """Regional compilation: ``torch.compile`` each res-block, temporal conv and attention block
    in place instead of the whole U-Net
    (https://docs.pytorch.org/tutorials/recipes/regional_compilation.html).

    Blocks of one class and shape share their compiled code (dynamo treats parameters as
    inputs), so the base U-Net's 93 blocks compile as 33 graphs (forward + backward each):
    fusion where the time goes (norm + SiLU + casts, GEGLU, residual adds) in half the
    compile time of the whole-model graph (292 s against 592 s for the base structure on a
    2-core CPU, RESULTS.md, t2v). Shapes are static by default
    (``dynamic=False``); each distinct block shape is one recompile, so dynamo's per-function
    limit is raised to cover them. Returns the number of blocks compiled.
    """
    compile_kwargs.setdefault("dynamic", False)
    raise_recompile_limit()
    blocks = [m for m in model.modules() if isinstance(m, REGION_TYPES)]
    for m in blocks:
        m.compile(**compile_kwargs)
    return len(blocks)


class SwapUNet(nn.Module):
    """``forward(sample (B,C,F,H,W), timestep (B,) | scalar, text (B,L,D)) -> (B,C,F,H,W)``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        widths = list(cfg.block_out_channels)
        temb_dim = widths[0] * 4
        g = cfg.norm_num_groups

        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(widths[0], temb_dim)
        self.time_embedding.linear_2 = nn.Linear(temb_dim, temb_dim)
        self.transformer_in = TemporalTransformer(widths[0], cfg.in_temporal_heads, cfg.head_dim, g)

        swap_index = 0
        self.down_blocks = nn.ModuleList()
        skip_channels = [widths[0]]
        cin = widths[0]
        for level, (c, attn) in enumerate(zip(widths, cfg.attention_levels, strict=True)):
            ins = [cin] + [c] * (cfg.layers_per_block - 1)
            block = Level(cfg, ins, c, temb_dim, attn, swap_index)
            block.resolution = level
            swap_index += block.num_swaps
            skip_channels += [c] * cfg.layers_per_block
            if level < len(widths) - 1:
                block.downsamplers = nn.ModuleList([Downsample(c)])
                skip_channels.append(c)
            self.down_blocks.append(block)
            cin = c

        self.mid_block = Level(
            cfg, [widths[-1]] * 2, widths[-1], temb_dim, True, swap_index, mid=True
        )
        self.mid_block.resolution = len(widths) - 1
        swap_index += self.mid_block.num_swaps

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(widths))
        prev = rev[0]
        for i, (c, attn) in enumerate(zip(rev, reversed(cfg.attention_levels), strict=True)):
            n = cfg.layers_per_block + 1
            skips = [skip_channels.pop() for _ in range(n)]
            ins = [(prev if j == 0 else c) + skips[j] for j in range(n)]
            block = Level(cfg, ins, c, temb_dim, attn, swap_index)
            block.resolution = len(widths) - 1 - i
            swap_index += block.num_swaps
            if i < len(widths) - 1:
                block.upsamplers = nn.ModuleList([Upsample(c)])
            self.up_blocks.append(block)
            prev = c
        self.num_swap_blocks = swap_index

        self.conv_norm_out = nn.GroupNorm(g, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def set_gradient_checkpointing(
        self, mode: bool | str | None, levels: Iterable[int] | None = None
    ) -> None:
        """Recompute activations in backward instead of keeping them, per ``mode``:

        - ``"layer"`` (or ``True``): one checkpoint per layer [res-block, temporal conv,
          spatial + temporal + swap attention]: keeps only layer inputs, recomputes everything;
        - ``"attention"``: only each layer's attention triple, which holds most of the saved
          bytes; res-blocks and temporal convs keep their activations (less recompute);
        - ``"block"``: each res-block, temporal conv and attention block on its own: keeps the
          inputs of every block (more than ``"layer"``) but recomputes one block at a time,
          so backward's transient peak is a block's, not a layer's;
        - ``False`` / ``None`` / ``"none"``: off.

        ``levels``: only at these resolution levels (0 = the highest, where a layer's
        activations are largest), e.g. ``[0]``; default all.
        """
        mode = _ckpt_mode(mode)
        for m in self.modules():
            if isinstance(m, Level):
                on = levels is None or m.resolution in set(levels)
                m.gradient_checkpointing = mode if on else None

    def swap_modules(self) -> list[SwapAttention]:
        return [m for m in self.modules() if isinstance(m, SwapAttention)]

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, text: torch.Tensor
    ) -> torch.Tensor:
        b, c, f, h, w = sample.shape  # (B, C, F, H, W)
        if c != self.config.in_channels or text.shape[0] != b or text.ndim != 3:
            raise ValueError(
                f"bad input shapes: sample {tuple(sample.shape)}, text {tuple(text.shape)}"
            )
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)  # (B,)
        temb = timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))  # (B, 4C0)
        # cast once, before the repeat: autocast would cast it again at every cross-attention
        ctx = text.to(compute_dtype(sample)).repeat_interleave(f, dim=0)  # (BF, L, D)

        x = rearrange(sample, "b c f h w -> (b f) c h w")  # (BF, C, H, W)
        x = self.conv_in(x)  # (BF, C0, H, W)
        x = self.transformer_in(x, f)
        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                x = block.run_layer(i, x, temb, ctx, f)  # (BF, Ci, Hi, Wi)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)  # (BF, Ci, Hi/2, Wi/2)
                skips.append(x)

        for i in range(len(self.mid_block.resnets)):
            x = self.mid_block.run_layer(i, x, temb, ctx, f)

        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                x = torch.cat([x, skips.pop()], dim=1)  # (BF, C + Cskip, Hi, Wi)
                x = block.run_layer(i, x, temb, ctx, f)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x, skips[-1].shape[-2:])  # (BF, Ci, 2Hi, 2Wi)

        x = self.conv_out(group_norm_silu(self.conv_norm_out, x))  # (BF, Cout, H, W)
        return rearrange(x, "(b f) c h w -> b c f h w", b=b)
