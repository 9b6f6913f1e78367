"""``hdvg train CONFIG --shards SPEC --output RUN_DIR [--steps N] [--resume]``.

Reads top to bottom: set up (distributed, seeds), build the frozen text encoder and VAE and
the trainable U-Net, the optimizer, LR warm-up, EMA and the noise schedule, resume if asked,
then loop: clips -> VAE latents -> noise at a random timestep -> U-Net -> MSE on epsilon (or
v) -> AdamW step -> EMA; log every step, checkpoint every ``ckpt_every`` steps.

Distributed: launch with ``torchrun --nproc-per-node N -m hdvg.t2v.cli train ...`` (DDP; the
stream splits shards across ranks and workers), or on a Ray cluster with ``hdvg train ...
--ray-workers N [--ray-address auto]`` (:mod:`hdvg.t2v.ray_train`: Ray Train runs this ``main``
on every worker).

Run dir::

    RUN_DIR/config.yaml            the resolved config
    RUN_DIR/metrics.jsonl          one JSON object per step (loss, lr, it/s, samples/s, memory, keys)
    RUN_DIR/tb/                    TensorBoard events
    RUN_DIR/checkpoints/step-NNNNNNNN.ckpt
    RUN_DIR/last.ckpt              symlink to the newest checkpoint
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from hdvg.t2v.config import ConfigError, T2VConfig, TrainConfig, UNetConfig, from_dict
from hdvg.t2v.data import (
    NoClipsError,
    ShardClips,
    StreamState,
    collate_clips,
    make_loader,
    stop_workers,
    to_model_range,
)
from hdvg.t2v.layers import compile_norms, use_attention_backends, use_kernels
from hdvg.t2v.text import build_text_encoder, encode_prompts
from hdvg.t2v.unet import SwapUNet, channels_last_input, compile_regions, to_channels_last
from hdvg.t2v.vae import VideoVAE
from hdvg.t2v.weights import load_pretrained_unet

log = logging.getLogger("hdvg.t2v.train")


# --- helpers (importable: the sampler and the benchmark use them too) -------------------------


def build_unet(cfg: T2VConfig) -> tuple[SwapUNet, UNetConfig]:
    base = cfg.model.unet_config()
    if cfg.model.pretrained:
        return load_pretrained_unet(cfg.model.pretrained, base)
    return SwapUNet(base), base


def noise_scheduler(cfg: T2VConfig, kind: str = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler

    t = cfg.train
    common = {
        "num_train_timesteps": t.num_train_timesteps,
        "beta_schedule": t.beta_schedule,
        "beta_start": t.beta_start,
        "beta_end": t.beta_end,
        "prediction_type": t.prediction_type,
        "clip_sample": False,
    }
    if kind == "ddim":  # SD's inference settings
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    return DDPMScheduler(**common)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen_state(cfg: T2VConfig, text_encoder, vae) -> dict[str, Any]:
    """Randomly initialized frozen parts have no weights on disk: keep them in the checkpoint."""
    out = {}
    if cfg.text_encoder.random_init is not None:
        out["text_encoder"] = text_encoder.state_dict()
    if cfg.vae.random_init is not None:
        out["vae"] = vae.state_dict()
    return out


@torch.no_grad()
def batch_latents(
    batch: dict[str, Any],
    cfg: T2VConfig,
    vae: VideoVAE,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A batch's VAE latents ``(B, c, F, h, w)``: its stored ones first (checked against this
    run's frames and size), then its clips encoded here (collate_clips' order) -- a draw from
    the posterior with `generator` (training), the posterior's mean without (validation)."""
    parts = []
    if "latents" in batch:
        # pinned by the loader: no host sync, as for the video below
        parts.append(batch["latents"].to(device, non_blocking=True).float())  # (Bl,c,F,h,w)
        check_latents(parts[0].shape, cfg, vae)
    if "video" in batch:
        video = to_model_range(batch["video"].to(device, non_blocking=True))  # (Bv,3,F,H,W)
        with autocast(device, cfg.train.precision):
            parts.append(vae.encode(video, generator=generator, sample=generator is not None))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_latents(shape: tuple[int, ...], cfg: T2VConfig, vae: VideoVAE) -> None:
    """Stored latents (the ``latents`` curation stage) must match this run's frames and size."""
    h, w = cfg.data.size
    want = (vae.latent_channels, cfg.data.frames, h // vae.downsample, w // vae.downsample)
    if tuple(shape[1:]) != want:
        raise ConfigError(
            f"shard latents have shape {tuple(shape[1:])}, this config needs {want} (c, F, h, w):"
            " curate them with the same frames/size and VAE, or set data.use_latents: false"
        )


def resolved_config(ckpt: dict[str, Any]) -> T2VConfig:
    return from_dict(T2VConfig, ckpt["config"])


def check_same_unet(saved: T2VConfig, cfg: T2VConfig, where: Path) -> None:
    """A resumed run must build the U-Net its checkpoint holds (the training settings may
    change); else a ConfigError naming what differs, instead of load_state_dict's hundred
    size mismatches."""
    old, new = saved.model.unet_config().__dict__, cfg.model.unet_config().__dict__
    diff = [k for k in new if k != "gradient_checkpointing" and old.get(k) != new[k]]
    if diff:
        said = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} here" for k in diff[:3])
        raise ConfigError(
            f"{where} holds another U-Net than this config builds ({said}): resume with the "
            f"run's own config.yaml, or train into a new --output"
        )


