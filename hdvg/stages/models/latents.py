"""Precomputed VAE latents for the t2v trainer: ``{key}.latents.npy`` in the shards.

Encoding every clip with the VAE is the same work in every epoch of training; done once
here, the trainer (``data.use_latents: true``) reads the latents instead of decoding the mp4
and running the VAE on the GPU.

The frames are the trainer's own: ``hdvg.t2v.data.decode_clip`` (the loader's decode, one
implementation) takes ``frames`` frames at ``fps`` (or every ``stride``-th frame) from the
clip's first frame, resized to cover ``size`` and center-cropped; set these as in the t2v
config's ``data:`` section (the trainer refuses latents of another shape). The latents are
the posterior mean of diffusers' ``AutoencoderKL`` through the trainer's ``VideoVAE`` (so
scaled by the same scaling factor), stored as float16 ``(c, F, H/s, W/s)``. A stored window
cannot start at a random frame as ``data.random_start`` does: that is the trade.

Scores nothing and rejects nothing: a clip too short for the window gets no latents (the
trainer decodes it, and skips it as too short); a clip that does not decode fails with
``decode_error`` as in the other model stages. Put this stage last, so that rejected clips
are never encoded.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...models import WeightRef, device_for, resolve_hf
from ...records import Clip
from ..base import Stage, StageContext
from .base import ModelMixin

MEMBER = "latents.npy"  # written as `{key}.latents.npy`, read by hdvg.t2v.data


@dataclass
class LatentsConfig:
    path: str | None = None  # AutoencoderKL folder, or a diffusers pipeline folder with vae/
    model: str = "ali-vilab/text-to-video-ms-1.7b"  # HF name (its vae/), when no path
    revision: str | None = None
    scaling_factor: float | None = None  # None: the VAE config's (as vae.scaling_factor)
    # the t2v config's data section: frames, size (height, width), fps or stride
    frames: int = 16
    size: tuple[int, int] = (256, 256)
    fps: float | None = 8.0
    stride: int | None = None
    batch_size: int = 8  # clips per VAE call
    precision: str = "auto"  # auto (bf16 autocast on GPU, as the trainer; fp32 on CPU) | fp32

    def data_config(self):
        from ...t2v.config import DataConfig

        return DataConfig(frames=self.frames, size=tuple(self.size), fps=self.fps,
                          stride=self.stride, random_start=False)  # fmt: skip

    def validate(self) -> None:
        from ...config import ConfigError

        self.data_config()  # raises ConfigError for a bad window
        if self.precision not in ("auto", "fp32"):
            raise ConfigError("latents.precision must be auto or fp32")
        if self.batch_size < 1:
            raise ConfigError("latents.batch_size must be >= 1")


class LatentsStage(ModelMixin, Stage):
    name = "latents"
    Config = LatentsConfig
    needs = "clip"
    uses_model = True

    def weights(self) -> list[WeightRef]:
        c = self.cfg
        path = c.path
        if path and (Path(path).expanduser() / "vae" / "config.json").is_file():
            path = str(Path(path).expanduser() / "vae")  # a pipeline folder: its VAE
        name = Path(c.path).name if c.path else c.model
        return [resolve_hf(self.name, name, c.revision, path, self.models)]

    def setup(self) -> None:
        from ...t2v.config import VAEConfig
        from ...t2v.vae import VideoVAE

        (ref,) = self.resolved()
        src = ref.resolved
        if src is None:  # not in the cache, downloads allowed: fetch the VAE files only
            from huggingface_hub import snapshot_download

            src = snapshot_download(self.cfg.model, revision=self.cfg.revision,
                                    cache_dir=ref.where.split(" ")[0],
                                    allow_patterns=["vae/*", "config.json", "*.safetensors"])  # fmt: skip
        self.device = device_for(self.models)
        vae_cfg = VAEConfig(path=src, scaling_factor=self.cfg.scaling_factor)
        self.vae = VideoVAE(vae_cfg).to(self.device)
        self.label = ref.label

    def encode(self, videos: list[Any]) -> list[bytes]:
        """uint8 ``(3, F, H, W)`` tensors -> float16 ``.npy`` bytes of their scaled latents."""
        import numpy as np
        import torch

        from ...t2v.data import to_model_range

        video = to_model_range(torch.stack(videos).to(self.device))  # (B, 3, F, H, W)
        bf16 = self.cfg.precision == "auto" and self.device == "cuda"
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
            lat = self.vae.encode(video, sample=False)  # (B, c, F, h, w)
        out = []
        for one in lat.half().cpu().numpy():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(one), allow_pickle=False)
            out.append(buf.getvalue())
        return out

    def process_batch(self, clips: list[Clip], ctx: list[StageContext]) -> None:
        import torch

        from ...t2v.data import decode_clip

        data_cfg = self.cfg.data_config()
        ready: list[tuple[Clip, Any]] = []
        for c in clips:
            # the metadata the trainer reads from `{key}.json`, for containers without a count
            meta = {"fps": c.fps, "duration_s": c.duration_s}
            got = decode_clip(c.data, data_cfg, random.Random(0), meta)
            if got.frames is not None:
                ready.append((c, torch.from_numpy(got.frames).permute(3, 0, 1, 2)))
            elif got.reason != "too_short":
                c.fail("decode_error", f"latents: {got.reason}")
        for i in range(0, len(ready), self.cfg.batch_size):
            part = ready[i : i + self.cfg.batch_size]
            for (c, _), blob in zip(part, self.encode([v for _, v in part]), strict=True):
                c.extras[MEMBER] = blob
