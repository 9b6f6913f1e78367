"""Frame decoding for the model stages (``hdvg.frames.decode_frames``) against a full decode.

    python benchmarks/bench_frames.py [--seconds 10] [--gops 2 10] [--repeats 5] [--json OUT]

Clips: 1280x720 25 fps H.264 made here (x264 veryfast, 3 B-frames, closed GOPs of ``--gops``
seconds, scene cuts off so the GOPs are regular), the kind of clip a stream copy of web video
gives. For each clip, CPU seconds per clip (single-threaded decoders, the frame pool's
setting) of: a full decode of every frame (the floor: what any stage that reads the whole clip
pays), ``decode_frames`` with the caption-only spec (the middle frame) and with the default
spec (8 frames spread over the clip, each with its successor, as motion / aesthetics /
CLIP use). Ratios are against the floor measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hdvg import frames  # noqa: E402
from hdvg.ffmpeg import ffmpeg_exe  # noqa: E402


def make_clip(path: Path, seconds: float, gop_s: float) -> None:
    src = "testsrc2=size=1280x720:rate=25,noise=alls=6:allf=t"
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", src]
    cmd += ["-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-bf", "3"]
    cmd += ["-g", str(round(25 * gop_s)), "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True, timeout=300)


def full_decode(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data)) as c:
        c.streams.video[0].codec_context.thread_count = 1
        return sum(1 for _ in c.decode(video=0))


def cpu_per_call(fn, repeats: int) -> float:
    fn()  # warm: imports, first allocations
    t0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - t0) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--gops", type=float, nargs="+", default=[2.0, 10.0], help="GOP seconds")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gop in args.gops:
            clip = Path(tmp) / f"gop{gop}.mp4"
            make_clip(clip, args.seconds, gop)
            data = clip.read_bytes()
            floor = cpu_per_call(lambda d=data: full_decode(d), args.repeats)
            row = {"gop_s": gop, "clip_s": args.seconds, "full_decode_ms": round(floor * 1e3, 1)}
            for name, spec in (("middle", frames.MIDDLE_ONLY), ("default", frames.DEFAULT_SPEC)):
                t = cpu_per_call(lambda d=data, s=spec: frames.decode_frames(d, s, 1), args.repeats)
                row[f"{name}_ms"] = round(t * 1e3, 1)
                row[f"{name}_vs_full"] = round(t / floor, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "benchmark": "frames",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.python_version()}",
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
