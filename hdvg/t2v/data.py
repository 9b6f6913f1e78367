"""Stream hdvg WebDataset shards into training: ``{key}.mp4`` -> a clip tensor and its caption.

``ShardClips`` is an ``IterableDataset`` that

- reads shards from a directory (``OUT`` or ``OUT/shards``), a brace pattern
  (``shard-{000000..000099}.tar``), a glob, or a list of them -- local paths or any fsspec URL;
- splits the work across nodes (``RANK``/``WORLD_SIZE`` or an initialized process group) and
  DataLoader workers: whole shards per worker when there are enough shards, else every
  worker reads all shards and keeps every n-th sample;
- shuffles shard order per epoch and samples in a buffer of raw (still encoded) samples, all
  seeded by (seed, epoch, worker), and loops over epochs forever;
- is resumable: every sample carries its worker id and that worker's raw-sample cursor; the
  trainer keeps the largest cursor per worker and hands it back on resume, and each worker
  fast-forwards by re-reading (not decoding) that many raw samples;
- decodes only the frames it needs (PyAV, in-process; ``hdvg.frames.decode_at``: the GOPs its
  window touches, unreferenced frames skipped), at a target fps or a frame stride,
  resized so the clip covers the training size and center-cropped; clips too short for the
  requested frames are skipped and counted (``skipped_too_short``), as are undecodable ones;
- with ``data.use_latents``, reads ``{key}.latents.npy`` (written by the ``latents`` curation
  stage) instead of decoding the mp4.

Samples leave the worker as uint8 ``(3, F, H, W)`` -- 4x smaller than float over the worker
pipes; the trainer normalizes on the GPU.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import random
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import count
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from hdvg.t2v.config import ConfigError, DataConfig

log = logging.getLogger("hdvg.t2v.data")


class ShardsUnreachable(ConfigError):
    """`--shards` names a place that cannot be listed (no such host, refused, no access)."""


def expand_shards(
    spec: str | list[str] | tuple[str, ...], timeout_s: float | None = None
) -> list[str]:
    """Shard URLs for a spec: dir, brace pattern, glob, file, or a list (sorted, deduplicated).

    A name ending in ``.tar`` is a shard, not a folder: it is not listed (over http(s) a
    listing is a GET, which reads the whole shard when its server sends no content type or
    text/html). Of the many names a brace pattern makes, only the first and the
    last are checked to exist (a typo shows at once; thousands of requests per rank at start
    would not): a missing one in between counts as a broken shard when its turn comes.
    ``timeout_s`` bounds an http(s) server's silence, as for the reads (`data.read_timeout_s`):
    one that does not answer makes its name count as missing."""
    import braceexpand
    import fsspec

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        names = list(braceexpand.braceexpand(s))
        for i, one in enumerate(names):
            try:
                fs, path = fsspec.core.url_to_fs(one, **_open_options(one, timeout_s))
                if any(c in path for c in "*?["):
                    found = sorted(fs.glob(path))
                elif path.endswith(".tar"):
                    unchecked = 0 < i < len(names) - 1
                    found = [path] if unchecked or fs.exists(path) else []
                elif fs.isdir(path):
                    if fs.isdir(path.rstrip("/") + "/shards"):
                        path = path.rstrip("/") + "/shards"
                    found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
                else:
                    found = [path] if fs.exists(path) else []
            except FileNotFoundError:
                found = []
            except Exception as e:  # network, credentials, an unknown protocol: one line
                reason = (str(e).strip().splitlines() or [""])[0]
                raise ShardsUnreachable(
                    f"cannot list shards at {one!r}: {type(e).__name__}: {reason}"
                ) from None
            if not found:
                raise FileNotFoundError(f"no shards at {one!r}")
            urls += [fs.unstrip_protocol(p) if "://" in one else p for p in found]
    return list(dict.fromkeys(urls))


OPEN_ATTEMPTS = 3  # a shard whose read fails before its first sample (a network error) is
# tried this often, 0.5 s then 1 s apart, before it counts as broken


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a shard can raise that is the shard's or the network's fault."""
    errors: list[type[BaseException]] = [tarfile.TarError, EOFError, zlib.error, OSError]
    try:
        import aiohttp  # fsspec's http(s): a cut or refused connection, a short body

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def _open_options(url: str, timeout_s: float | None) -> dict[str, Any]:
    """fsspec options for reading `url`: for http(s), aiohttp's connect and read timeouts
    (its default is 5 minutes for a whole request, however long a shard takes)."""
    if timeout_s is None or not url.startswith(("http://", "https://")):
        return {}
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    return {"client_kwargs": {"timeout": timeout}}


