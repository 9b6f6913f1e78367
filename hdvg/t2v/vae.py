"""The frozen diffusers ``AutoencoderKL``: video frames <-> scaled latents, frame by frame."""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from hdvg.t2v.config import VAEConfig


class VideoVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, chunk: int = 16):
        super().__init__()
        from diffusers import AutoencoderKL

        if cfg.random_init is not None:
            spec = dict(cfg.random_init)
            torch.manual_seed(int(spec.pop("seed", 0)))
            self.vae = AutoencoderKL(**spec)
        else:
            source = cfg.path or cfg.name
            if source is None:
                raise FileNotFoundError("vae: set vae.path (a local AutoencoderKL dir) or vae.name")
            p = Path(source)
            if cfg.path and not p.exists():
                raise FileNotFoundError(f"VAE weights not found at {p}")
            sub = "vae" if (p / "vae" / "config.json").exists() else None
            self.vae = AutoencoderKL.from_pretrained(source, subfolder=sub, local_files_only=True)
        self.scaling_factor = cfg.scaling_factor or self.vae.config.scaling_factor
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        self.chunk = chunk  # frames per VAE call: bounds activation memory at large sizes
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1] -> scaled latents ``(B, c, F, H/s, W/s)``: a draw from
        the posterior (training), or its mean with ``sample=False`` (stored latents)."""
        b = video.shape[0]
        frames = rearrange(video, "b c f h w -> (b f) c h w")
        outs = []
        for part in frames.split(self.chunk):
            dist = self.vae.encode(part.to(self.vae.dtype)).latent_dist
            outs.append(dist.sample(generator) if sample else dist.mode())
        lat = torch.cat(outs) * self.scaling_factor  # (BF, c, h, w)
        return rearrange(lat, "(b f) c h w -> b c f h w", b=b).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, c, F, h, w)`` -> frames ``(B, 3, F, H, W)`` in [-1, 1]."""
        b = latents.shape[0]
        lat = rearrange(latents, "b c f h w -> (b f) c h w") / self.scaling_factor
        frames = torch.cat(
            [self.vae.decode(p.to(self.vae.dtype)).sample for p in lat.split(self.chunk)]
        )
        return rearrange(frames, "(b f) c h w -> b c f h w", b=b).float().clamp(-1, 1)
