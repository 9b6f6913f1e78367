"""Probe a local video with PyAV: codec, display size after rotation and SAR, DAR, fps
(variable-frame-rate aware), duration, start time, bitrate, audio."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from .config import ProbeConfig
from .records import Probe


class ProbeError(RuntimeError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _f(x) -> float:
    return float(x) if x is not None else 0.0


def _is_iso_bmff(path: str) -> bool:
    """The file starts like an MP4 / MOV: an ``ftyp`` box (or ``moov`` / ``mdat`` / ``free``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")


def probe(path: str | Path, cfg: ProbeConfig | None = None, vfr_packets: int = 240) -> Probe:
    import av

    cfg = cfg or ProbeConfig()

    path = str(path)
    try:
        container = av.open(path, timeout=cfg.timeout_s)
    except av.error.InvalidDataError as e:
        if _is_iso_bmff(path):  # an MP4 / MOV whose index (moov, written last) never came
            raise ProbeError("truncated", f"an MP4 without its index, cut off: {e}") from None
        raise ProbeError("not_video", f"not a media file: {e}") from None
    except (av.error.FFmpegError, OSError) as e:
        raise ProbeError("decode_error", f"cannot open: {e}") from None
    with container:
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):  # png_pipe, jpeg_pipe, webp_pipe, ...
            raise ProbeError("not_video", f"an image ({fmt}), not a video")
        if not container.streams.video:
            raise ProbeError("not_video", "no video stream")
        vs = container.streams.video[0]
        cc = vs.codec_context
        coded_w, coded_h = cc.width, cc.height
        if coded_w <= 0 or coded_h <= 0:
            raise ProbeError("not_video", "video stream has no size")
        if coded_w * coded_h > cfg.max_pixels:
            raise ProbeError("bad_header", f"declared size {coded_w}x{coded_h} is too large")
        sar = vs.sample_aspect_ratio or Fraction(1, 1)
        if sar <= 0:
            sar = Fraction(1, 1)
        tb = vs.time_base or Fraction(1, 1)
        # first packets: timestamps for VFR detection; first frame: rotation
        pts: list[int] = []
        rotation = 0
        try:
            for pkt in container.demux(vs):
                if pkt.pts is not None:
                    pts.append(pkt.pts)
                if len(pts) >= vfr_packets:
                    break
            container.seek(0)
            for frame in container.decode(vs):
                rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                break
            else:
                raise ProbeError("not_video", "video stream has no decodable frame")
        except av.error.FFmpegError as e:
            raise ProbeError("decode_error", f"cannot decode: {e}") from None
        pts.sort()
        deltas = [b - a for a, b in zip(pts, pts[1:], strict=False) if b > a]
        vfr = bool(deltas) and (max(deltas) - min(deltas)) > 0.02 * (sum(deltas) / len(deltas))
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else 0.0
        if deltas and (fps <= 0 or vfr):
            fps = 1.0 / (float(tb) * (sum(deltas) / len(deltas)))
        if vs.duration:
            duration = float(vs.duration * tb)
        elif container.duration:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        start = float(vs.start_time * tb) if vs.start_time is not None else 0.0
        if duration > cfg.max_duration_s or fps > 1000:
            raise ProbeError("bad_header", f"declared duration {duration:.0f}s / fps {fps:.0f}")
        disp_w = round(coded_w * float(sar))
        disp_h = coded_h
        if rotation in (90, 270):
            disp_w, disp_h = disp_h, disp_w
        return Probe(
            container=container.format.name,
            codec=cc.codec.canonical_name,  # av1, not the decoder's name (libdav1d)
            width=int(disp_w),
            height=int(disp_h),
            coded_width=coded_w,
            coded_height=coded_h,
            rotation=rotation,
            sar=float(sar),
            dar=disp_w / disp_h if disp_h else 0.0,
            fps=fps,
            vfr=vfr,
            duration_s=duration,
            start_time_s=start,
            bitrate=container.bit_rate or None,
            has_audio=bool(container.streams.audio),
            pix_fmt=cc.pix_fmt,
        )