def read_tar(
    url: str, errors: list[str] | None = None, timeout_s: float | None = None
) -> Iterator[dict[str, Any]]:
    """Group a tar's members by key (``{key}.{ext}``); only regular, safe member names.

    A tar that breaks off (truncated, corrupt, a connection cut) ends after its last whole
    sample with a warning, the error appended to ``errors``: one bad shard does not end a
    training run. A network error before the first sample is retried (``OPEN_ATTEMPTS``).
    Without ``errors`` the error is raised."""
    done = [0]  # samples yielded
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            yield from _tar_samples(url, done, timeout_s)
            return
        except _read_errors() as e:
            # a remote shard's open or read failing (fsspec's http(s) reports a refused
            # connection as FileNotFoundError too) may pass: try again; a bad tar will not
            remote = "://" in url and not url.startswith("file://")
            bad_tar = isinstance(e, tarfile.TarError | EOFError | zlib.error)
            if remote and not bad_tar and done[0] == 0 and attempt < OPEN_ATTEMPTS:
                log.warning(
                    "shard %s: %s; trying again (%d/%d)", url, e, attempt + 1, OPEN_ATTEMPTS
                )
                time.sleep(0.5 * attempt)
                continue
            if errors is None:
                raise
            errors.append(f"{url}: {type(e).__name__}: {e}")
            log.warning(
                "shard %s breaks off after %d samples (%s): the rest skipped", url, done[0], e
            )
            return  # the sample being read is incomplete


def _tar_samples(url: str, done: list[int], timeout_s: float | None) -> Iterator[dict[str, Any]]:
    import fsspec

    with fsspec.open(url, "rb", **_open_options(url, timeout_s)) as f:
        current: dict[str, Any] = {}
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                try:  # the "data" filter's checks, without extracting anything to disk
                    tarfile.data_filter(member, "/nonexistent")
                except tarfile.FilterError:
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if current and current["__key__"] != key:
                    done[0] += 1
                    yield current
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(member).read()
        if current:
            done[0] += 1
            yield current


