"""Scale benchmark: throughput with 1 and 2 Ray CPUs, driver peak memory against the
number of sources, and per-stage source-minutes per core-hour (for sizing a cluster).

    python benchmarks/bench_scale.py --work /tmp/hdvg-bench [--seconds 20] [--counts 4 8 16]

Each run is a real `hdvg curate pipelines/smoke.yaml` subprocess on an embedded local Ray;
the driver's peak RSS is sampled every 50 ms with psutil (the Ray processes it starts are
reported separately: they hold the object store, not the driver).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hdvg import media  # noqa: E402
from hdvg.media import VideoSpec  # noqa: E402


def make_sources(d: Path, n: int, seconds: float) -> float:
    """n distinct 720p sources of `seconds` each (shots of ~5 s); returns source minutes."""
    d.mkdir(parents=True, exist_ok=True)
    base = d.parent / f"base-{seconds:g}.mp4"
    if not base.exists():
        shots = max(1, round(seconds / 5))
        media.make_video(base, VideoSpec(1280, 720, 25, (seconds / shots,) * shots))
    for i in range(n):  # byte copies under distinct names: distinct sources, same work
        p = d / f"s{i:04d}.mp4"
        if not p.exists():
            shutil.copy(base, p)
    return n * seconds / 60


def run(src: Path, out: Path, cpus: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "hdvg", "curate", str(ROOT / "pipelines" / "smoke.yaml"),
           "--input", str(src), "--output", str(out), "--quiet", "--set", f"ray.num_cpus={cpus}",
           "--set", "ray.object_store_mb=200"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    me = psutil.Process(proc.pid)
    peak_driver = peak_tree = 0
    while proc.poll() is None:
        try:
            rss = me.memory_info().rss
            kids = sum(c.memory_info().rss for c in me.children(recursive=True))
        except psutil.Error:
            break
        peak_driver, peak_tree = max(peak_driver, rss), max(peak_tree, rss + kids)
        time.sleep(0.05)
    if proc.wait() != 0:
        raise SystemExit(f"curate failed: {cmd}")
    summary = json.loads((out / "run.json").read_text())
    return {
        "wall_s": round(time.monotonic() - t0, 1),
        "driver_peak_mb": round(peak_driver / 2**20),
        "tree_peak_mb": round(peak_tree / 2**20),
        "stage_seconds": summary["stage_seconds"],
        "clips": summary["counts"]["clips_by_status"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/hdvg-bench")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each source")
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--throughput-sources", type=int, default=8)
    a = ap.parse_args()
    work = Path(a.work)
    results: dict = {"memory": {}, "throughput": {}}

    n = a.throughput_sources
    minutes = make_sources(work / f"src-{n}", n, a.seconds)
    for cpus in (1, 2):
        r = run(work / f"src-{n}", work / f"out-t{cpus}", cpus)
        r["source_min_per_wall_hour"] = round(minutes / (r["wall_s"] / 3600), 1)
        # per stage: source-minutes one core gets through in an hour of that stage alone
        r["source_min_per_core_hour"] = {
            k: round(minutes / (v / 3600), 0) for k, v in r["stage_seconds"].items() if v > 0
        }
        results["throughput"][f"{cpus}cpu"] = r
        print(json.dumps({f"throughput {cpus} cpu": r}), flush=True)

    for c in a.counts:
        make_sources(work / f"src-{c}", c, a.seconds)
        r = run(work / f"src-{c}", work / f"out-m{c}", 2)
        results["memory"][c] = r
        print(json.dumps({f"memory {c} sources": r}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
