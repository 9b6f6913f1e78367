"""Typed records that flow through the pipeline and become manifest rows.

Per-sample failures are data: a `Clip` or `SourceRecord` carries `status` and a stable
`reason` code; nothing is returned as an error tuple or dropped silently.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

# Stable reason codes. Stages may add their own; these are the ones the core emits.
REASONS = {
    # sources
    "empty": "zero-byte input",
    "not_found": "local path or object does not exist",
    "not_a_file": "local path is a directory, FIFO or device, not a regular file",
    "not_video": "no decodable video stream (HTML page, audio-only, random bytes)",
    "decode_error": "the video stream could not be decoded",
    "bad_header": "header declares an impossible size, rate or duration",
    "scheme_not_allowed": "URL scheme not in download.allowed_schemes",
    "host_not_allowed": "host resolves to a private/loopback/link-local address, or is not allowed",
    "too_large": "download exceeded download.max_bytes",
    "http_error": "HTTP error status",
    "network_error": "connection failed after retries",
    "timeout": "an external tool or the network timed out",
    "bad_path": "path escapes its folder or has an invalid name",
    "no_scenes": "decoded, but too few frames to form a clip",
    "truncated": "the stream ends well before the duration its container declares",
    "worker_lost": "its worker process died on every attempt (ray.max_task_retries + 1)",
    # download taxonomy (HTTP statuses and yt-dlp messages, hdvg.download.classify_text)
    "unavailable": "the video does not exist or is not available (yt-dlp)",
    "removed": "taken down: removed by uploader, terminated account, copyright, HTTP 410",
    "private": "private video",
    "login_required": "needs a signed-in session or cookies (HTTP 401, members-only, age gate)",
    "geo_blocked": "not available from this location (HTTP 451, geo restriction)",
    "rate_limited": "the host throttled us (HTTP 429) after retries",
    "bot_check": "the host asks for a captcha / 'confirm you are not a bot'",
    "forbidden": "HTTP 403: access refused (expired link, hotlink or bot protection)",
    "no_format": "no format at download.ytdlp.min_height or above",
    "other": "yt-dlp failed for a reason not classified above (see error)",
    # clips
    "too_short": "clip shorter than filters.duration.min_s",
    "too_long": "clip longer than filters.duration.max_s",
    "resolution": "short side below filters.resolution.min_short_side",
    "aspect": "display aspect outside filters.aspect target ± tolerance",
    "letterbox": "black bars: content is not widescreen",
    "cut_error": "ffmpeg failed to cut the clip",
    # model stages (hdvg/stages/models)
    "watermark": "static overlay (logo, channel mark, burned-in text) or learned watermark head",
    "low_motion": "optical flow below clip_stages.motion.min_motion (a static clip)",
    "high_motion": "optical flow above clip_stages.motion.max_motion (shake, flashes)",
    "text": "on-screen text covers more than clip_stages.text_area.max_text_area",
    "low_aesthetic": "aesthetic score below clip_stages.aesthetic.min_score",
    "low_clip_score": "text-clip similarity below clip_stages.clip_score.min_score",
}


def canonical_url(url: str) -> str:
    """One spelling per local file: a path (relative ones from the working directory) or a
    ``file://`` URL becomes the absolute, normalized path; other URLs are left as they are."""
    if "://" not in url:
        return os.path.normpath(os.path.abspath(os.path.expanduser(url)))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        return os.path.normpath(urllib.parse.unquote(parts.path))
    return url


def source_id_for(url: str) -> str:
    """Stable id of a source: the same URL gives the same id (and clip keys) on every run,
    and so do the spellings of one local file (``/x/a.mp4``, ``/x/./a.mp4``,
    ``file:///x/a.mp4``), which an input list thus holds once."""
    return hashlib.sha256(canonical_url(url).encode()).hexdigest()[:16]


def clip_key(source_id: str, index: int) -> str:
    return f"{source_id}_{index:04d}"


@dataclass
class GivenScene:
    """A scene fixed by the input (HD-VG-130M metadata) instead of our detector."""

    start_s: float
    end_s: float | None  # None: to the end of the span
    clip_id: str | None = None
    caption: str | None = None
    start_frame: int | None = None
    end_frame: int | None = None


@dataclass
class SourceTask:
    """One line of the input list."""

    order: int
    url: str
    source_id: str
    input_id: str | None = None
    input_caption: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    given_scenes: list[GivenScene] | None = None


@dataclass
class Probe:
    container: str
    codec: str
    width: int  # display width: after rotation and sample aspect ratio
    height: int
    coded_width: int
    coded_height: int
    rotation: int
    sar: float
    dar: float
    fps: float  # average frame rate (frames / span of timestamps); exact for VFR after decode
    vfr: bool
    duration_s: float
    start_time_s: float
    bitrate: int | None
    has_audio: bool
    pix_fmt: str | None = None


@dataclass
class FrameSample:
    """A small decoded frame kept from the scene-detection pass (for cheap pre-cut filters)."""

    frame_index: int
    pts_s: float
    image: Any  # (row profile, column profile): brightest value per row / column, or None
    gray: Any = None  # (H, W) uint8 luma thumbnail, for pre-cut frame filters (static overlay)


@dataclass
class Decision:
    """One threshold check: the score, what it was held against, and the outcome."""

    stage: str
    column: str
    score: float | None
    op: str  # ">=" or "<="
    threshold: float
    passed: bool
    reason: str


@dataclass
class Clip:
    clip_id: str
    source_id: str
    source_url: str
    clip_index: int
    start_s: float  # seconds from the source's first frame
    end_s: float
    start_frame: int  # first frame of the clip (index in the decoded source)
    end_frame: int  # one past the last frame (exclusive)
    duration_s: float
    width: int
    height: int
    fps: float
    codec: str | None = None
    cut_method: str | None = None  # "copy" | "reencode"
    status: str = "accepted"  # accepted | rejected | failed (| removed, by takedown)
    reason: str | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    caption: str | None = None
    caption_model: str | None = None
    source_clip_id: str | None = None
    source_caption: str | None = None
    shard: str | None = None
    tar_offset: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    data: bytes | None = field(default=None, repr=False)  # the mp4, once cut
    # more members of the clip's sample, written as `{key}.{name}` (e.g. "latents.npy")
    extras: dict[str, bytes] = field(default_factory=dict, repr=False)
    samples: list[FrameSample] = field(default_factory=list, repr=False)
    frames: Any = field(default=None, repr=False)  # hdvg.frames.Frames, frame pool → actor only

    @property
    def alive(self) -> bool:
        return self.status == "accepted"

    def decide(self, d: Decision) -> None:
        self.decisions.append(d)
        if not d.passed:
            self.reasons.append(d.reason)
            if self.status == "accepted":
                self.status, self.reason = "rejected", d.reason

    def fail(self, reason: str, error: str) -> None:
        self.status, self.reason, self.error = "failed", reason, error[:500]
        self.reasons.append(reason)
        self.data = None
        self.extras = {}


@dataclass
class SourceRecord:
    source_id: str
    source_url: str
    order: int
    status: str = "downloaded"  # downloaded | failed
    reason: str | None = None
    error: str | None = None
    input_id: str | None = None
    input_caption: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    probe: Probe | None = None
    n_frames: int | None = None
    n_scenes: int = 0
    n_clips: int = 0
    n_accepted: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def fail(self, reason: str, error: str) -> None:
        self.status, self.reason, self.error = "failed", reason, error[:500]


@dataclass
class SourceResult:
    """Everything one source produced; the unit that moves between Ray stages."""

    source: SourceRecord
    clips: list[Clip] = field(default_factory=list)