_compile_cache: str | None = None  # the TORCHINDUCTOR_CACHE_DIR use_compile_cache set


def use_compile_cache(run_dir: Path) -> str:
    """Point torch.compile's on-disk caches (inductor's graphs and kernels, AOT autograd's,
    Triton's builds) at ``RUN_DIR/compile_cache``: a resumed run, or a restart on another node
    of a shared run dir (torchrun, Ray Train after a preemption), loads what the first compile
    built instead of compiling again (minutes for the base U-Net). A TORCHINDUCTOR_CACHE_DIR
    the user set is kept; inductor's own default (it writes it into the environment) is not."""
    global _compile_cache
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cur = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cur is not None and cur not in (_compile_cache, os.path.abspath(default_cache_dir())):
        return cur
    _compile_cache = str((run_dir / "compile_cache").resolve())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _compile_cache
    return _compile_cache


def lay_out_like_params(unet: torch.nn.Module, ema: EMA, optimizer) -> None:
    """The EMA's and the optimizer's tensors in their parameters' memory layout, after a
    resume from a checkpoint saved with the other ``train.channels_last``. Left as loaded, the
    fused AdamW's updates came out wrong (on the CPU the loss of the second step after such a
    resume was 0.8 % off the uninterrupted run's); the EMA's multi-tensor lerp also wants
    matching strides for its fast path."""

    def like(p: torch.Tensor | None, v: Any) -> Any:
        if p is None or not torch.is_tensor(v) or v.shape != p.shape or v.stride() == p.stride():
            return v
        return torch.empty_like(p, dtype=v.dtype).copy_(v)

    named = dict(unet.named_parameters())
    # a new dict: the EMA rebuilds its cached lists
    ema.shadow = {k: like(named.get(k), v) for k, v in ema.shadow.items()}
    for p, state in optimizer.state.items():
        state.update({k: like(p, v) for k, v in state.items()})


