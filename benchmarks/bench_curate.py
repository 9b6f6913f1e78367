"""Wall time of `hdvg curate pipelines/smoke.yaml` against a plain ffmpeg decode floor.

    python benchmarks/bench_curate.py --minutes 10 --files 6 --workdir bench_out/curate
    python benchmarks/bench_curate.py --minutes 10 --files 6 --copies 3   # 30 minutes
    python benchmarks/bench_curate.py --repeats 4 --against HEAD~1         # A/B two revisions

Makes `--files` 720p H.264 sources (shots of 3-9 s from moving lavfi sources, keyframes
at cuts as scene-aware encoders place them; cached in --workdir), then, in every repeat:

  floor (plain):  the issue's floor, `ffmpeg -i X -f null -` over the files one after
                  another, ffmpeg's own threads on both cores
  floor (2x1):    a stricter one, `ffmpeg -threads 1 -i X -f null -`, two processes at a
                  time: ~20 % less wall on 2 cores, as frame threading leaves ~15 % idle
  hdvg:           the whole `hdvg curate` command (Ray start-up included), fresh OUT

and prints hdvg / floor for both floors as JSON (also written to --workdir/result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hdvg import media  # noqa: E402
from hdvg.ffmpeg import ffmpeg_exe  # noqa: E402


def make_sources(d: Path, minutes: float, files: int, seed: int = 0) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_file = minutes * 60 / files
    paths = []
    jobs = []
    for i in range(files):
        segs, total = [], 0.0
        while total < per_file:
            s = round(rng.uniform(3, 9), 2)
            segs.append(s)
            total += s
        spec = media.VideoSpec(1280, 720, 25, tuple(segs), crf=23, preset="veryfast", gop=250)
        p = d / f"src{i:02d}_{int(total)}s.mp4"
        paths.append(p)
        if not p.exists():
            jobs.append((p, spec))
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda a: media.make_video(a[0], a[1], timeout_s=3600), jobs))
    return paths


def floor_decode(paths: list[Path], plain: bool) -> float:
    """Wall time to decode every file: `plain` runs `ffmpeg -i X -f null -` on one file after
    another (ffmpeg's frame threads use both cores), else `-threads 1`, two at a time."""
    t0 = time.perf_counter()

    def dec(p: Path) -> None:
        threads = [] if plain else ["-threads", "1"]
        subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", *threads, "-i", str(p),
                        "-f", "null", "-"], check=True)  # fmt: skip

    with ThreadPoolExecutor(1 if plain else 2) as ex:
        list(ex.map(dec, paths))
    return time.perf_counter() - t0


def run_hdvg(src: Path, out: Path, ray_address: str | None = None, tree: Path = ROOT) -> float:
    """The whole command, run from `tree` (this checkout, or an exported revision): the
    driver's sys.path starts there and Ray hands the driver's path to its workers."""
    shutil.rmtree(out, ignore_errors=True)
    tree = tree.resolve()
    extra = ["--ray-address", ray_address] if ray_address else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hdvg", "curate", str(tree / "pipelines" / "smoke.yaml"),
                    "--input", str(src.resolve()), "--output", str(out.resolve()), "--quiet",
                    *extra], check=True, cwd=tree, env=env)  # fmt: skip
    return time.perf_counter() - t0


