"""Frames of a cut clip, decoded once for every frame-reading stage.

All model stages of a recipe (captions, CLIP, aesthetic, watermark, motion, overlay, text)
read the same few frames of a clip. `get_frames(clip)` returns them, decoding from
`clip.data` with PyAV the first time any stage asks. Which frames are decoded follows the
recipe (`spec_for(stages)`, set on each stage as `frame_spec` by the model actor): a
recipe whose only frame reader is the middle-frame caption decodes up to the middle frame
and stops there.

Two places hold decoded frames:
- `clip.frames`, set by the CPU frame pool that runs ahead of the model actors
  (`hdvg.pipeline.prepare_frames`): frames cross one Ray hop, pool → actor, and the actor
  drops them before its results go on (`drop_frames`), so they never reach the driver;
- otherwise a cache keyed by the clip object's identity and emptied by a
  `weakref.finalize` when the clip is collected, for stages run in-process.

Derived per-clip values (a CLIP embedding shared by three stages, a caption model's pixel
tensor computed by the frame pool) ride the same object via `memo(clip, key, fn)`.
"""

from __future__ import annotations

import dataclasses
import io
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FrameSpec:
    """Which frames to decode: `n` spread evenly over the clip, plus the exact middle one
    (HD-VG-130M captions the middle frame), each with the frame right after it when
    `nexts` (optical flow wants neighbours, not frames a second apart). `n=0, nexts=False`
    is the middle frame alone."""

    n: int = 8
    max_side: int = 640  # long side after downscaling; the models resize further anyway
    nexts: bool = True


DEFAULT_SPEC = FrameSpec()
MIDDLE_ONLY = FrameSpec(n=0, nexts=False)


def spec_for(stages: list[Any]) -> FrameSpec | None:
    """The frames a recipe's stages read: the middle frame alone when every frame reader
    says `frame_use == "middle"`; None when no stage reads frames."""
    uses = {s.frame_use for s in stages} - {None}
    if not uses:
        return None
    return MIDDLE_ONLY if uses == {"middle"} else DEFAULT_SPEC


