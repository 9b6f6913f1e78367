"""Cut one clip out of a source with ffmpeg: stream copy when a keyframe lies at the
scene start (within `cut.keyframe_tolerance_s`), re-encode with libx264 otherwise, or
always re-encode to a normalized codec / fps / size. Output is bit-exact: same input and
config give the same bytes."""

from __future__ import annotations

import bisect
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import ffmpeg
from .config import CutConfig
from .scenes import SceneResult, Span

BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
            "-map_chapters", "-1"]  # fmt: skip


@dataclass
class CutPlan:
    method: str  # "copy" | "reencode"
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float


def plan_cut(span: Span, scenes: SceneResult, cfg: CutConfig) -> CutPlan:
    """Copy if the first keyframe at/after the span start is within tolerance (the clip then
    starts at that keyframe, still inside the scene); otherwise re-encode exactly."""
    if cfg.mode == "auto" and cfg.fps is None and cfg.short_side is None:
        k = bisect.bisect_left(scenes.keyframes, span.start_frame)
        if k < len(scenes.keyframes):
            kf = scenes.keyframes[k]
            kt = scenes.pts[kf]
            if kf < span.end_frame - 1 and kt - span.start_s <= cfg.keyframe_tolerance_s + 1e-6:
                return CutPlan("copy", kf, span.end_frame, kt, span.end_s)
    return CutPlan("reencode", span.start_frame, span.end_frame, span.start_s, span.end_s)


def _half_frame(scenes: SceneResult, frame: int) -> float:
    pts = scenes.pts
    if 0 < frame < len(pts):
        return 0.5 * (pts[frame] - pts[frame - 1])
    if len(pts) > 1:
        return 0.5 * (pts[1] - pts[0])
    return 0.01


def _args(src: str, plan: CutPlan, scenes: SceneResult, cfg: CutConfig) -> tuple[list, list]:
    """(input args, output args without the file name) of one clip's cut."""
    # -ss before -i is relative to the file's start time (ffmpeg adds start_time), so our
    # first-frame-relative times work for streams that start late.
    eps = _half_frame(scenes, plan.start_frame)
    nframes = plan.end_frame - plan.start_frame
    audio = [] if cfg.keep_audio else ["-an"]
    if plan.method == "copy":
        # seek lands on the keyframe at/before ss; end just before the next shot
        dur = plan.end_s - plan.start_s - _half_frame(scenes, plan.end_frame)
        inp = ["-ss", f"{plan.start_s + eps / 2:.6f}", "-i", src]
        out = [*audio, "-t", f"{max(dur, 0.001):.6f}", "-c", "copy", "-avoid_negative_ts",
               "make_zero"]  # fmt: skip
    else:
        vf = []
        if cfg.fps:
            vf.append(f"fps={cfg.fps}")
            nframes = max(1, round((plan.end_s - plan.start_s) * cfg.fps))
        if cfg.short_side:
            s = cfg.short_side
            vf.append(f"scale='if(gt(iw,ih),-2,{s})':'if(gt(iw,ih),{s},-2)'")
        inp = ["-ss", f"{max(plan.start_s - eps / 2, 0):.6f}", "-i", src]
        out = [*audio, "-frames:v", str(nframes)]
        out += ["-vf", ",".join(vf)] if vf else ["-fps_mode", "passthrough"]
        out += ["-c:v", cfg.codec, "-preset", cfg.preset, "-crf", str(cfg.crf),
                "-pix_fmt", "yuv420p", "-threads", str(cfg.threads)]  # fmt: skip
    return inp, [*out, *BITEXACT, "-movflags", "+faststart"]


def cut_clip(src: str, plan: CutPlan, scenes: SceneResult, cfg: CutConfig, tmp_dir: str) -> bytes:
    """Write the clip to a temporary file under tmp_dir and return its bytes."""
    return cut_clips(src, [plan], scenes, cfg, tmp_dir)[0]


def cut_clips(src: str, plans: list[CutPlan], scenes: SceneResult, cfg: CutConfig,
              tmp_dir: str) -> list[bytes]:  # fmt: skip
    """Several clips of one source with one ffmpeg process (one input and one output per
    clip, each output exactly as `cut_clip` writes it): a source's stream copies cost one
    process start instead of one each. Raises `FFmpegError` if any clip fails; the caller
    then cuts them one by one to find which."""
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    outs = []
    try:
        args: list[str] = []
        outputs: list[str] = []
        for k, plan in enumerate(plans):
            fd, out = tempfile.mkstemp(suffix=".mp4", dir=tmp_dir)
            os.close(fd)
            outs.append(out)
            inp, oargs = _args(src, plan, scenes, cfg)
            args += inp
            outputs += ["-map", f"{k}:v:0", *oargs, "-y", out]
        ffmpeg.run([*args, *outputs], cfg.timeout_s * max(1, len(plans) // 8), what="cut")
        data = [Path(o).read_bytes() for o in outs]
        if not all(data):
            raise ffmpeg.FFmpegError("cut_error", "ffmpeg wrote an empty clip")
        return data
    finally:
        for o in outs:
            Path(o).unlink(missing_ok=True)
