"""``hdvg sample --ckpt CKPT --prompt TEXT --out FILE.mp4 [--frames N --steps K --guidance G --seed S]``,
or ``--prompts FILE --out DIR [--batch-size B]``: one video per line of FILE, B at a time.

DDIM (diffusers' ``DDIMScheduler``, the training schedule's betas) with classifier-free
guidance: ``eps = eps(x, "") + g * (eps(x, prompt) - eps(x, ""))`` (Ho & Salimans 2022, eq. 6),
then the VAE decodes the latents frame by frame and PyAV writes an H.264 mp4.
The initial noise comes from a CPU generator, so a seed gives the same video on any device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdvg.t2v.config import ConfigError, T2VConfig
from hdvg.t2v.layers import cached_casts, use_kernels
from hdvg.t2v.text import build_text_encoder, encode_prompts
from hdvg.t2v.train import autocast, load_checkpoint, noise_scheduler, resolved_config
from hdvg.t2v.unet import SwapUNet
from hdvg.t2v.vae import VideoVAE

log = logging.getLogger("hdvg.t2v.sample")


def load_for_sampling(ckpt_path: str | Path, device: torch.device, use_ema: bool = True):
    ckpt = load_checkpoint(ckpt_path)
    cfg = resolved_config(ckpt)
    unet = SwapUNet(cfg.model.unet_config())
    use_kernels(cfg.train.kernels)  # as trained (fused Triton norms apply on CUDA only)
    unet.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    text_encoder = build_text_encoder(cfg.text_encoder)
    vae = VideoVAE(cfg.vae)
    frozen = ckpt.get("frozen", {})
    if "text_encoder" in frozen:
        text_encoder.load_state_dict(frozen["text_encoder"])
    if "vae" in frozen:
        vae.load_state_dict(frozen["vae"])
    return cfg, unet.to(device).eval(), text_encoder.to(device), vae.to(device)


@torch.no_grad()
def generate(
    cfg: T2VConfig,
    unet: SwapUNet,
    text_encoder,
    vae: VideoVAE,
    prompt: str,
    frames: int,
    steps: int,
    guidance: float,
    seed: int,
    device: torch.device,
    negative_prompt: str = "",
) -> np.ndarray:
    """Returns uint8 frames ``(F, H, W, 3)``."""
    return generate_batch(cfg, unet, text_encoder, vae, [prompt], [seed], frames, steps,
                          guidance, device, negative_prompt)[0]  # fmt: skip


@torch.no_grad()
def generate_batch(
    cfg: T2VConfig,
    unet: SwapUNet,
    text_encoder,
    vae: VideoVAE,
    prompts: list[str],
    seeds: list[int],
    frames: int,
    steps: int,
    guidance: float,
    device: torch.device,
    negative_prompt: str = "",
) -> list[np.ndarray]:
    """One video per prompt, denoised together (one U-Net call of 2 x B a step); video i's
    noise comes from seeds[i] alone, so it is the video `generate` makes with that seed (up
    to float rounding: batched convolutions may sum in another order). Returns uint8 frames
    ``(F, H, W, 3)`` per prompt."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    b = len(prompts)
    height, width = cfg.data.size
    s = vae.downsample
    if height % s or width % s:
        raise ValueError(f"size {height}x{width} must divide by the VAE factor {s}")
    scheduler = noise_scheduler(cfg, "ddim")
    scheduler.set_timesteps(steps, device=device)
    text = encode_prompts(text_encoder, [negative_prompt] * b + list(prompts), device).float()
    shape = (1, vae.latent_channels, frames, height // s, width // s)
    x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                   for seed in seeds]).to(device) * scheduler.init_noise_sigma  # fmt: skip
    t0 = time.perf_counter()  # x: (B, c, F, h, w); text: (2B, L, D), the B negatives first
    every = max(1, len(scheduler.timesteps) // 10)  # ~10 progress lines a batch
    # one autocast context around the whole loop: autocast keeps its bf16 copies of the
    # weights until the context exits (cached_casts: the fused feed-forward's, which it casts
    # itself), so they are cast once per batch, not once per step (the scheduler's
    # elementwise update stays in fp32: autocast casts matmuls and convs only)
    with autocast(device, cfg.train.precision), cached_casts():
        for i, t in enumerate(scheduler.timesteps, 1):
            pred = unet(torch.cat([x, x]), t, text).float()  # (2B, c, F, h, w)
            uncond, cond = pred.chunk(2)
            guided = uncond + guidance * (cond - uncond)
            x = scheduler.step(guided, t, x).prev_sample  # DDIM eq. 12, eta = 0
            if i % every == 0 or i == len(scheduler.timesteps):
                log.info("denoising step %d/%d, %.1f s", i, len(scheduler.timesteps),
                         time.perf_counter() - t0)  # fmt: skip
    video = vae.decode(x)  # (B, 3, F, H, W) in [-1, 1]
    video = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return list(video.permute(0, 2, 3, 4, 1).cpu().numpy())  # B x (F, H, W, 3)


def _part(path: Path) -> Path:
    """Where a video is written before it is renamed to ``path``."""
    return path.with_name(path.name + ".part")


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> None:
    """H.264 yuv420p (odd sizes padded by one pixel), single-threaded for byte-stable output."""
    from fractions import Fraction

    import av

    f, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part(path)
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        # mbtree off: with it x264 wrote different bytes for the same frames from run to run
        # at small sizes (32x32: 3 encodings in 5 processes), breaking "same seed, same video"
        opts = {"crf": "17", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        stream.options = opts
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def sampling_device(name: str | None) -> torch.device:
    """``--device``: a torch device this machine has (default: cuda if available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"--device {name}: no CUDA GPU on this machine")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {name}: this machine has {n} CUDA GPU(s), cuda:0..{n - 1}")
    return dev


def output_path(out: str | Path) -> Path:
    """``--out``: a file whose folder exists (made if need be) and is writable."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory: give a file, e.g. {path / 'sample.mp4'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot make {path.parent}: {e.strerror}") from None
    probe = _part(path)  # where write_mp4 writes first
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write in {path.parent}: {e.strerror}") from None
    return path


def sampling_options(
    cfg: T2VConfig,
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
) -> dict[str, Any]:
    """`generate`'s frames, steps, guidance and negative prompt: those given, else the
    config's `sample` section (frames: else data.frames). The training previews use the same,
    so they are the videos `hdvg sample` makes."""
    sc = cfg.sample
    most = cfg.train.num_train_timesteps
    if steps is not None and steps > most:  # before any denoising, not in the scheduler
        raise ConfigError(f"--steps {steps}: at most {most} (the schedule's timesteps)")
    return {
        "frames": frames or sc.frames or cfg.data.frames,
        "steps": steps or sc.steps,
        "guidance": sc.guidance if guidance is None else guidance,
        "negative_prompt": sc.negative_prompt if negative_prompt is None else negative_prompt,
    }


def video_fps(cfg: T2VConfig) -> float:
    """The frame rate written into sampled mp4s: sample.fps, else data.fps, else 8."""
    return cfg.sample.fps or cfg.data.fps or 8.0


def read_prompts(path: str | Path) -> list[str]:
    """``--prompts``: one prompt a line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {path}: cannot read it: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompt in it (one a line)")
    return prompts


def output_dir(out: str | Path) -> Path:
    """``--out`` with ``--prompts``: a folder (made if need be) that is writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file: with --prompts give a folder")
    output_path(path / "00000.mp4")
    return path


def main(
    ckpt: str,
    prompt: str | None,
    out: str,
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | None = None,
    negative_prompt: str | None = None,
    prompts_file: str | None = None,
    batch_size: int = 4,
) -> int:
    """One prompt -> the mp4 ``out``; or ``prompts_file`` (one prompt a line) -> ``out`` a
    folder of ``{i:05d}.mp4`` + ``{i:05d}.txt`` (the prompt), prompt i with seed ``seed + i``
    (as the training previews), ``batch_size`` prompts denoised together; videos already
    there are kept, so a rerun after a crash finishes the rest."""
    dev = sampling_device(device)  # both checked before minutes of loading and denoising
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
        folder = output_dir(out)
    else:
        out = output_path(out)
    cfg, unet, text_encoder, vae = load_for_sampling(ckpt, dev)
    kw = sampling_options(cfg, frames, steps, guidance, negative_prompt) | {"device": dev}
    fps = video_fps(cfg)
    if prompts_file is not None:
        todo = [i for i in range(len(prompts)) if not (folder / f"{i:05d}.mp4").exists()]
        log.info("%d prompt(s), %d to sample into %s, %d at a time", len(prompts), len(todo),
                 folder, batch_size)  # fmt: skip
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            videos = generate_batch(cfg, unet, text_encoder, vae, [prompts[i] for i in batch],
                                    [seed + i for i in batch], **kw)  # fmt: skip
            for i, video in zip(batch, videos, strict=True):
                (folder / f"{i:05d}.txt").write_text(prompts[i] + "\n", encoding="utf-8")
                write_mp4(video, folder / f"{i:05d}.mp4", fps)
            log.info("sampled %d/%d", start + len(batch), len(todo))
        return 0
    video = generate(cfg, unet, text_encoder, vae, prompt, seed=seed, **kw)
    write_mp4(video, out, fps)
    log.info("wrote %s: %d frames of %dx%d", out, *video.shape[:3])
    return 0
