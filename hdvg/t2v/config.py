"""Typed configs for the t2v model, trainer and sampler, loaded from one YAML.

A config file has the sections ``model``, ``text_encoder``, ``vae``, ``data``, ``train`` and
``sample``; every key maps onto a dataclass field below, and an unknown key is an error (a typo
must not silently fall back to a default). The resolved config (``to_dict``) is written beside
every run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hdvg.config import ConfigError, build


@dataclass
class UNetConfig:
    """The latent video U-Net; defaults are the ModelScope-T2V / SD-2.x layout (1.4B params)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # which levels carry attention (spatial + text, temporal, swap); SD-2.x: all but the lowest
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    head_dim: int = 64
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # diffusers' `transformer_in` uses 8 heads of `attention_head_dim` (inner width 8*64=512)
    in_temporal_heads: int = 8
    temporal_conv_dropout: float = 0.1  # as ModelScope / diffusers' TemporalConvLayer
    # swap attention (paper section 3.2); see hdvg/t2v/swap.py for the window choice
    swap: bool = True
    swap_window: tuple[int, int, int] = (16, 8, 8)  # (frames, h, w) in latent cells
    swap_first_query: str = "spatial"  # role of the query branch in the first swap block
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError("model.attention_levels needs one entry per block_out_channels")
        if self.swap_first_query not in ("spatial", "temporal"):
            raise ConfigError("model.swap_first_query must be 'spatial' or 'temporal'")
        for c in self.block_out_channels:
            if c % self.head_dim or c % self.norm_num_groups:
                raise ConfigError(f"width {c} must divide by head_dim and norm_num_groups")


# Size presets in one dict (STYLE 8). `base` is the paper-like size; `tiny` runs on a CPU.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        "block_out_channels": (32, 64, 64),
        "attention_levels": (True, True, False),
        "layers_per_block": 1,
        "head_dim": 16,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "in_temporal_heads": 2,
        "swap_window": (4, 4, 4),
    },
}


@dataclass
class ModelConfig:
    preset: str = "base"
    unet: dict[str, Any] = field(default_factory=dict)  # overrides on top of the preset
    # a diffusers UNet3DConditionModel dir (or pipeline dir with unet/), or a ModelScope .pth
    pretrained: str | None = None

    def unet_config(self) -> UNetConfig:
        if self.preset not in UNET_PRESETS:
            raise ConfigError(
                f"unknown model.preset {self.preset!r}; known: {sorted(UNET_PRESETS)}"
            )
        return from_dict(UNetConfig, {**UNET_PRESETS[self.preset], **self.unet}, "model.unet")


@dataclass
class TextEncoderConfig:
    # "open_clip": OpenCLIP text tower, penultimate layer + ln_final (SD-2.x, ModelScope);
    # "clip": transformers CLIPTextModel (a diffusers pipeline's text_encoder/ + tokenizer/)
    kind: str = "open_clip"
    path: str | None = None  # local dir / weights file; None: HF cache by `name`
    name: str = "ViT-H-14"  # open_clip model name or HF repo id (looked up in the local cache only)
    layer: str = "penultimate"  # "penultimate" or "last"
    max_length: int = 77
    # build with random weights from this config instead of loading (tests, CPU smoke runs);
    # the weights are then stored inside every checkpoint
    random_init: dict[str, Any] | None = None


@dataclass
class VAEConfig:
    path: str | None = None  # diffusers AutoencoderKL dir (or pipeline dir with vae/)
    name: str | None = None  # HF repo id, local cache only
    scaling_factor: float | None = None  # None: take it from the VAE config
    random_init: dict[str, Any] | None = None


