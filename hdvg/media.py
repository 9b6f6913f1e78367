"""Synthetic test and demo media with known ground truth, made with ffmpeg.

`make_video` concatenates visually distinct, moving lavfi sources, so every boundary
between segments is a hard cut at a known frame. Used by the tests, the demo and the
benchmarks; nothing here is faked: these are real H.264 files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import ffmpeg

# Distinct, moving synthetic sources. Each is rendered at the requested size. Content
# moves in all of them so motion-based stages see real motion.
SEGMENT_SOURCES = {
    "testsrc2": "testsrc2=size={w}x{h}:rate={fps}",
    "mandelbrot": "mandelbrot=size={w}x{h}:rate={fps}",
    "life": "life=size={w}x{h}:rate={fps}:mold=10:ratio=0.5:death_color=#202020:life_color=#40c0ff:seed=7",
    "gradients": "gradients=size={w}x{h}:rate={fps}:speed=0.05:seed=3",
    "cellauto": "cellauto=size={w}x{h}:rate={fps}:rule=110:seed=5",
    "smptehd": "smptehdbars=size={w}x{h}:rate={fps},hue=H=2*PI*t/3",
    "plasma": "gradients=size={w}x{h}:rate={fps}:speed=0.2:seed=11:c0=red:c1=blue:type=radial",
}
ORDER = ["testsrc2", "mandelbrot", "gradients", "life", "smptehd", "cellauto", "plasma"]


@dataclass(frozen=True)
class VideoSpec:
    width: int = 1280
    height: int = 720
    fps: float = 25.0
    segments: tuple[float, ...] = (2.0, 3.0, 2.5)  # seconds per shot
    gop: int = 250  # max keyframe interval; x264's scenecut still adds keyframes at cuts
    pad_to: tuple[int, int] | None = None  # letterbox/pillarbox into this canvas
    crf: int = 30
    preset: str = "ultrafast"
    overlay_text: str | None = None  # burned-in static text (a watermark)
    container: str = "mp4"
    keyframes_at_cuts: bool = True  # force an IDR at each cut (as scene-aware encoders do)

    def cut_frames(self) -> list[int]:
        """Frame index where each shot after the first begins."""
        cuts, t = [], 0
        for d in self.segments[:-1]:
            t += round(d * self.fps)
            cuts.append(t)
        return cuts

    @property
    def n_frames(self) -> int:
        return sum(round(d * self.fps) for d in self.segments)


def make_video(path: str | Path, spec: VideoSpec = VideoSpec(), *, timeout_s: float = 300) -> Path:
    path = Path(path)
    w, h = spec.width, spec.height
    inputs: list[str] = []
    chains: list[str] = []
    for i, dur in enumerate(spec.segments):
        src = SEGMENT_SOURCES[ORDER[i % len(ORDER)]].format(w=w, h=h, fps=spec.fps)
        nframes = round(dur * spec.fps)
        inputs += ["-f", "lavfi", "-i", src]
        chains.append(
            f"[{i}:v]trim=end_frame={nframes},setpts=PTS-STARTPTS,format=yuv420p,setsar=1[s{i}]"
        )
    n = len(spec.segments)
    graph = ";".join(chains) + ";" + "".join(f"[s{i}]" for i in range(n)) + f"concat=n={n}:v=1:a=0"
    if spec.pad_to:
        pw, ph = spec.pad_to
        graph += f",pad={pw}:{ph}:(ow-iw)/2:(oh-ih)/2:black"
    if spec.overlay_text:
        graph += (
            f",drawtext=text='{spec.overlay_text}':x=w-tw-24:y=24:fontsize=h/14:"
            "fontcolor=white@0.9:box=1:boxcolor=black@0.4"
        )
    graph += "[v]"
    args = [
        "-y", *inputs, "-filter_complex", graph, "-map", "[v]",
        "-c:v", "libx264", "-preset", spec.preset, "-crf", str(spec.crf),
        "-g", str(spec.gop), "-pix_fmt", "yuv420p", "-r", f"{spec.fps}",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
    ]  # fmt: skip
    if spec.keyframes_at_cuts and spec.cut_frames():
        times = ",".join(f"{f / spec.fps:.6f}" for f in spec.cut_frames())
        args += ["-force_key_frames", times]
    if spec.container == "mp4":
        args += ["-movflags", "+faststart"]
    tmp = path.with_name(path.name + ".part" + path.suffix)  # never leave a half file
    ffmpeg.run([*args, str(tmp)], timeout_s, what="make_video")
    tmp.replace(path)
    return path


def make_vfr_video(path: str | Path, *, width: int = 1280, height: int = 720) -> tuple[Path, float]:
    """Two shots: 3 s at 30 fps then 3 s at 10 fps, stored variable-frame-rate.

    Returns the path and the cut time in seconds (frame index 90).
    """
    path = Path(path)
    graph = (
        "[0:v]trim=end_frame=90,setpts=N/30/TB,format=yuv420p[a];"
        "[1:v]trim=end_frame=30,setpts=N/10/TB,format=yuv420p[b];[a][b]concat=n=2:v=1:a=0[v]"
    )
    args = [
        "-y", "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=30",
        "-f", "lavfi", "-i", f"mandelbrot=size={width}x{height}:rate=10",
        "-filter_complex", graph, "-map", "[v]", "-fps_mode", "vfr", "-video_track_timescale", "90000",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "30",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", str(path),
    ]  # fmt: skip
    ffmpeg.run(args, 300, what="make_vfr_video")
    return path, 3.0


def make_late_start_video(path: str | Path, spec: VideoSpec, offset_s: float = 10.0) -> Path:
    """An MPEG-TS file whose timestamps start `offset_s` (+ the muxer's delay) late."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.mp4")
    make_video(tmp, spec)
    args = ["-y", "-i", str(tmp), "-c", "copy", "-output_ts_offset", str(offset_s),
            "-f", "mpegts", str(path)]  # fmt: skip
    ffmpeg.run(args, 120, what="make_late_start_video")
    tmp.unlink()
    return path


def make_demo_sources(directory: str | Path) -> list[Path]:
    """The README demo: a handful of sources covering accept and each reject reason."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    specs = {
        "hd_1080p.mp4": VideoSpec(1920, 1080, 25, (3.0, 4.0, 3.0)),
        "hd_720p.mp4": VideoSpec(1280, 720, 25, (4.0, 0.6, 3.5)),  # a 0.6 s shot: too_short
        "sd_480p.mp4": VideoSpec(854, 480, 25, (3.0, 3.0)),  # resolution
        "tv_4x3.mp4": VideoSpec(960, 720, 25, (3.0, 3.0)),  # aspect
        "letterboxed.mp4": VideoSpec(
            1280, 536, 25, (3.0, 3.0), pad_to=(1280, 720)
        ),  # 2.39:1 in 16:9
    }
    out = []
    for name, spec in specs.items():
        p = d / name
        if not p.exists():
            make_video(p, spec)
        out.append(p)
    junk = d / "not_a_video.mp4"
    if not junk.exists():
        junk.write_text("<html><body>404 Not Found</body></html>\n")
    out.append(junk)
    return out


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "demo/sources"
    for p in make_demo_sources(target):
        print(p)