@dataclass
class Frames:
    images: np.ndarray  # (N, H, W, 3) uint8 RGB, in time order
    nexts: np.ndarray  # (N, H, W, 3) uint8 RGB: the frame following each of `images`
    indices: list[int]  # frame index of each image within the clip
    middle: int  # position in `images` of the clip's middle frame
    n_frames: int  # frames in the clip
    fps: float
    width: int  # of the clip as written (the images are downscaled)
    height: int
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Clip pixels per image pixel."""
        return self.width / self.images.shape[2]

    def gray(self) -> np.ndarray:
        """(N, H, W) uint8 luma (BT.601), computed once."""
        if "_gray" not in self.memo:
            self.memo["_gray"] = _luma(self.images)
        return self.memo["_gray"]

    def prepared_only(self) -> Frames:
        """These frames without their images: what the frame pool sends on when every
        stage reading them has prepared its own inputs (`memo`) and reads nothing else."""
        none = self.images[:0]
        return dataclasses.replace(self, images=none, nexts=none)

    def gray_nexts(self) -> np.ndarray:
        if "_gray_next" not in self.memo:
            self.memo["_gray_next"] = _luma(self.nexts)
        return self.memo["_gray_next"]


def _luma(rgb: np.ndarray) -> np.ndarray:
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(y + 0.5, 0, 255).astype(np.uint8)


def sample_indices(n_frames: int, n: int) -> tuple[list[int], int]:
    """`n` indices at the centres of `n` equal spans, plus the middle frame; (sorted, middle pos)."""
    n = min(n, n_frames)
    mid = n_frames // 2
    idx = {min(n_frames - 1, int((i + 0.5) * n_frames / n)) for i in range(n)} | {mid}
    out = sorted(idx)
    return out, out.index(mid)


def decode_frames(data: bytes, spec: FrameSpec = DEFAULT_SPEC, threads: int = 0) -> Frames:
    """Decode the sampled frames (and their successors) of an mp4 held in memory.

    One demux: the packets are counted (no decoding) so the sample points are known, then
    one sequential decode of those packets converts only the frames it keeps and stops after
    the last one; the scaler downsizes in C. Raises `ValueError` on a clip without
    decodable frames. `threads`: decoder threads, 0 = as many as cores (for one clip at a
    time); the frame pool, one clip per CPU, decodes single-threaded (a 16-thread decoder
    for a few dozen frames costs ~1.7x the CPU).
    """
    import av

    images: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as c:
        vs = c.streams.video[0]
        cc = vs.codec_context
        if threads != 1:
            vs.thread_type = "AUTO"
        cc.thread_count = threads
        # one demux: the packets are counted, then decoded from memory (a second demux of
        # the bytes cost ~10% of a middle-frame decode of a 2 s 720p clip)
        packets = list(c.demux(vs))
        pts = sorted(p.pts for p in packets if p.size and p.pts is not None)
        n_frames = len(pts)
        if n_frames == 0:
            raise ValueError("no video frames")
        indices, middle = sample_indices(n_frames, spec.n)
        keep = set(indices)
        if spec.nexts:
            keep |= {i + 1 for i in indices if i + 1 < n_frames}
        at = {pts[i]: i for i in keep}  # frames are found by timestamp, not by output count
        fps = float(vs.average_rate or vs.guessed_rate or 25.0)
        w0, h0 = cc.width, cc.height
        s = min(1.0, spec.max_side / max(w0, h0))
        w, h = max(2, round(w0 * s / 2) * 2), max(2, round(h0 * s / 2) * 2)
        for packet in packets:
            # frames no other frame refers to are skipped unless kept: the kept frames
            # decode exactly as in a full decode, at a fraction of the work with B-frames
            cc.skip_frame = "DEFAULT" if packet.pts in at else "NONREF"
            for frame in packet.decode():
                i = at.get(frame.pts)
                if i is not None:
                    images[i] = frame.to_ndarray(width=w, height=h, format="rgb24")
            if len(images) == len(at):
                break
    if not images:
        raise ValueError("no frame decoded")
    got = sorted(images)
    # a clip may hold fewer decodable frames than packets: fall back to the nearest decoded
    near = {i: images[min(got, key=lambda g: abs(g - i))] for i in indices}
    imgs = np.stack([near[i] for i in indices])
    nexts = np.stack([images.get(i + 1, near[i]) for i in indices]) if spec.nexts else imgs
    return Frames(
        images=imgs,
        nexts=nexts,
        indices=indices,
        middle=middle,
        n_frames=n_frames,
        fps=fps,
        width=w0,
        height=h0,
    )


# id(clip) -> Frames. Entries leave when their clip is garbage-collected.
_CACHE: dict[int, Frames] = {}


def get_frames(clip: Any, spec: FrameSpec | None = None) -> Frames:
    """The clip's frames: those the frame pool put on it, or decoded on first use (with
    `spec`: the recipe's, which the model actor gives its stages; default all the frames any
    stage reads) and shared by every later stage."""
    fr = getattr(clip, "frames", None)
    if fr is not None:
        return fr
    key = id(clip)
    fr = _CACHE.get(key)
    if fr is None:
        if clip.data is None:
            raise ValueError(f"clip {clip.clip_id} has no mp4 data")
        fr = decode_frames(clip.data, spec or DEFAULT_SPEC)
        _CACHE[key] = fr
        weakref.finalize(clip, _CACHE.pop, key, None)
    return fr


def memo(clip: Any, key: str, fn: Callable[[Frames], Any], spec: FrameSpec | None = None) -> Any:
    """A value derived from the clip's frames, computed once per clip (e.g. an embedding)."""
    fr = get_frames(clip, spec)
    if key not in fr.memo:
        fr.memo[key] = fn(fr)
    return fr.memo[key]


def release(clip: Any) -> None:
    """Drop a clip's frames now (the cache also empties itself when the clip is collected)."""
    _CACHE.pop(id(clip), None)
    if getattr(clip, "frames", None) is not None:
        clip.frames = None


def drop_frames(results: list[Any]) -> None:
    """Drop the frames of every clip of these sources, before they travel on."""
    for r in results:
        for c in r.clips:
            release(c)


def cached_count() -> int:
    return len(_CACHE)
