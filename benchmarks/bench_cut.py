"""Stream-copy cuts: hdvg's packet remux against ffmpeg's own stream copy of the same spans.

    python benchmarks/bench_cut.py [--shots 20] [--shot-s 6] [--preset veryfast] [--repeats 3]
        [--workdir bench_out/cut]

Makes one 1280x720 H.264 source of `--shots` shots with an IDR at each cut (x264
`--preset`: veryfast has B-frames, ultrafast none; cached in --workdir), detects its
scenes, plans the cuts, then in every repeat times

  floor:  `ffmpeg -ss S -i X -t D -c copy` of every copy plan, 16 outputs per process
          (the cut hdvg ran before: one process per 16 copies; with B-frames its clips held
          frames of the neighbouring shots)
  hdvg:   `hdvg.cut.remux_clips` of the same plans (two demux passes over the file, every
          clip written by PyAV, exact frames)

and prints the seconds and hdvg / floor as JSON. Frames per clip are checked against the
plans (hdvg's must match; the floor's mismatches are counted, not fixed).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402

from hdvg.config import CutConfig, ScenesConfig  # noqa: E402
from hdvg.cut import plan_cut, remux_clips  # noqa: E402
from hdvg.ffmpeg import ffmpeg_exe  # noqa: E402
from hdvg.media import VideoSpec, make_video  # noqa: E402
from hdvg.probe import probe  # noqa: E402
from hdvg.scenes import detect_scenes  # noqa: E402


def frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as c:
        return sum(1 for p in c.demux(video=0) if p.size)


def ffmpeg_copies(src: Path, plans, out_dir: Path) -> list[bytes]:
    outs = []
    for i in range(0, len(plans), 16):
        batch = plans[i : i + 16]
        args = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y"]
        for p in batch:
            args += ["-ss", f"{p.start_s + 0.01:.6f}", "-i", str(src)]
        for k, p in enumerate(batch):
            o = out_dir / f"copy{i + k}.mp4"
            outs.append(o)
            args += ["-map", f"{k}:v:0", "-t", f"{p.end_s - p.start_s - 0.02:.6f}", "-c", "copy",
                     "-avoid_negative_ts", "make_zero", "-movflags", "+faststart", str(o)]  # fmt: skip
        subprocess.run(args, check=True)
    return [o.read_bytes() for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--shot-s", type=float, default=6.0)
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="bench_out/cut")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"src_{a.shots}x{a.shot_s:g}_{a.preset}.mp4"
    if not src.exists():
        make_video(src, VideoSpec(1280, 720, 25, (a.shot_s,) * a.shots, preset=a.preset))
    pr = probe(src)
    res = detect_scenes(str(src), pr, ScenesConfig())
    cfg = CutConfig()
    plans = [p for p in (plan_cut(sp, res, cfg, pr) for sp in res.spans) if p.method == "copy"]
    want = [p.end_frame - p.start_frame for p in plans]
    rows = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        floor = ffmpeg_copies(src, plans, work)
        t_floor = time.perf_counter() - t
        t = time.perf_counter()
        ours = remux_clips(str(src), plans, res, cfg, str(work / "tmp"))
        t_ours = time.perf_counter() - t
        assert all(o is not None for o in ours), "a copy plan fell back"
        assert [frames(o) for o in ours] == want
        wrong = sum(frames(f) != w for f, w in zip(floor, want, strict=True))
        rows.append({"floor_s": round(t_floor, 4), "hdvg_s": round(t_ours, 4),
                     "ratio": round(t_ours / t_floor, 3), "floor_clips_wrong": wrong})  # fmt: skip
    result = {
        "source": {"path": str(src), "mb": round(src.stat().st_size / 1e6, 1),
                   "shots": a.shots, "preset": a.preset},
        "copies": len(plans), "rows": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
