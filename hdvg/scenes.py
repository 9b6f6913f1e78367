"""Scene split with PySceneDetect on frames decoded once by ffmpeg.

We drive PySceneDetect's detectors frame by frame (`process_frame`) instead of calling
`detect()`: one ffmpeg decode gives downscaled frames *and* each frame's presentation
time and keyframe flag, so cut times are exact for variable-frame-rate sources and for
streams whose timestamps do not start at 0, and the cut stage knows where keyframes are
without a second pass. Times are seconds from the source's first frame.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from .config import ScenesConfig
from .ffmpeg import FrameReader
from .records import FrameSample, GivenScene, Probe


@dataclass
class Span:
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    given: GivenScene | None = None


@dataclass
class SceneResult:
    spans: list[Span]
    cuts: list[int]  # frame indices where a new shot begins (detector output)
    pts: list[float]  # per decoded frame, seconds from the first frame
    keyframes: list[int]  # indices of keyframes
    samples: list[FrameSample] = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        return len(self.pts)

    @property
    def fps(self) -> float:
        if len(self.pts) < 2 or self.pts[-1] <= 0:
            return 0.0
        return (len(self.pts) - 1) / self.pts[-1]


class _HsvDeltaScore:
    """ContentDetector's frame score computed in two OpenCV passes.

    PySceneDetect scores a frame by the mean absolute difference of each HSV channel from
    the previous frame, weighted. Its code splits the channels and makes two int32 copies
    of each per frame; on 256-px frames that is ~0.9 ms, more than the rest of the
    detection put together. `cv2.absdiff` + `cv2.sumElems` give the same per-channel sums
    (exact integers in float64), hence the same scores and cuts, in ~0.02 ms. Everything
    else (adaptive window, flash filter, min scene length) stays PySceneDetect's own code;
    edge weighting, a stats manager or an unfamiliar PySceneDetect version fall back to it.
    """

    _prev_hsv: np.ndarray | None = None

    def _calculate_frame_score(self, timecode, frame_img: np.ndarray) -> float:
        weights = getattr(self, "_weights", None)
        if (
            weights is None
            or len(weights) != 4
            or weights[3] > 0.0  # delta_edges
            or getattr(self, "stats_manager", None) is not None
        ):
            return super()._calculate_frame_score(timecode, frame_img)
        import cv2

        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        prev, self._prev_hsv = self._prev_hsv, hsv
        if prev is None:  # first frame: nothing to compare with
            return 0.0
        n = float(hsv.shape[0] * hsv.shape[1])
        dh, ds, dl, _ = cv2.sumElems(cv2.absdiff(hsv, prev))
        components = (dh / n, ds / n, dl / n, 0.0)
        return sum(c * w for c, w in zip(components, weights, strict=True)) / sum(
            abs(w) for w in weights
        )


def make_detector(cfg: ScenesConfig):
    from scenedetect import AdaptiveDetector, ContentDetector, HistogramDetector

    class Adaptive(_HsvDeltaScore, AdaptiveDetector):
        pass

    class Content(_HsvDeltaScore, ContentDetector):
        pass

    cls, params = {
        "adaptive": (Adaptive, cfg.adaptive),
        "content": (Content, cfg.content),
        "histogram": (HistogramDetector, cfg.histogram),
    }[cfg.detector]
    kwargs = {"min_scene_len": cfg.min_scene_frames, **params}
    return cls(**kwargs)


class GrayReservoir:
    """Luma thumbnails for pre-cut frame filters, evenly spaced within each shot, bounded.

    Frames are offered at a base stride (about 4 per second, so a 2 s shot still gets 8);
    when a shot holds more than twice its budget (`per_minute` per started minute, at least
    8) every other thumbnail is dropped and the stride doubles, leaving between one and two
    budgets' worth. Memory stays at a few dozen thumbnails per minute of footage whatever
    the source's length, and no second decode of the clip is needed later (the
    static-overlay filter reads these).
    """

    def __init__(self, fps: float, per_minute: int):
        self.base = max(1, round(fps / 4))
        self.fps = fps or 25.0
        self.per_minute = max(8, per_minute)
        self.stride = self.base
        self.start = 0  # first frame of the open shot
        self.open: list[tuple[int, np.ndarray]] = []
        self.closed: list[tuple[int, np.ndarray]] = []

    def offer(self, i: int, gray: np.ndarray) -> None:
        """A luma thumbnail of frame i (offered at the base stride, possibly a little late)."""
        if i < self.start:  # arrived after the cut that closed its shot
            self.closed.append((i, gray))
            return
        if i % self.stride:
            return
        self.open.append((i, gray))
        minutes = math.ceil((i - self.start + 1) / (60 * self.fps))
        if len(self.open) > 2 * self.per_minute * max(1, minutes):
            self.open = self.open[::2]
            self.stride *= 2

    def cut(self, frame: int) -> None:
        """A new shot starts at `frame` (cuts arrive a few frames late: move those over)."""
        self.closed += [(i, g) for i, g in self.open if i < frame]
        self.open = [(i, g) for i, g in self.open if i >= frame]
        self.start, self.stride = frame, self.base

    def finish(self) -> list[tuple[int, np.ndarray]]:
        self.closed += self.open
        self.open = []
        return self.closed


def frame_size(probe: Probe, width: int) -> tuple[int, int]:
    w = min(width, probe.width) // 2 * 2
    h = max(2, round(w * probe.height / probe.width / 2) * 2)
    return w, h


def detect_scenes(
    path: str, probe: Probe, cfg: ScenesConfig, given: list[GivenScene] | None = None,
    start_s: float | None = None, end_s: float | None = None, gray: bool = False,
) -> SceneResult:  # fmt: skip
    """Decode once; detect cuts (or use the given scenes); return spans ≤ max_clip_s."""
    from scenedetect.common import FrameTimecode, framerate_to_fraction

    w, h = frame_size(probe, cfg.frame_width)
    fps = probe.fps or 25.0
    # luma thumbnails for pre-cut frame filters come out of the same decode, on a second pipe
    thumbs = GrayReservoir(fps, cfg.gray_per_minute) if gray else None
    reader = FrameReader(
        path,
        w,
        h,
        timeout_s=cfg.timeout_s,
        stall_s=cfg.stall_s,
        threads=cfg.decode_threads,
        fast=cfg.fast_decode,
        gray=(*frame_size(probe, cfg.gray_width), thumbs.base) if thumbs else None,
    )
    detector = make_detector(cfg) if cfg.detector != "none" and not given else None
    rate = framerate_to_fraction(fps)  # once, not per frame (float → Fraction is slow)
    sample_every = max(1, round(fps / 2))  # ~2 samples per second for pre-cut filters
    cuts: list[int] = []
    samples: list[FrameSample] = []
    n = 0
    with _single_threaded_cv2():
        for i, frame in enumerate(reader):
            if detector is not None:
                for tc in detector.process_frame(FrameTimecode(i, rate), frame):
                    cuts.append(tc.frame_num)
                    if thumbs is not None:
                        thumbs.cut(tc.frame_num)
            while reader.gray_frames:
                thumbs.offer(*reader.gray_frames.popleft())
            if i % sample_every == 0:
                # per-row / per-column brightest value: enough for bar detection, 1000× smaller
                # (channel-wise maximum: numpy's reduce over a length-3 last axis is 20× slower)
                m = np.maximum(np.maximum(frame[..., 0], frame[..., 1]), frame[..., 2])
                samples.append(FrameSample(i, 0.0, (m.max(axis=1), m.max(axis=0))))
            n = i + 1
    if detector is not None and hasattr(detector, "post_process"):
        for tc in detector.post_process(FrameTimecode(max(n - 1, 0), rate)) or []:
            cuts.append(tc.frame_num)
    info = reader.info
    raw = info.pts_time[:n]
    if len(raw) < n:  # showinfo lines lost (should not happen): fall back to nominal rate
        raw = raw + [raw[-1] + (k + 1) / fps if raw else k / fps for k in range(n - len(raw))]
    t0 = raw[0] if raw else 0.0
    pts = [t - t0 for t in raw]
    while reader.gray_frames:
        thumbs.offer(*reader.gray_frames.popleft())
    if thumbs is not None:
        samples += [FrameSample(i, 0.0, None, g) for i, g in thumbs.finish() if i < n]
        samples.sort(key=lambda s: s.frame_index)
    for s in samples:
        s.pts_s = pts[s.frame_index]
    keyframes = [i for i, k in enumerate(info.is_key[:n]) if k]
    cuts = sorted({c for c in cuts if 0 < c < n})
    lo = _frame_at(pts, start_s) if start_s is not None else 0
    hi = _frame_at(pts, end_s) if end_s is not None else n
    if given:
        spans = _given_spans(pts, given, lo, hi)
    else:
        bounds = [lo] + [c for c in cuts if lo < c < hi] + [hi]
        spans = [_span(pts, a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    out: list[Span] = []
    for sp in spans:
        out.extend(split_long(pts, sp, cfg.max_clip_s))
    return SceneResult(out, cuts, pts, keyframes, samples)


@contextlib.contextmanager
def _single_threaded_cv2():
    """OpenCV's thread pool on 256-px frames costs more than it saves: BGR→HSV takes
    0.10 CPU-ms with 2 threads against 0.06 with one, and each source already has its own
    core. Restored afterwards: other stages in the same worker may want the threads."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _end_time(pts: list[float], end_frame: int) -> float:
    if end_frame < len(pts):
        return pts[end_frame]
    if len(pts) >= 2:  # after the last frame: its start plus the previous frame's duration
        return pts[-1] + (pts[-1] - pts[-2])
    return pts[-1] if pts else 0.0