class EMA:
    """Exponential moving average of the trainable weights, kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self._groups: tuple | None = None  # ((model, shadow), averaged, sources, copied pairs)

    def groups(self, model: torch.nn.Module) -> tuple[list, list, list]:
        """The shadow tensors to average, the model's tensors they follow, and (shadow,
        tensor) pairs copied as they are (integer buffers), built once per model and shadow
        dict (a resume replaces the dict). Frozen parameters are left out: their average is
        themselves (lerp of equal values is exact)."""
        built = self._groups[0] if self._groups else (None, None)
        if built[0] is not model or built[1] is not self.shadow:  # objects, not ids: reusable
            avg, src, copied = [], [], []
            for k, v in model.state_dict(keep_vars=True).items():
                if isinstance(v, torch.nn.Parameter) and not v.requires_grad:
                    continue
                if v.dtype.is_floating_point:
                    avg.append(self.shadow[k])
                    src.append(v.detach())  # a view: follows the optimizer's in-place steps
                else:
                    copied.append((self.shadow[k], v.detach()))
            self._groups = ((model, self.shadow), avg, src, copied)
        return self._groups[1:]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages are not stale
        avg, src, copied = self.groups(model)
        # one multi-tensor kernel per group of tensors on CUDA, not a launch per tensor (the
        # base U-Net has ~1,500), and no state_dict() per step (RESULTS.md, t2v)
        if avg:
            torch._foreach_lerp_(avg, [t if t.dtype == torch.float32 else t.float() for t in src],
                                 1 - d)  # fmt: skip
        for dst, v in copied:
            dst.copy_(v)


@torch.no_grad()
def sample_previews(
    run_dir: Path,
    step: int,
    cfg: T2VConfig,
    unet: torch.nn.Module,
    ema: EMA,
    text_encoder,
    vae: VideoVAE,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> tuple[Path, list[int]]:
    """`train.sample_every`: each of `sample.prompts` sampled with the EMA weights, as `hdvg
    sample` would from this step's checkpoint, into RUN/samples/step-NNNNNNNN/{i}.mp4 + .txt.
    Under DDP each rank samples its share (prompt i on rank i % world), so a preview takes
    1/world of the time one rank would and no rank waits long for another. Returns the folder
    and the prompts sampled here.

    The EMA weights are swapped into the U-Net for the while (its own weights wait on the
    host) and it runs eager (a compiled U-Net would recompile for the sampler's shapes); the
    sampler's noise comes from its own seeded generator, so training goes on exactly as
    without the previews."""
    from hdvg.t2v.sample import generate, sampling_options, video_fps, write_mp4

    sc = cfg.sample
    out = run_dir / "samples" / f"step-{step:08d}"
    mine = [i for i in range(len(sc.prompts)) if i % world == rank]
    if not mine:
        return out, mine
    out.mkdir(parents=True, exist_ok=True)
    own = None  # the U-Net's own weights, while the EMA's stand in (as `sample.use_ema` asks)
    if sc.use_ema:
        own = {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}
        unet.load_state_dict(ema.shadow)
    was_training = unet.training
    unet.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            for i in mine:
                prompt = sc.prompts[i]
                video = generate(cfg, unet, text_encoder, vae, prompt, seed=cfg.train.seed + i,
                                 device=device, **sampling_options(cfg))  # fmt: skip
                write_mp4(video, out / f"{i:02d}.mp4", video_fps(cfg))
                (out / f"{i:02d}.txt").write_text(prompt + "\n", encoding="utf-8")
    finally:
        if own is not None:
            unet.load_state_dict(own)
        unet.train(was_training)
    return out, mine


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.ckpt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a checkpoint is complete or absent
    link = run_dir / "last.ckpt"
    tmp_link = run_dir / ".last.ckpt.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(path.relative_to(run_dir))
    os.replace(tmp_link, link)
    for old in sorted(ckpt_dir.glob("step-*.ckpt"))[:-keep]:
        old.unlink()
    log.info("saved checkpoint %s", path)
    return path


def lr_factor(step: int, tc: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (from 0) over `train.lr`: a linear warm-up
    over `warmup_steps`, then constant, or a cosine decay to `min_lr_ratio` at `train.steps`
    (the schedule is fixed by the config, so `--steps` on the command line does not
    stretch it)."""
    warm = max(1, tc.warmup_steps)
    if step + 1 < warm or tc.lr_schedule == "constant":
        return min(1.0, (step + 1) / warm)
    progress = min(1.0, (step + 1 - warm) / max(1, tc.steps - warm))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_backward(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target: torch.Tensor,
    k: int,
    last: bool,
    precision: str,
) -> torch.Tensor:
    """Forward and backward of one of `k` micro-batches of an optimizer step: its loss scaled by
    1/k, so that k of them leave the gradient of the whole batch's mean loss. Under DDP the
    gradients are all-reduced once, with the last micro-batch (the others run in `no_sync`).
    Returns the scaled loss (a device tensor: the k of them sum to the step's mean loss)."""
    no_sync = getattr(model, "no_sync", None)  # DDP, also behind torch.compile
    with contextlib.nullcontext() if last or no_sync is None else no_sync():
        with autocast(target.device, precision):
            pred = model(*inputs)  # (B, c, F, h, w)
        loss = F.mse_loss(pred.float(), target) / k
        loss.backward()
    return loss.detach()


def clip_and_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients to `max_norm` and take the (fused) optimizer step, unless they hold
    a NaN or an infinity (a bf16 overflow, a broken sample; under DDP they are averaged
    already, so every rank agrees): then the fused AdamW leaves weights and moments as they
    are, decided on the device -- no host sync. Returns the gradient norm and 1.0 for a
    skipped step, 0.0 otherwise (device tensors)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    nonfinite = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = nonfinite  # read by the fused kernels, as GradScaler sets it
    optimizer.step()
    return grad_norm, nonfinite


def diffuse(
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latents at timesteps `t` (q(x_t | x_0), DDPM eq. 4) and the U-Net's regression
    target: the noise (epsilon) or v = sqrt(a) noise - sqrt(1 - a) x_0."""
    a = alphas[t].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, a.sqrt() * noise - (1 - a).sqrt() * latents


@torch.no_grad()
def validation_set(
    cfg: T2VConfig,
    text_encoder,
    vae: VideoVAE,
    alphas: torch.Tensor,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """`train.val_every`'s held-out batches, this rank's share (batch j on rank j % world): the
    first `train.val_batches` batches of data.val_shards, read whole by every rank (at most one
    pass; not split, not shuffled across ranks) and encoded once -- VAE mean latents (or the
    stored ones), caption embeddings -- with noise and timesteps drawn from the seed of their
    batch, so two validations differ only by the weights. [((noisy, t, text), target)]."""
    tc, data = cfg.train, cfg.data
    want = tc.val_batches * data.batch_size
    items, seen = [], set()
    for item in ShardClips(data.val_shards, data, seed=tc.seed, split=False):
        if item["key"] in seen or len(items) == want:  # a whole pass, or enough
            break
        seen.add(item["key"])
        items.append(item)
    batches = []
    for j in range(rank, math.ceil(len(items) / data.batch_size), world):
        batch = collate_clips(items[j * data.batch_size : (j + 1) * data.batch_size])
        latents = batch_latents(batch, cfg, vae, device)  # the posterior means: fixed
        with autocast(device, tc.precision):
            text = encode_prompts(text_encoder, batch["caption"], device).float()
        gen = torch.Generator().manual_seed(tc.seed * 1000 + j)  # the CPU's: any device alike
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, tc.num_train_timesteps, (len(latents),), generator=gen).to(device)
        noisy, target = diffuse(latents, noise, t, alphas, tc.prediction_type)
        batches.append(((noisy, t, text), target))
    return batches


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    batches: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]],
    precision: str,
    device: torch.device,
    world: int = 1,
) -> torch.Tensor:
    """The mean loss of the U-Net over every rank's validation batches (a device tensor: no
    wait here), eager and in eval mode."""
    total = torch.zeros((), device=device)  # summed per-clip losses
    was_training = unet.training
    unet.eval()
    try:
        with torch.compiler.set_stance("force_eager"), autocast(device, precision):
            for inputs, target in batches:
                pred = unet(*inputs).float()
                total += F.mse_loss(pred, target, reduction="none").flatten(1).mean(1).sum()
    finally:
        unet.train(was_training)
    clips = sum(len(target) for _, target in batches)
    stats = torch.stack([total, torch.tensor(float(clips)).to(device, non_blocking=True)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    return stats[0] / stats[1]


class Preemption:
    """SIGTERM -- a scheduler's notice (SLURM, Kubernetes, a spot instance) -- asks the run to
    stop after the step in progress, with a checkpoint; `--resume` goes on from it. Repeats
    change nothing (under torchrun a rank may get one from the group and one forwarded by
    the agent); the scheduler's SIGKILL after its grace period is the hard stop. Installed
    only in the main thread (elsewhere, as in a Ray Train worker, the launcher handles
    signals).

    `notice`, when given, is polled once per step: anything but None announces that this
    worker's node will be taken away (Ray Train's node-preemption notice,
    :func:`hdvg.t2v.ray_train.preemption_notice`). The run then checkpoints once, after the
    step in progress, and trains on: the launcher restarts it from that checkpoint when the
    node is gone. `stop`, when given, is polled once per step too: True asks what SIGTERM asks
    (the Ray launcher's driver got the signal, :func:`hdvg.t2v.ray_train.stop_request`)."""

    EXIT_CODE = 128 + signal.SIGTERM  # 143, as a process ended by SIGTERM reports

    def __init__(
        self, notice: Callable[[], Any] | None = None, stop: Callable[[], bool] | None = None
    ) -> None:
        self.requested = False
        self._old: Any = None
        self.installed = False
        self._notice = notice
        self.noticed = False
        self._stop = stop

    def vote(self) -> int:
        """This process's wish after this step: 2 checkpoint and stop, 1 checkpoint (a
        preemption notice), 0 go on."""
        if not self.requested and self._stop is not None and self._stop():
            log.warning("stop asked by the launcher: stopping after this step, with a checkpoint")
            self.requested = True
        return 2 if self.requested else int(self.notice_given())

    def notice_given(self) -> bool:
        """Whether a preemption notice has come (polled; logged once)."""
        if not self.noticed and self._notice is not None:
            info = self._notice()
            if info is not None:
                log.warning("node preemption notice (%s): checkpointing after this step", info)
                self.noticed = True
        return self.noticed

    def __enter__(self) -> Preemption:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            log.warning("SIGTERM: stopping after this step, with a checkpoint")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._old)