def shuffle_buffer(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


@dataclass
class Clip:
    frames: np.ndarray | None  # (F, H, W, 3) uint8; None when skipped
    reason: str | None = None  # "too_short" / "decode_error" when skipped


def frame_indices(
    n_src: int, src_fps: float, cfg: DataConfig, rng: random.Random
) -> list[int] | None:
    """Source frame indices for one clip, or None when the video is too short."""
    step = (src_fps / cfg.fps) if cfg.fps else float(cfg.stride)
    span = (cfg.frames - 1) * step + 1
    if n_src < math.ceil(span - 1e-6):
        return None
    last_start = n_src - math.ceil(span - 1e-6)
    start = rng.randint(0, last_start) if cfg.random_start else 0
    return [min(n_src - 1, start + round(i * step)) for i in range(cfg.frames)]


def decode_clip(data: bytes, cfg: DataConfig, rng: random.Random, meta: dict | None = None) -> Clip:
    """Decode the frames of one clip at the training size (resize to cover, center crop).

    The ``latents`` curation stage (``hdvg/stages/models/latents.py``) decodes with this too,
    so that stored latents come from exactly the frames the trainer would take."""
    import av

    from hdvg.frames import decode_at, demux

    out_h, out_w = cfg.size
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # one core per worker; workers give the parallelism
            rate = (
                stream.average_rate
                or stream.guessed_rate
                or Fraction(int((meta or {}).get("fps", 25)))
            )
            src_fps = float(rate)
            packets, pts = demux(container, stream)  # the frames counted, not taken from metadata
            idx = frame_indices(len(pts), src_fps, cfg, rng)
            if idx is None:
                return Clip(None, "too_short")
            w, h = stream.codec_context.width, stream.codec_context.height
            sar = float(stream.sample_aspect_ratio or 1) or 1.0
            geometry: dict[int, tuple[int, int, int, int]] = {}

            def crop(frame) -> np.ndarray:
                # the picture as players show it: pixels widened by the SAR, turned by the
                # display rotation (hdvg's clips have neither; other tools' shards may)
                k = (int(frame.rotation or 0) // 90) % 4  # quarter turns counterclockwise
                if k not in geometry:
                    dw, dh = (h, w * sar) if k % 2 else (w * sar, h)
                    scale = max(out_w / dw, out_h / dh)
                    rw, rh = max(out_w, round(dw * scale)), max(out_h, round(dh * scale))
                    sw, sh = (rh, rw) if k % 2 else (rw, rh)  # stored size before turning
                    geometry[k] = (sw, sh, (rh - out_h) // 2, (rw - out_w) // 2)
                sw, sh, y0, x0 = geometry[k]
                rgb = frame.to_ndarray(width=sw, height=sh, format="rgb24", interpolation="AREA")
                if k:
                    rgb = np.rot90(rgb, k)
                return np.ascontiguousarray(rgb[y0 : y0 + out_h, x0 : x0 + out_w])

            # only the GOPs holding a wanted frame are decoded, unreferenced frames skipped
            got = decode_at(stream, packets, {pts[i]: i for i in set(idx)}, crop)
    except (av.error.FFmpegError, IndexError, ValueError, TypeError) as e:  # TypeError: bad hints
        return Clip(None, f"decode_error: {type(e).__name__}")
    if len(got) < len(set(idx)):
        return Clip(None, "decode_error: frames missing")
    return Clip(np.stack([got[i] for i in idx]))


def world() -> tuple[int, int]:
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class NoClipsError(ValueError):
    """A loader worker read all of its shards once and could train on none of their clips
    (every one undecodable or too short): it would otherwise read them forever, and the
    DataLoader, which asks its workers in turn, would wait on it forever."""

    def __init__(self, message: str):
        # re-raised by the DataLoader (or Ray) in another process, the message carries the
        # worker's traceback: keep the reason, its last line
        super().__init__(message.strip().splitlines()[-1].split("NoClipsError: ", 1)[-1])


class ShardClips(IterableDataset):
    """Endless, shuffled, resumable stream of ``{"video", "caption", "key", "worker", "cursor"}``."""

    def __init__(self, spec: str | list[str], cfg: DataConfig, seed: int = 0, split: bool = True):
        """`split`: each rank (and loader worker) reads its own share of the shards; False:
        every reader reads them all (a validation set, the same on every rank)."""
        super().__init__()
        self.split = split
        self.urls = expand_shards(spec, cfg.read_timeout_s)
        self.cfg = cfg
        self.seed = seed
        self.cursors: dict[int, int] = {}  # global worker id -> raw samples already consumed
        self.batches = 0  # batches the trainer consumed (DataLoader workers take turns)
        # this rank's place, read here in the trainer's process: loader workers start from a
        # forkserver made once per process, whose environment (RANK, WORLD_SIZE) is its
        # start's, and they have no process group to ask
        self.rank_world = world() if split else (0, 1)

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from :class:`StreamState` ``state_dict()`` (same worker count required)."""
        n = get_num_workers(self.cfg)
        if state.get("num_workers", n) != n:
            raise ConfigError(
                f"cannot resume the data stream with {n} workers; it was saved with "
                f"{state['num_workers']} (set data.num_workers back)"
            )
        self.cursors = {int(k): int(v) for k, v in state.get("cursors", {}).items()}
        self.batches = int(state.get("batches", 0))

    def _raw(self, gw: int, total: int, errors: list[str]) -> Iterator[dict[str, Any] | None]:
        """This worker's raw (undecoded) samples, epoch after epoch, shuffled; None after
        each epoch's last sample. Shards that break off go to ``errors``."""
        by_shard = len(self.urls) >= total
        for epoch in count():
            order = list(self.urls)
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            mine = order[gw::total] if by_shard else order

            def samples(mine=mine) -> Iterator[dict[str, Any]]:
                n = 0
                for url in mine:
                    for s in read_tar(url, errors, self.cfg.read_timeout_s):
                        if by_shard or n % total == gw:
                            yield s
                        n += 1

            rng = random.Random(f"{self.seed}-{epoch}-{gw}")
            empty = True
            for s in shuffle_buffer(samples(), self.cfg.shuffle_buffer, rng):
                empty = False
                yield s
            if empty:
                broken = f"; {len(errors)} broke off, e.g. {errors[0]}" if errors else ""
                raise NoClipsError(
                    f"loader worker {gw} got no samples from {len(mine)} shard(s){broken}"
                )
            yield None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self.rank_world
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader asks its workers in turn, starting from worker 0: after `batches`
        # batches the next one is due from role `batches % nworkers`, so shift the roles
        wid = (wid + self.batches) % nworkers
        gw, total = rank * nworkers + wid, world_size * nworkers
        cursor = self.cursors.get(gw, 0)
        skipped = {"too_short": 0, "decode_error": 0}
        errors: list[str] = []  # shard reads that broke off, so far
        raw = self._raw(gw, total, errors)
        done = 0
        while done < cursor:  # fast-forward on resume: read, do not decode
            done += next(raw) is not None
        used = cursor > 0  # a resumed epoch's first part was used before: judge the next one
        for s in raw:
            if s is None:  # a whole pass over this worker's shards
                if not used:
                    raise NoClipsError(
                        f"loader worker {gw}: no usable clip in a whole pass over its shards "
                        f"({skipped['decode_error']} undecodable, {skipped['too_short']} shorter "
                        f"than {self.cfg.frames} frames at the sampling rate, {len(errors)} shard "
                        f"reads broken off) in {self.urls[:3]}"
                        + (" ..." if len(self.urls) > 3 else "")
                    )
                used = False
                continue
            cursor += 1
            key = s["__key__"]
            meta = _meta(s.get("json"))
            caption = s.get("txt", b"").decode("utf-8", "replace").strip()
            rng = random.Random(f"{self.seed}-{key}-{cursor}")
            item: dict[str, Any] = {"caption": caption, "key": key, "worker": gw, "cursor": cursor}
            latents = _latents(s.get("latents.npy")) if self.cfg.use_latents else None
            if latents is not None:
                item["latents"] = latents
            elif "mp4" in s:  # also a clip whose stored latents do not load
                clip = decode_clip(s["mp4"], self.cfg, rng, meta)
                if clip.frames is None:
                    skipped["too_short" if clip.reason == "too_short" else "decode_error"] += 1
                    continue
                item["video"] = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)  # (3, F, H, W)
            else:
                skipped["decode_error"] += 1
                continue
            item |= {f"skipped_{k}": v for k, v in skipped.items()}
            item["skipped_bad_shard"] = len(errors)
            used = True
            yield item


def _meta(raw: bytes | None) -> dict[str, Any]:
    """A sample's ``json`` (hints such as its fps); {} when missing or not a JSON object."""
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:  # not JSON, not UTF-8
        return {}
    return meta if isinstance(meta, dict) else {}


def _latents(raw: bytes | None) -> torch.Tensor | None:
    """A sample's stored latents, or None when it has none, they do not load, or they hold a
    NaN or an infinity (one such sample would make its step's gradients non-finite)."""
    if not raw:
        return None
    try:
        array = np.load(io.BytesIO(raw))
    except (ValueError, OSError, EOFError):  # not an .npy (pickles are refused too)
        return None
    if array.dtype.kind not in "fiu" or not np.isfinite(array).all():
        return None
    return torch.from_numpy(array)


def get_num_workers(cfg: DataConfig) -> int:
    return max(1, cfg.num_workers)


class StreamState:
    """What the trainer keeps about the stream: max cursor per worker, batches consumed."""

    def __init__(self, cfg: DataConfig, state: dict[str, Any] | None = None):
        state = state or {}
        self.num_workers = get_num_workers(cfg)
        self.cursors = {int(k): int(v) for k, v in state.get("cursors", {}).items()}
        self.batches = int(state.get("batches", 0))

    def update(self, batch: dict[str, Any]) -> None:
        for w, c in zip(batch["worker"].tolist(), batch["cursor"].tolist(), strict=True):
            self.cursors[w] = max(self.cursors.get(w, 0), c)
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursors": dict(self.cursors),
            "batches": self.batches,
            "num_workers": self.num_workers,
        }


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch loader items. With ``use_latents`` a batch can mix clips that carry stored latents
    with clips curated before the ``latents`` stage existed (mp4 only): the latents clips come
    first, so ``batch["latents"]`` holds the first ``len(batch["latents"])`` samples and
    ``batch["video"]`` the rest, and every per-sample field (caption, key, ...) is in that
    order."""
    if all("latents" in it for it in items) or not any("latents" in it for it in items):
        return default_collate(items)
    items = sorted(items, key=lambda it: "latents" not in it)  # stable: order kept per group
    split = sum("latents" in it for it in items)
    common = [{k: v for k, v in it.items() if k not in ("latents", "video")} for it in items]
    batch = default_collate(common)
    batch["latents"] = torch.stack([it["latents"] for it in items[:split]])
    batch["video"] = torch.stack([it["video"] for it in items[split:]])
    return batch


def make_loader(
    dataset: ShardClips,
    cfg: DataConfig,
    pin_memory: bool = False,
    seed: int = 0,
    ignore_sigterm: bool = False,
) -> DataLoader:
    """The stream in batches. `ignore_sigterm`: workers leave SIGTERM to the trainer (which
    stops after its step with a checkpoint; a scheduler often signals the whole process
    group, and a worker dying of it would end the run with a DataLoader error first). Whoever
    asks for that must stop the workers (`stop_workers`): the interpreter's exit stops
    worker processes with SIGTERM and would then wait on them forever."""
    # its own generator: starting workers must not draw from the global RNG (resume exactness)
    return DataLoader(
        dataset,
        generator=torch.Generator().manual_seed(seed),
        batch_size=cfg.batch_size,
        collate_fn=collate_clips,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if cfg.num_workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_sigterm if ignore_sigterm else None,
        multiprocessing_context=worker_context() if cfg.num_workers else None,
    )


def worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a clean process, not a fork of the trainer's: FFmpeg's
    thread pools (PyAV decoding the validation clips, writing previews) do not survive a
    fork, and a forked worker waited forever on a scaler thread it did not have. The
    forkserver imports this module (torch, PyAV) once; workers fork from it ready."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["hdvg.t2v.data"])  # no effect once the server is running
    return ctx


def _ignore_sigterm(worker_id: int) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(batches: Iterator[Any]) -> None:
    """End the worker processes of a loader's iterator now (each finishes what it is doing)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # none without workers
    if shutdown is not None:
        shutdown()


def to_model_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, F, H, W)`` -> float in [-1, 1]."""
    return video.float().div(127.5).sub(1.0)
