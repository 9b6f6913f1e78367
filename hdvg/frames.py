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
    :func:`decode_at` converts only the frames it keeps (the scaler downsizes in C). Raises
    `ValueError` on a clip without decodable frames. `threads`: decoder threads, 0 = as many
    as cores (for one clip at a time); the frame pool, one clip per CPU, decodes
    single-threaded (a 16-thread decoder for a few dozen frames costs ~1.7x the CPU).
    """
    import av

    with av.open(io.BytesIO(data)) as c:
        vs = c.streams.video[0]
        cc = vs.codec_context
        if threads != 1:
            vs.thread_type = "AUTO"
        cc.thread_count = threads
        packets, pts = demux(c, vs)
        n_frames = len(pts)
        if n_frames == 0:
            raise ValueError("no video frames")
        indices, middle = sample_indices(n_frames, spec.n)
        keep = set(indices)
        if spec.nexts:
            keep |= {i + 1 for i in indices if i + 1 < n_frames}
        fps = float(vs.average_rate or vs.guessed_rate or 25.0)
        w0, h0 = cc.width, cc.height
        s = min(1.0, spec.max_side / max(w0, h0))
        w, h = max(2, round(w0 * s / 2) * 2), max(2, round(h0 * s / 2) * 2)
        images = decode_at(
            vs, packets, {pts[i]: i for i in keep},
            lambda f: f.to_ndarray(width=w, height=h, format="rgb24"),
        )  # fmt: skip
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


def demux(container: Any, stream: Any) -> tuple[list, list[int]]:
    """The stream's packets in decode order (one demux, from memory) and its frames'
    timestamps in presentation order: frame ``i`` is the one with timestamp ``pts[i]``."""
    packets = list(container.demux(stream))
    return packets, sorted(p.pts for p in packets if p.size and p.pts is not None)


def decode_at(stream: Any, packets: list, at: dict[int, int], convert: Callable) -> dict:
    """``{index: convert(frame)}`` for the frames whose timestamp ``at`` maps to an index.

    One pass over ``packets`` (:func:`demux`): the decoder is fed only the GOPs that hold a
    wanted frame (:func:`_needed_packets`), frames no other frame refers to are skipped unless
    wanted (the wanted ones decode exactly as in a full decode, at a fraction of the work with
    B-frames), the pass stops after the last wanted frame, and the decoder's reorder queue is
    drained when the packets after it were skipped. Frames are found by timestamp, not by
    output count."""
    cc = stream.codec_context
    out: dict[int, Any] = {}

    def take(frames) -> None:
        for frame in frames:
            i = at.get(frame.pts)
            if i is not None:
                out[i] = convert(frame)

    flushed = False
    for packet, need in zip(
        packets, _needed_packets(packets, at.keys(), cc.codec.canonical_name), strict=True
    ):
        if not need:  # a GOP holding no wanted frame: never fed to the decoder
            continue
        cc.skip_frame = "DEFAULT" if packet.pts in at else "NONREF"
        flushed = flushed or not packet.size  # demux ends with an empty packet: a flush
        take(packet.decode())
        if len(out) == len(at):
            break
    else:
        if not flushed:  # frames still held for reordering: no later packet pushed them out
            take(cc.decode(None))
    return out


def _needed_packets(packets: list, keep_pts, codec: str) -> list[bool]:
    """Which packets (decode order) the kept frames need: the GOPs (keyframe to keyframe)
    that hold a kept frame. A kept frame decodes from its GOP's keyframe exactly as in a full
    decode when every keyframe is a clean random-access point (:func:`_clean_keyframe`) and no
    GOP has leading pictures (frames shown before their keyframe, which refer back); else
    (open GOPs) every packet is needed."""
    keep = set(keep_pts)
    starts = [i for i, p in enumerate(packets) if p.is_keyframe and i > 0]
    bounds = list(zip([0, *starts], [*starts, len(packets)], strict=True))
    need_gop = []
    for k, (a, b) in enumerate(bounds):
        gop = [p.pts for p in packets[a:b] if p.pts is not None]
        key_pts = packets[a].pts
        leading = bool(gop) and key_pts is not None and min(gop) < key_pts
        if k and (key_pts is None or leading or not _clean_keyframe(packets[a], codec)):
            return [True] * len(packets)
        need_gop.append(bool(keep.intersection(gop)))
    return [need_gop[k] for k, (a, b) in enumerate(bounds) for _ in range(a, b)]


def _clean_keyframe(packet, codec: str) -> bool:
    """Decoding can start here and every later frame comes out exact: an H.264 or HEVC IDR
    picture (not a recovery point or a CRA, the keyframes of open GOPs), or a VP8 / VP9 / AV1
    key frame. Unknown codecs: no."""
    if codec in ("vp8", "vp9", "av1"):
        return True
    if codec not in ("h264", "hevc"):
        return False
    types = _nal_types(bytes(packet), codec)
    return 5 in types if codec == "h264" else bool(types & {19, 20})


def _nal_types(data: bytes, codec: str) -> set[int]:
    """NAL unit types in an H.264 / HEVC packet: 4-byte length-prefixed (MP4), else Annex-B."""

    def kind(b: int) -> int:
        return b & 0x1F if codec == "h264" else (b >> 1) & 0x3F

    types, i = set(), 0
    while i + 4 < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        if n <= 0 or i + 4 + n > len(data):
            break
        types.add(kind(data[i + 4]))
        i += 4 + n
    if i == len(data) and types:
        return types
    types, j = set(), data.find(b"\x00\x00\x01")
    while 0 <= j < len(data) - 3:  # start codes found in C, not byte by byte in Python
        types.add(kind(data[j + 3]))
        j = data.find(b"\x00\x00\x01", j + 3)
    return types


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