def run_pyscenedetect(paths: list[Path], out: Path) -> float:
    """PySceneDetect's own CLI on every file (`detect-adaptive split-video --copy`, the scale
    reference the issue gives), two files at a time; its split-video runs `ffmpeg` from PATH:
    our binary, linked into out/bin."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "bin").mkdir(parents=True)
    (out / "bin" / "ffmpeg").symlink_to(ffmpeg_exe())
    env = dict(os.environ, PATH=f"{out / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.perf_counter()

    def one(p: Path) -> None:
        subprocess.run([sys.executable, "-m", "scenedetect", "-i", str(p), "-o", str(out / p.stem),
                        "-q", "detect-adaptive", "split-video", "--copy"],
                       check=True, env=env, capture_output=True)  # fmt: skip

    with ThreadPoolExecutor(2) as ex:
        list(ex.map(one, paths))
    return time.perf_counter() - t0


def export_revision(rev: str, dest: Path) -> Path:
    """`git archive REV` of this repository unpacked into dest (replaced if present)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="bench_out/curate")
    ap.add_argument("--copies", type=int, default=1,
                    help="curate K hard-linked copies of the sources (K x the footage; each "
                         "copy is its own source, decoded in full by both sides)")  # fmt: skip
    ap.add_argument("--ray-address", default=None,
                    help="join a running Ray (e.g. after `ray start --head`) instead of the "
                         "embedded one: the job without Ray's start-up")  # fmt: skip
    ap.add_argument("--pyscenedetect", action="store_true",
                    help="also time PySceneDetect's CLI (detect-adaptive split-video --copy) "
                         "on the same files in every repeat")  # fmt: skip
    ap.add_argument("--against", metavar="REV", default=None,
                    help="also time a git revision's code in every repeat (interleaved, order "
                         "alternating): an A/B that the machine's drift does not decide")  # fmt: skip
    a = ap.parse_args()
    wd = Path(a.workdir)
    src = wd / "sources"
    paths = make_sources(src, a.minutes, a.files)
    if a.copies > 1:
        src = wd / f"sources_x{a.copies}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        linked = []
        for k in range(a.copies):
            for p in paths:
                q = src / f"{p.stem}_c{k}{p.suffix}"
                os.link(p, q)
                linked.append(q)
        paths = linked
    other = export_revision(a.against, wd / "against") if a.against else None
    plains, twos, hdvgs, others, psds = [], [], [], [], []
    runs = [(hdvgs, wd / "out", ROOT)] + ([(others, wd / "out_against", other)] if other else [])
    for r in range(a.repeats):  # interleaved, so drift on a shared machine hits both
        plains.append(floor_decode(paths, plain=True))
        twos.append(floor_decode(paths, plain=False))
        for times, out, tree in runs[:: -1 if r % 2 else 1]:  # A/B order alternates
            times.append(run_hdvg(src, out, a.ray_address, tree))
        if a.pyscenedetect:
            psds.append(run_pyscenedetect(paths, wd / "out_pyscenedetect"))
    run = json.loads((wd / "out" / "run.json").read_text())
    psd = {"pyscenedetect_s": [round(x, 2) for x in psds],
           **ratio_fields("pyscenedetect_ratio_plain", plains, psds)} if psds else {}  # fmt: skip
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "source_minutes": round(sum(media_duration(p) for p in paths) / 60, 2),
        "files": len(paths),
        "copies": a.copies,
        "ray": a.ray_address or "embedded",
        "hdvg_s": [round(x, 2) for x in hdvgs],
        "floor_plain_s": [round(x, 2) for x in plains],
        "floor_2x1_s": [round(x, 2) for x in twos],
        # each hdvg run against the floors measured just before it: the VM's speed drifts by
        # up to a third over minutes, so adjacent pairs are the fairer comparison
        **ratio_fields("ratio_plain", plains, hdvgs),
        **ratio_fields("ratio_2x1", twos, hdvgs),
        **(against_fields(a.against, plains, hdvgs, others) if other is not None else {}),
        **psd,
        "clips": run["counts"]["clips_by_status"],
        "stage_seconds": run["stage_seconds"],
    }
    (wd / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def ratio_fields(key: str, floors: list, runs: list) -> dict:
    """Each run over the floor measured in its repeat, and their median."""
    pairs = [r / f for f, r in zip(floors, runs, strict=True)]
    return {
        f"{key}_pairs": [round(x, 3) for x in pairs],
        f"{key}_median": round(statistics.median(pairs), 3),
    }


def against_fields(rev: str, floors: list, hdvgs: list, others: list) -> dict:
    return {
        "against": rev,
        "against_s": [round(x, 2) for x in others],
        "against_ratio_pairs": [round(o / f, 3) for f, o in zip(floors, others, strict=True)],
        # this checkout's time over the revision's in the same repeat: < 1 is faster
        "vs_against_pairs": [round(h / o, 3) for h, o in zip(hdvgs, others, strict=True)],
        "vs_against_median": round(
            statistics.median(h / o for h, o in zip(hdvgs, others, strict=True)), 3
        ),
    }


def media_duration(p: Path) -> float:
    from hdvg.probe import probe

    return probe(p).duration_s


if __name__ == "__main__":
    main()
