"""Cut one clip out of a source: a stream copy when a keyframe lies at the scene start
(within `cut.keyframe_tolerance_s`) and the packets from it are exactly the scene's
frames, re-encode with libx264 otherwise, or always re-encode to a normalized codec
/ fps / size. Clips come out upright with square pixels and even sizes (rotated,
anamorphic and odd-sized sources are re-encoded). Output is bit-exact: same input and
config give the same bytes.

Stream copies are packet remuxes (PyAV), not ``ffmpeg -ss -t -c copy``: ffmpeg's copy
starts at whatever keyframe its seek finds (one GOP early in Matroska) and ends by
timestamp in decode order, so with B-frames a copied clip held frames of the neighbouring
shots. Here a clip is the packets, in decode order, from its first frame's keyframe to the
packet of the frame after its last; the copy is made only when those packets' timestamps
are exactly the clip's frames and the keyframe is a clean random-access point
(:func:`hdvg.frames._clean_keyframe`): every packet's references then lie among them, so
they decode to exactly the frames a full decode shows for the span. Anything else (a
B-frame of the clip decoded after the next frame) is re-encoded."""

from __future__ import annotations

import bisect
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import ffmpeg
from .config import CutConfig
from .records import Probe
from .scenes import SceneResult, Span

BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
            "-map_chapters", "-1"]  # fmt: skip
# containers whose demuxer seeks to the keyframe at or before the time asked (an index);
# others (MPEG-TS / PS, FLV, raw streams) may land on the keyframe after it
EXACT_SEEK = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


@dataclass
class CutPlan:
    method: str  # "copy" | "reencode"
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    filters: tuple[str, ...] = ()  # re-encode: make the picture upright, square-pixel, even
    seek_s: float | None = None  # re-encode: input seek point when the container's is inexact
    span: Span | None = None  # the scene it cuts (a copy that cannot be exact is re-planned)


def normalizing_filters(probe: Probe | None) -> list[str]:
    """Filters that make a clip of this source a plain picture: square pixels and even
    sizes (libx264's 4:2:0 needs them). Rotation needs none: ffmpeg turns the decoded frames
    upright itself and a re-encode writes no display matrix. Non-empty (or rotated): the
    clip cannot be a stream copy."""
    if probe is None:
        return []
    out = []
    if abs(probe.sar - 1.0) > 1e-3:
        out += ["scale=trunc(iw*sar/2)*2:trunc(ih/2)*2", "setsar=1"]
    elif probe.coded_width % 2 or probe.coded_height % 2:
        out += ["crop=trunc(iw/2)*2:trunc(ih/2)*2"]
    return out


def plan_cut(span: Span, scenes: SceneResult, cfg: CutConfig, probe: Probe | None = None,
             copy: bool = True) -> CutPlan:  # fmt: skip
    """Copy if the first keyframe at/after the span start is within tolerance (the clip then
    starts at that keyframe, still inside the scene); otherwise re-encode exactly. Whether the
    copy can be exact (B-frames can tie a clip's last frames to the next one) the packets
    decide (:func:`remux_clips`)."""
    filters = normalizing_filters(probe)
    upright = probe is None or not probe.rotation
    tol = cfg.keyframe_tolerance_s + 1e-6
    if copy and upright and not filters and cfg.mode == "auto" and cfg.fps is None \
            and cfg.short_side is None:  # fmt: skip
        keys, pts = scenes.keyframes, scenes.pts
        k = bisect.bisect_left(keys, span.start_frame)
        if k < len(keys) and keys[k] < span.end_frame - 1 and pts[keys[k]] - span.start_s <= tol:
            kf = keys[k]
            return CutPlan("copy", kf, span.end_frame, pts[kf], span.end_s, span=span)
    seek = None
    if probe is not None and probe.container not in EXACT_SEEK:
        # ask for the keyframe before the one at/before the start: landing on the keyframe
        # after the time asked is then still at or before the clip's first frame
        k = bisect.bisect_right(scenes.keyframes, span.start_frame) - 1
        seek = scenes.pts[scenes.keyframes[k - 1]] if k >= 1 else 0.0
    return CutPlan("reencode", span.start_frame, span.end_frame, span.start_s, span.end_s,
                   tuple(filters), seek, span)  # fmt: skip


def _half_frame(scenes: SceneResult, frame: int) -> float:
    pts = scenes.pts
    if 0 < frame < len(pts):
        return 0.5 * (pts[frame] - pts[frame - 1])
    if len(pts) > 1:
        return 0.5 * (pts[1] - pts[0])
    return 0.01