class DivergedError(RuntimeError):
    """`train.max_nonfinite_steps` steps in a row had non-finite gradients (their updates were
    skipped, so the weights are still those of the last finite step)."""


class CheckpointError(ConfigError):
    """A checkpoint file that does not load: corrupt, cut short, not a checkpoint, or asking
    to run code (a pickle naming anything beyond tensors, numpy arrays and plain types)."""


def _checkpoint_globals() -> list:
    """What a checkpoint may name besides tensors and plain types: the numpy RNG state."""
    import numpy as np
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    dtypes = {type(np.dtype(t)) for t in ("u1", "u4", "i8", "f8")}
    return [np.ndarray, np.dtype, _reconstruct, TorchVersion, *dtypes]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint, loaded with torch's weights-only unpickler: a shared .ckpt cannot run
    code on load. Raises FileNotFoundError or :class:`CheckpointError` with the reason."""
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # torch's weights-only refusal wraps its reason in advice (not ours to give): the reason
        generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if not line.startswith(generic)), type(e).__name__)
        raise CheckpointError(f"{path} is not a checkpoint hdvg can load: {why}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an hdvg checkpoint (no model state)")
    return ckpt


def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group).

    torchrun: the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) says who we are and we
    initialize the group (NCCL on GPUs, gloo on CPUs). Ray Train (``hdvg.t2v.ray_train``) has
    initialized it already and chosen the device: both are taken as they are.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        return dist.get_rank(), dist.get_world_size(), device, False
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, world > 1


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from: a killed run logged steps it
    then lost, and the resumed run logs them again (metrics.jsonl keeps one row per step). A
    row cut short by the kill goes too."""
    if not path.exists():
        return

    def row_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.endswith("\n") and row_step(ln) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, step: int = 0):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events after `step` (logged by a killed run after its last checkpoint) are
                # dropped, as trim_metrics drops their rows: TensorBoard showed them twice
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if step else None)
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard not installed: metrics go to metrics.jsonl only")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def progress_line(row: dict[str, Any], total_steps: int) -> str:
    """One console line per logged step: where the run is, its loss and speed, and when it
    will be done at that speed."""
    left = (total_steps - row["step"]) / row["it_s"] if row["it_s"] > 0 else 0.0
    mem = f"  {row['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in row else ""
    run = row.get("nonfinite_run", 0)
    skipped = f"  non-finite gradients: last {run} steps skipped" if run else ""
    val = f"  val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
    return (
        f"step {row['step']}/{total_steps}  loss {row['loss']:.4f}{val}  {row['it_s']:.2f} it/s  "
        f"{row['samples_s']:.1f} samples/s  data wait {row['data_wait_s']:.2f} s{mem}  "
        f"eta {left / 60:.1f} min{skipped}"
    )