@dataclass
class DataConfig:
    frames: int = 16
    size: tuple[int, int] = (256, 256)  # (height, width) after resize + center crop
    fps: float | None = 8.0  # sample frames at this rate ...
    stride: int | None = None  # ... or take every `stride`-th source frame (fps must be null)
    batch_size: int = 2
    num_workers: int = 4
    shuffle_buffer: int = 64
    random_start: bool = True  # random clip start inside the video (else the first frames)
    use_latents: bool = False  # read precomputed `{key}.latents.npy` members if present
    # http(s) shards: a server silent this long (connecting, or between reads) fails the read
    # (tried again, then the shard counts as broken) instead of stalling a loader worker
    read_timeout_s: float = 60.0
    # held-out shards for train.val_every (a spec like --shards); the CLI's --val-shards sets it
    val_shards: str | list[str] | None = None

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.stride is None):
            raise ConfigError("data: set exactly one of fps and stride")
        if self.read_timeout_s <= 0:
            raise ConfigError("data.read_timeout_s must be positive")
        if self.frames < 1 or min(self.size) < 8:
            raise ConfigError("data: frames >= 1 and size >= 8 required")
        if (self.fps is not None and not self.fps > 0) or (self.stride is not None and
                                                           self.stride < 1):  # fmt: skip
            raise ConfigError("data.fps must be > 0 (or data.stride >= 1)")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError(
                "data: batch_size >= 1, num_workers >= 0 and shuffle_buffer >= 1 required"
            )