def _args(src: str, plan: CutPlan, scenes: SceneResult, cfg: CutConfig) -> tuple[list, list]:
    """(input args, output args without the file name) of one clip's re-encode."""
    # -ss before -i is relative to the file's start time (ffmpeg adds start_time), so our
    # first-frame-relative times work for streams that start late; frames before the seek
    # point are decoded and dropped (accurate seek), so the clip starts at start_s exactly
    eps = _half_frame(scenes, plan.start_frame)
    start = max(plan.start_s - eps / 2, 0)
    if plan.seek_s is None:
        inp, skip = ["-ss", f"{start:.6f}", "-i", src], []
    else:  # inexact seeking: seek well before, then drop frames up to the start on output
        inp = (["-ss", f"{plan.seek_s:.6f}"] if plan.seek_s > 0 else []) + ["-i", src]
        skip = ["-ss", f"{max(start - plan.seek_s, 0):.6f}"] if start > plan.seek_s else []
    vf = list(plan.filters)
    if cfg.fps:
        vf.append(f"fps={cfg.fps}")
    if cfg.short_side:
        s = cfg.short_side
        vf.append(f"scale='if(gt(iw,ih),-2,{s})':'if(gt(iw,ih),{s},-2)'")
    # audio (cut.keep_audio, when the source has any): AAC, cut to the clip's duration
    audio = ["-c:a", "aac", "-t", f"{plan.end_s - plan.start_s:.6f}"] if cfg.keep_audio else ["-an"]
    out = [*skip, *audio, "-frames:v", str(expected_frames(plan, cfg))]
    out += ["-vf", ",".join(vf)] if vf else []
    out += [] if cfg.fps else ["-fps_mode", "passthrough"]  # every source frame, none added
    out += ["-c:v", cfg.codec, "-preset", cfg.preset, "-crf", str(cfg.crf),
            "-pix_fmt", "yuv420p", "-threads", str(cfg.threads)]  # fmt: skip
    return inp, [*out, *BITEXACT, "-movflags", "+faststart"]


def expected_frames(plan: CutPlan, cfg: CutConfig) -> int:
    """Frames the clip must hold: the span's, or its length at the normalized frame rate."""
    if plan.method == "reencode" and cfg.fps:
        return max(1, round((plan.end_s - plan.start_s) * cfg.fps))
    return plan.end_frame - plan.start_frame


def cut_clip(src: str, plan: CutPlan, scenes: SceneResult, cfg: CutConfig, tmp_dir: str) -> bytes:
    """The clip's bytes (written under tmp_dir meanwhile). Raises `FFmpegError` if the cut
    fails, or for a copy plan whose packets are not exactly its frames."""
    if plan.method == "copy":
        data = remux_clips(src, [plan], scenes, cfg, tmp_dir)[0]
        if data is None:
            raise ffmpeg.FFmpegError("cut_error", "the stream cannot be copied exactly here")
        return data
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    fd, out = tempfile.mkstemp(suffix=".mp4", dir=tmp_dir)
    os.close(fd)
    try:
        inp, oargs = _args(src, plan, scenes, cfg)
        maps = ["-map", "0:v:0", *(["-map", "0:a:0?"] if cfg.keep_audio else [])]
        ffmpeg.run([*inp, *maps, *oargs, "-y", out], cfg.timeout_s, what="cut")
        data = Path(out).read_bytes()
        if not data:
            raise ffmpeg.FFmpegError("cut_error", "ffmpeg wrote an empty clip")
        return data
    finally:
        Path(out).unlink(missing_ok=True)


@dataclass
class _Range:
    plan: int  # index into the plans
    a: int  # first packet (decode order, among the video stream's non-empty packets)
    b: int  # one past the last
    t0: int  # first frame's timestamp (stream time base): becomes 0
    dts: list[int]  # the packets' decode timestamps, made up where the container has none
    start_t: float  # seconds, absolute: the window audio packets are taken from
    end_t: float