# --- the trainer -----------------------------------------------------------------------------


def main(
    cfg: T2VConfig,
    shards: str | list[str],
    output: str | Path,
    steps: int | None = None,
    resume: bool = False,
    preemption_notice: Callable[[], Any] | None = None,
    stop_request: Callable[[], bool] | None = None,
) -> int:
    """Train; 0 when done, `Preemption.EXIT_CODE` when stopped by SIGTERM or `stop_request`
    (checkpointed). `preemption_notice`, `stop_request`: see :class:`Preemption`."""
    with (
        Preemption(preemption_notice, stop_request) as preempt,
        contextlib.ExitStack() as cleanup,
    ):
        return _train(cfg, shards, output, steps, resume, preempt, cleanup)


def check_validation(cfg: T2VConfig) -> None:
    if cfg.train.val_every and not cfg.data.val_shards:
        raise ConfigError(
            "train.val_every needs held-out shards: --val-shards SPEC (or data.val_shards)"
        )


def check_fresh_run(run_dir: Path, resume: bool) -> None:
    """A run without `--resume` must not start over a run dir that holds a run -- a link, a
    checkpoint or metrics rows (a run killed before its first checkpoint): it would train from
    step 0 and write its checkpoints and metrics over that run's."""
    run_dir = Path(run_dir)
    last, metrics = run_dir / "last.ckpt", run_dir / "metrics.jsonl"
    held = [p for p in (last,) if p.exists() or p.is_symlink()]
    held += sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1:]
    held += [metrics] if metrics.is_file() and metrics.stat().st_size else []
    if not resume and held:
        raise ConfigError(
            f"{run_dir} already holds a run ({held[0]}): pass --resume to go on from it, or "
            f"another --output to start a new one"
        )


def absolute_weight_paths(cfg: T2VConfig) -> None:
    """Relative weight paths (text_encoder.path, vae.path, model.pretrained) made absolute
    from the working directory, in place: the run's config.yaml and checkpoints record them
    so, and `hdvg sample` finds the weights from any directory (it looked for
    `weights/...` relative to wherever it ran)."""
    for section in (cfg.text_encoder, cfg.vae):
        if section.path and "://" not in section.path:
            section.path = os.path.abspath(section.path)
    p = cfg.model.pretrained
    if p and "://" not in p:
        cfg.model.pretrained = os.path.abspath(p)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `--resume` goes on from: last.ckpt, or, when that link is missing or
    dangling (a run dir copied without it, its checkpoint deleted by hand), the newest
    checkpoints/step-*.ckpt -- not a fresh start over the run's checkpoints and rows."""
    last = run_dir / "last.ckpt"
    if last.exists():
        return last
    found = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    if found:
        how = "dangling" if last.is_symlink() else "missing"
        log.warning("%s is %s: resuming from the newest checkpoint, %s", last, how, found[-1])
        return found[-1]
    return None