@dataclass
class TrainConfig:
    steps: int = 100_000
    lr: float = 5e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000
    # after the warm-up: "constant" lr, or "cosine" decay to lr * min_lr_ratio at train.steps
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    # micro-batches of data.batch_size per optimizer step (per rank): the step's batch is
    # batch_size x grad_accum_steps x ranks, its gradient the mean over all of them
    grad_accum_steps: int = 1
    # a step whose gradients hold a NaN or an infinity updates nothing (the fused AdamW skips
    # it on the device, as under a GradScaler); this many in a row stop the run (exit 1): the
    # model has diverged or its input is broken
    max_nonfinite_steps: int = 20
    ema_decay: float = 0.9999
    precision: str = "bf16"  # "bf16" autocast or "fp32"
    prediction_type: str = "epsilon"  # or "v_prediction"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    cfg_dropout: float = 0.1  # probability of an empty caption (classifier-free guidance)
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 1000
    # every this many steps the ranks sample `sample.prompts` (prompt i on rank i % ranks) with
    # the EMA weights into RUN/samples/step-NNNNNNNN/{i}.mp4 (+ {i}.txt, the prompt); 0: never
    sample_every: int = 0
    # every this many steps, the loss on `val_batches` batches of data.val_shards (the same
    # clips, noise and timesteps each time, so only the weights change it): metrics.jsonl's
    # `val_loss`; 0: never
    val_every: int = 0
    val_batches: int = 4
    keep_checkpoints: int = 3
    # true / "full": torch.compile the whole U-Net; "regional": each block apart (identical
    # blocks share code: 33 graphs for the base U-Net, compiled in half the whole one's time
    # on a CPU; unet.compile_regions; regional did not finish compiling in 282 s on an H100
    # host, RESULTS.md); "norms": only the norms (layers.compile_norms), the rest eager;
    # false: eager
    compile: bool | str = False
    # with compile: torch.compile's caches in RUN_DIR/compile_cache, so that a resumed or
    # restarted run (another node of a shared run dir too) loads the compiled graphs instead of
    # compiling again; false: inductor's default (per machine, /tmp). TORCHINDUCTOR_CACHE_DIR wins
    compile_cache: bool = True
    # "triton": the group / layer norms (+ SiLU) and GEGLU of CUDA tensors in fused kernels
    # (t2v/kernels.py: bf16 in and out, fp32 inside; the step's non-matmul memory traffic
    # 333 -> ~165 GB at batch 4, t2v_traffic.py); "aten": the eager ops. Ignored on the CPU
    # and under compile
    kernels: str = "aten"
    # NHWC weights and activations (unet.to_channels_last): cuDNN's bf16 convolutions run
    # NHWC, and NCHW ones transposed in and out (~9 % of the eager step on an H100,
    # RESULTS.md); CUDA's aten group norms copy NHWC to NCHW instead, the Triton kernels
    # (kernels: triton) read it as it is. Checkpoints load either way
    channels_last: bool = False
    # cuDNN times its convolution algorithms once per shape and keeps the fastest (a run's
    # shapes are fixed: data.size, data.frames, batch_size); false: its heuristics, the same
    # algorithms every run (bit-reproducible GPU runs)
    cudnn_benchmark: bool = True
    # attention backend per kind of call (spatial, cross, temporal, swap -> flash, efficient,
    # cudnn, math, or triton: t2v/kernels.py's short-sequence kernel, several frame sequences
    # packed per tile), e.g. {temporal: triton}; kinds not named keep SDPA's own pick.
    # benchmarks/bench_attention.py times every call of the U-Net under each and prints the
    # fastest per kind. Under compile the SDPA names are ignored (inductor picks); triton holds
    attention_backends: dict[str, str] = field(default_factory=dict)
    # train only the new modules (swap attention) and keep the loaded base frozen
    train_only_new: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError("train.precision must be bf16 or fp32")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError("train.prediction_type must be epsilon or v_prediction")
        if self.compile not in (True, False, "full", "regional", "norms"):
            raise ConfigError("train.compile must be true, false, full, regional or norms")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError("train.lr_schedule must be constant or cosine")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio must be between 0 and 1")
        if self.grad_accum_steps < 1:
            raise ConfigError("train.grad_accum_steps must be at least 1")
        if self.max_nonfinite_steps < 1:
            raise ConfigError("train.max_nonfinite_steps must be at least 1")
        if self.val_every < 0 or self.val_batches < 1:
            raise ConfigError("train.val_every must be >= 0 and train.val_batches >= 1")
        if self.kernels not in ("aten", "triton"):
            raise ConfigError("train.kernels must be aten or triton")
        for name in ("steps", "log_every", "ckpt_every", "keep_checkpoints",
                     "num_train_timesteps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("train: lr > 0, warmup_steps >= 0 and weight_decay >= 0 required")
        if not (0.0 <= self.ema_decay < 1.0 and 0.0 <= self.cfg_dropout <= 1.0):
            raise ConfigError("train: ema_decay in [0, 1) and cfg_dropout in [0, 1] required")
        from hdvg.t2v.layers import attention_backends_error

        error = attention_backends_error(self.attention_backends)
        if error:
            raise ConfigError(f"train.attention_backends: {error}")


@dataclass
class SampleConfig:
    frames: int | None = None  # None: data.frames
    steps: int = 50
    guidance: float = 9.0
    fps: float | None = None  # of the written mp4; None: data.fps (or 8)
    negative_prompt: str = ""
    use_ema: bool = True
    # what train.sample_every samples during training (seed train.seed + i for the i-th)
    prompts: list[str] = field(default_factory=list)


@dataclass
class T2VConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        sc, steps = self.sample, self.train.num_train_timesteps
        if not 1 <= sc.steps <= steps:  # checked now, not at the first preview hours in
            raise ConfigError(
                f"sample.steps must be between 1 and {steps} (train.num_train_timesteps)"
            )
        if (sc.frames is not None and sc.frames < 1) or (sc.fps is not None and not sc.fps > 0):
            raise ConfigError("sample: frames >= 1 and fps > 0 required")
        if not math.isfinite(sc.guidance):
            raise ConfigError("sample.guidance must be a finite number")
        if self.train.sample_every < 0:
            raise ConfigError("train.sample_every must be 0 (never) or a number of steps")
        if self.train.sample_every and not self.sample.prompts:
            raise ConfigError("train.sample_every needs prompts to sample: sample.prompts")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError
    (the curation config's loader: one set of rules for every YAML hdvg reads)."""
    return build(cls, data, where)


def load_config(path: str | Path) -> T2VConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return from_dict(T2VConfig, raw)