def _span(pts: list[float], a: int, b: int, given: GivenScene | None = None) -> Span:
    return Span(a, b, pts[a], _end_time(pts, b), given)


def _frame_at(pts: list[float], t: float) -> int:
    """First frame whose timestamp is at or after t (half a frame of slack for rounding)."""
    arr = np.asarray(pts)
    if len(arr) < 2:
        return 0
    slack = 0.5 * float(np.min(np.diff(arr))) if len(arr) > 1 else 0.0
    return int(np.searchsorted(arr, t - slack, side="left"))


def _given_spans(pts: list[float], given: list[GivenScene], lo: int, hi: int) -> list[Span]:
    spans = []
    for g in given:
        a = max(lo, _frame_at(pts, g.start_s))
        b = hi if g.end_s is None else min(hi, _frame_at(pts, g.end_s))
        spans.append(_span(pts, a, max(a, b), g))
    return spans


def split_long(pts: list[float], sp: Span, max_s: float) -> list[Span]:
    """Split a span longer than max_s into equal pieces, each at most max_s."""
    dur = sp.end_s - sp.start_s
    if dur <= max_s or sp.end_frame - sp.start_frame < 2:
        return [sp]
    pieces = math.ceil(dur / max_s - 1e-9)
    bounds = [sp.start_frame]
    for k in range(1, pieces):
        bounds.append(max(bounds[-1] + 1, _frame_at(pts, sp.start_s + dur * k / pieces)))
    bounds.append(sp.end_frame)
    return [_span(pts, a, b, sp.given) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