def _train(
    cfg: T2VConfig,
    shards: str | list[str],
    output: str | Path,
    steps: int | None,
    resume: bool,
    preempt: Preemption,
    cleanup: contextlib.ExitStack,
) -> int:
    tc = cfg.train
    total_steps = steps if steps is not None else tc.steps
    run_dir = Path(output)
    check_fresh_run(run_dir, resume)  # every rank, before any collective: all raise alike
    absolute_weight_paths(cfg)
    rank, world, device, own_group = setup_distributed()
    is_main = rank == 0
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"--output {output} is a file, not a run dir") from None
        except OSError as e:
            raise ConfigError(f"--output {output}: cannot make the run dir: {e.strerror}") from None
        # a checkpoint a killed run was writing (as large as a whole one): never complete
        for stale in (run_dir / "checkpoints").glob("step-*.tmp"):
            log.info("removing %s, a checkpoint cut short", stale)
            stale.unlink(missing_ok=True)

    # seeds: everything stochastic in the loop draws from `gen` or the (saved) global RNGs
    random.seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    torch.manual_seed(tc.seed + rank)
    gen = torch.Generator(device).manual_seed(tc.seed * 1000 + rank)

    # frozen parts
    text_encoder = build_text_encoder(cfg.text_encoder).to(device)
    vae = VideoVAE(cfg.vae).to(device)

    # the U-Net; record the resolved layout (a pretrained checkpoint decides it)
    unet, unet_cfg = build_unet(cfg)
    cfg.model.preset, cfg.model.unet = (
        "base",
        {k: v for k, v in unet_cfg.__dict__.items() if k != "gradient_checkpointing"},
    )
    if unet_cfg.cross_attention_dim != text_encoder.dim:
        raise ConfigError(
            f"U-Net cross_attention_dim {unet_cfg.cross_attention_dim} != text width {text_encoder.dim}"
        )
    if unet_cfg.in_channels != vae.latent_channels:
        raise ConfigError(
            f"U-Net in_channels {unet_cfg.in_channels} != VAE latents {vae.latent_channels}"
        )
    unet.set_gradient_checkpointing(unet_cfg.gradient_checkpointing)
    unet.to(device).train()
    if tc.channels_last:  # before the optimizer and the EMA: their tensors follow the layout
        to_channels_last(unet)
    if tc.train_only_new:
        unet.requires_grad_(False)
        for m in unet.swap_modules():
            m.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    # fused (one kernel group per step, as benchmarks/bench_t2v.py times the step), which also
    # skips a step with non-finite gradients on the device (`found_inf`, set each step below)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay,
                                  fused=True)  # fmt: skip
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
    ema = EMA(unet, tc.ema_decay)
    scheduler = noise_scheduler(cfg)
    alphas = scheduler.alphas_cumprod.to(device)

    dataset = ShardClips(shards, cfg.data, seed=tc.seed)
    val_set = []  # this rank's held-out batches, encoded once
    if tc.val_every:
        check_validation(cfg)
        try:
            val_set = validation_set(cfg, text_encoder, vae, alphas, device, rank, world)
        except NoClipsError as e:  # say which shards: the error alone reads like --shards'
            raise NoClipsError(f"--val-shards / data.val_shards: {e}") from None
        log.info("validation every %d steps on %d batch(es) of %s", tc.val_every,
                 len(val_set), cfg.data.val_shards)  # fmt: skip
    elif cfg.data.val_shards and is_main:
        log.warning("held-out shards given but train.val_every is 0: no validation")
    stream = StreamState(cfg.data)
    step = 0
    # steps skipped for non-finite gradients: in all (kept in checkpoints), and in a row now;
    # device tensors, read only when a metrics row is written
    nonfinite_steps = torch.zeros((), device=device)
    nonfinite_run = torch.zeros((), device=device)
    last = resume_checkpoint(run_dir) if resume else None
    if last is not None:
        ckpt = load_checkpoint(last)
        check_same_unet(resolved_config(ckpt), cfg, last)
        unet.load_state_dict(ckpt["model"])
        ema.shadow = {k: v.to(device) for k, v in ckpt["ema"].items()}
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        step = ckpt["step"]
        nonfinite_steps.fill_(ckpt.get("nonfinite_steps", 0))
        data_state = ckpt["data"][rank] if rank < len(ckpt["data"]) else {}
        dataset.load_state(data_state)  # refuses another worker count (the split differs)
        stream = StreamState(cfg.data, data_state)
        set_rng_state(ckpt["rng"][rank], gen)
        lay_out_like_params(unet, ema, optimizer)  # a run resumed with another layout
        log.info("resumed from %s at step %d", last, step)
        if is_main:
            trim_metrics(run_dir / "metrics.jsonl", step)
    elif resume:  # a restart before the first checkpoint drops the rows of the lost steps
        log.info("no checkpoint in %s yet: starting from scratch", run_dir)
        if is_main:
            trim_metrics(run_dir / "metrics.jsonl", step)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    model = unet
    if tc.compile and tc.compile_cache:
        log.info("train.compile: compiled graphs cached in %s", use_compile_cache(run_dir))
    if tc.compile == "regional":  # in place, before DDP wraps it
        compile_regions(unet)
    compile_norms(tc.compile == "norms")  # process-wide: the norms of every U-Net
    use_kernels(tc.kernels)
    use_attention_backends(tc.attention_backends)
    torch.backends.cudnn.benchmark = tc.cudnn_benchmark  # process-wide too; no-op on the CPU
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            unet,
            device_ids=[device.index] if device.type == "cuda" else None,
            # gradients live in the all-reduce buckets: no copy of every gradient each step
            gradient_as_bucket_view=True,
        )
    if tc.compile in (True, "full"):
        model = torch.compile(model)
    loader = make_loader(dataset, cfg.data, pin_memory=device.type == "cuda", seed=tc.seed,
                         ignore_sigterm=preempt.installed)  # fmt: skip
    batches = iter(loader)
    cleanup.callback(stop_workers, batches)  # however the run ends (they ignore SIGTERM)
    metrics = Metrics(run_dir, is_main, step)

    def checkpoint_payload() -> dict[str, Any]:
        data_states: list[Any] = [stream.state_dict()]
        rngs: list[Any] = [rng_state(gen)]
        if world > 1:
            data_states, rngs = [None] * world, [None] * world
            torch.distributed.all_gather_object(data_states, stream.state_dict())
            torch.distributed.all_gather_object(rngs, rng_state(gen))
        return {
            "model": unet.state_dict(),
            "ema": ema.shadow,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_sched.state_dict(),
            "step": step,
            "nonfinite_steps": int(nonfinite_steps),
            "rng": rngs,
            "data": data_states,
            "config": cfg.to_dict(),
            "frozen": frozen_state(cfg, text_encoder, vae),
            "versions": {"torch": torch.__version__},
        }

    with autocast(device, tc.precision):  # the frozen encoder's "" prompt (no grad: its own)
        empty_text = encode_prompts(text_encoder, [""], device).float()  # (1, L, D)

    def write_row(row: dict[str, Any]) -> None:
        """One metrics.jsonl row (and progress line), its tensors read now."""
        keys: list[Any] = [row["keys"]]
        if world > 1:
            keys = [None] * world
            torch.distributed.all_gather_object(keys, row["keys"])
        if "val_loss" in row:
            row["val_loss"] = float(row["val_loss"])
        row |= {"loss": float(row["loss"]), "grad_norm": float(row["grad_norm"]), "keys": keys,
                "nonfinite_steps": int(row["nonfinite_steps"]),
                "nonfinite_run": int(row["nonfinite_run"])}  # fmt: skip
        metrics.write(row)
        if is_main:
            log.info(progress_line(row, total_steps))
        if row["nonfinite_run"] >= tc.max_nonfinite_steps:
            n, at = row["nonfinite_run"], row["step"]
            raise DivergedError(
                f"steps {at - n + 1}-{at} had non-finite gradients (loss {row['loss']:.4g}) and "
                f"updated nothing (train.max_nonfinite_steps {tc.max_nonfinite_steps}); the "
                f"weights are those of step {at - n}. Lower train.lr, or look at the clips of "
                f"those steps (metrics.jsonl `keys`); --resume continues from the last checkpoint"
            )

    pending: dict[str, Any] | None = None  # the row of the last step, written after the next
    t_last = t_start = time.perf_counter()
    t_last_step = step  # the step at t_last: a row's it/s covers the steps since
    start_step = step
    first = step + 1  # a compiled U-Net compiles in this step: say so, and how long it took
    if tc.compile and is_main:
        log.info("train.compile=%s: step %d compiles the U-Net first (minutes)", tc.compile, first)

    @torch.no_grad()
    def step_inputs(batch: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """A batch's U-Net inputs (noisy latents, timesteps, text) and its regression target."""
        b = len(batch["caption"])
        latents = batch_latents(batch, cfg, vae, device, generator=gen)  # (B, c, F, h, w)
        drop = torch.rand(b, generator=gen, device=device) < tc.cfg_dropout  # (B,)
        with autocast(device, tc.precision):
            text = encode_prompts(text_encoder, batch["caption"], device).float()  # (B,L,D)
        # classifier-free guidance: dropped captions become "" on the device (reading
        # `drop` on the host would wait for the GPU to finish the previous step first)
        text = torch.where(drop.view(b, 1, 1), empty_text, text)  # (B, L, D)
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, tc.num_train_timesteps, (b,), generator=gen, device=device)
        noisy, target = diffuse(latents, noise, t, alphas, tc.prediction_type)
        if tc.channels_last:
            noisy = channels_last_input(noisy)
        return (noisy, t, text), target

    k = tc.grad_accum_steps
    stopping, stop_votes, stop_flag = False, None, torch.zeros((), device=device)
    voted, notice_acted = 0, False  # this rank's vote so far; the ranks' agreed notice acted on
    while step < total_steps:
        t0 = time.perf_counter()
        data_wait, keys, loss = 0.0, [], torch.zeros((), device=device)
        for micro in range(k):  # k micro-batches, one optimizer step
            t_data = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_data
            stream.update(batch)
            keys += batch["key"]
            inputs, target = step_inputs(batch)
            loss += micro_backward(model, inputs, target, k, micro == k - 1, tc.precision)
        grad_norm, nonfinite = clip_and_step(optimizer, params, tc.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        nonfinite_steps += nonfinite
        nonfinite_run.add_(1).mul_(nonfinite)
        lr = lr_sched.get_last_lr()[0]  # what this step used
        lr_sched.step()
        ema.update(unet, step)
        step += 1
        if step == first and tc.compile and is_main:
            log.info("step %d (with the compile) took %.1f s", step, time.perf_counter() - t0)

        # a step's row is written once the next step is queued: reading its loss waits for
        # that step only, while the GPU already has the next one (a row read at once would
        # make every step wait for the GPU to drain before the next could be queued)
        if pending is not None:
            write_row(pending)
            pending = None
        # SIGTERM (vote 2: checkpoint and stop) and a node-preemption notice (vote 1: checkpoint
        # once and train on): every rank acts after the same step -- the ranks' votes are
        # all-reduced (max) one step before they are read, as the metrics rows are
        want = preempt.vote()
        if world > 1:
            vote = int(stop_votes) if stop_votes is not None else 0
            if want > voted:
                stop_flag.fill_(want)  # a kernel, not a copy from the host
                voted = want
            stop_votes = stop_flag.clone()
            torch.distributed.all_reduce(stop_votes, op=torch.distributed.ReduceOp.MAX)
        else:
            vote = want
        stopping = vote >= 2
        just_in_time = vote == 1 and not notice_acted  # once per notice
        notice_acted = notice_acted or vote >= 1
        if just_in_time and is_main:
            log.warning("checkpoint after step %d for the preemption notice", step)
        checkpoint = step % tc.ckpt_every == 0 or step == total_steps or stopping or just_in_time
        val_now = bool(tc.val_every) and step % tc.val_every == 0
        previews = bool(tc.sample_every) and step % tc.sample_every == 0
        # validation, checkpoints and previews are not steps: the steps' own GPU work ends
        # inside their interval, and the clock restarts after these (below)
        side_work = checkpoint or val_now or previews
        if side_work and device.type == "cuda":
            torch.cuda.synchronize(device)
        if step % tc.log_every == 0 or step == total_steps or val_now:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - t_last_step)
            t_last, t_last_step = now, step
            loss_val = loss.detach()
            if world > 1:  # queued on the GPU like the step: no wait here
                torch.distributed.all_reduce(loss_val, op=torch.distributed.ReduceOp.AVG)
            row = {
                "step": step,
                "loss": loss_val,  # tensors until written
                "lr": lr,
                "grad_norm": grad_norm.detach(),
                "nonfinite_steps": nonfinite_steps.clone(),  # tensors until written, too
                "nonfinite_run": nonfinite_run.clone(),
                "it_s": 1.0 / dt,
                "samples_s": len(keys) * world / dt,
                "data_wait_s": data_wait,
                "skipped_too_short": int(batch["skipped_too_short"].max()),
                "skipped_decode_error": int(batch["skipped_decode_error"].max()),
                "skipped_bad_shard": int(batch["skipped_bad_shard"].max()),  # reads broken off
                # which clips this step trained on, per rank: a loss spike leads to its clips
                # (and through the manifest to their sources)
                "keys": keys,
            }
            if device.type == "cuda":
                row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if val_now:  # queued like the step: read with the row
                row["val_loss"] = validation_loss(unet, val_set, tc.precision, device, world)
            if checkpoint:  # a checkpoint's metrics.jsonl holds its own step
                write_row(row)
            else:
                pending = row
        if checkpoint:
            payload = checkpoint_payload()
            if is_main:
                save_checkpoint(run_dir, step, payload, tc.keep_checkpoints)
        if previews:  # each rank its share
            t_sample = time.perf_counter()
            where, done = sample_previews(run_dir, step, cfg, unet, ema, text_encoder, vae,
                                          device, rank, world)  # fmt: skip
            if done:
                log.info("rank %d: sampled prompt(s) %s into %s in %.1f s", rank,
                         ",".join(map(str, done)), where, time.perf_counter() - t_sample)  # fmt: skip
        if side_work:  # the next row's it/s counts training steps only
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_last, t_last_step = time.perf_counter(), step
        if stopping:
            break

    metrics.close()
    if stopping and is_main:
        log.warning("stopped by SIGTERM after step %d; checkpoint %s: --resume goes on from "
                    "there", step, run_dir / "last.ckpt")  # fmt: skip
    elif is_main and step > start_step:
        wall = time.perf_counter() - t_start
        log.info(
            "done: steps %d-%d in %.1f s (%.2f steps/s), last loss %.4f; checkpoint %s",
            start_step + 1, step, wall, (step - start_step) / wall, float(loss.detach()),
            run_dir / "last.ckpt",
        )  # fmt: skip
    elif is_main:  # a resumed run already at its end: say so rather than exit without a word
        log.info("nothing to train: the run is at step %d and --steps / train.steps is %d; "
                 "raise it to go on", step, total_steps)  # fmt: skip
    if world > 1:
        torch.distributed.barrier()
    if own_group:  # a group Ray Train made is Ray's to tear down
        torch.distributed.destroy_process_group()
    return Preemption.EXIT_CODE if stopping else 0