def remux_clips(src: str, plans: list[CutPlan], scenes: SceneResult, cfg: CutConfig,
                tmp_dir: str) -> list[bytes | None]:  # fmt: skip
    """The copy plans' clips, remuxed from the source's packets in two demux passes (the
    first reads packet headers to check every plan, the second writes all of them): None
    for a plan whose packets are not exactly its frames (or whose codec an mp4 cannot hold),
    which the caller re-encodes."""
    import av

    out: list[bytes | None] = [None] * len(plans)
    if not any(p.method == "copy" for p in plans):  # no pass over the file for nothing
        return out
    try:
        ranges = _ranges(src, plans, scenes)
    except av.error.FFmpegError:
        return out
    if not ranges:
        return out
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    paths: dict[int, str] = {}
    try:
        with av.open(src) as c:
            vs = c.streams.video[0]
            streams = [vs]
            aus = c.streams.audio[0] if cfg.keep_audio and c.streams.audio else None
            if aus is not None:
                streams.append(aus)
            writers: dict[int, tuple] = {}  # range index -> (container, video, audio)
            failed: set[int] = set()
            done: set[int] = set()
            i = 0  # video packet index
            last_audio_t = float("-inf")

            def writer(r: int):
                if r not in writers:
                    fd, path = tempfile.mkstemp(suffix=".mp4", dir=tmp_dir)
                    os.close(fd)
                    paths[r] = path
                    o = av.open(path, "w", format="mp4",
                                options={"movflags": "+faststart", "fflags": "+bitexact"})  # fmt: skip
                    try:
                        ov = o.add_stream_from_template(vs)
                        oa = o.add_stream_from_template(aus) if aus is not None else None
                    except (av.error.FFmpegError, ValueError):
                        o.close()
                        raise
                    writers[r] = (o, ov, oa)
                return writers[r]

            def put(r: int, packet, stream_out: int) -> None:
                if r in failed or r in done:
                    return
                try:
                    w = writer(r)
                    packet.stream = w[stream_out]
                    w[0].mux(packet)
                except (av.error.FFmpegError, ValueError):
                    failed.add(r)

            def close(r: int) -> None:
                done.add(r)
                if r in writers:
                    try:
                        writers.pop(r)[0].close()
                    except av.error.FFmpegError:
                        failed.add(r)

            k = 0  # the range whose video packets come next
            for packet in c.demux(*streams):
                if packet.stream is vs:
                    if not packet.size:
                        continue
                    while k < len(ranges) and i >= ranges[k].b:
                        if aus is None or last_audio_t >= ranges[k].end_t:
                            close(k)
                        k += 1
                    if k < len(ranges) and ranges[k].a <= i:
                        rg = ranges[k]
                        packet.dts = rg.dts[i - rg.a] - rg.t0
                        packet.pts -= rg.t0
                        put(k, packet, 1)
                    i += 1
                elif packet.pts is not None and packet.size:
                    t = float(packet.pts * packet.time_base)
                    last_audio_t = max(last_audio_t, t)
                    for r, rg in enumerate(ranges):
                        if rg.start_t <= t < rg.end_t:
                            shift = round(rg.start_t / packet.time_base)
                            packet.pts -= shift
                            packet.dts = packet.pts if packet.dts is None else packet.dts - shift
                            put(r, packet, 2)
                            break
                    for r, rg in enumerate(ranges[:k]):  # video done, audio now past the end
                        if r not in done and t >= rg.end_t:
                            close(r)
            for r in range(len(ranges)):
                close(r)
        for r, rg in enumerate(ranges):
            if r in failed or r not in paths:
                continue
            data = Path(paths[r]).read_bytes()
            out[rg.plan] = data or None
    except av.error.FFmpegError:
        return [None] * len(plans)
    finally:
        for path in paths.values():
            Path(path).unlink(missing_ok=True)
    return out


def _ranges(src: str, plans: list[CutPlan], scenes: SceneResult) -> list[_Range]:
    """The packet range of each copy plan whose packets are exactly its frames (first
    demux pass: headers only, no decoding), in file order."""
    import av

    from .frames import _clean_keyframe

    with av.open(src) as c:
        vs = c.streams.video[0]
        codec = vs.codec_context.codec.canonical_name  # av1, not libdav1d
        meta = []  # (pts, dts, keyframe, clean)
        for p in c.demux(vs):
            if not p.size:
                continue
            if p.pts is None or p.is_discard:  # frames found by timestamp only
                return []
            key = p.is_keyframe
            meta.append((p.pts, p.dts, key, key and _clean_keyframe(p, codec)))
        tb = vs.time_base
    spts = sorted(m[0] for m in meta)
    n = len(spts)
    if n != scenes.n_frames or len(set(spts)) != n:
        return []
    tol = min(2e-3, 0.25 * (scenes.pts[-1] / (n - 1))) if n > 1 else 2e-3
    if any(abs(float((p - spts[0]) * tb) - t) > tol for p, t in zip(spts, scenes.pts, strict=True)):
        return []  # the scene decode saw other frames than these packets
    at = {m[0]: j for j, m in enumerate(meta)}
    out = []
    for q, plan in enumerate(plans):
        if plan.method != "copy":
            continue
        kf, e = plan.start_frame, plan.end_frame
        a = at[spts[kf]]
        b = at[spts[e]] if e < n else len(meta)
        if not meta[a][2] or (a > 0 and not meta[a][3]) or b <= a:
            continue
        if sorted(m[0] for m in meta[a:b]) != spts[kf:e]:
            continue  # leading pictures of the next GOP, or frames of another
        dts = [m[1] for m in meta[a:b]]
        if any(d is None for d in dts):  # Matroska stores none: the reorder delay's
            rank = {p: r for r, p in enumerate(spts[kf:e])}
            delay = max(0, max(j - rank[m[0]] for j, m in enumerate(meta[a:b])))
            step = spts[kf + 1] - spts[kf] if e - kf > 1 else 1
            dts = [spts[kf + j - delay] if j >= delay else spts[kf] - (delay - j) * step
                   for j in range(b - a)]  # fmt: skip
        end_t = float(spts[e] * tb) if e < n else float("inf")
        out.append(_Range(q, a, b, spts[kf], dts, float(spts[kf] * tb), end_t))
    return sorted(out, key=lambda r: r.a)
