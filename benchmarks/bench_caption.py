"""Caption throughput: the `caption` stage inside the pipeline against the same model
called directly in a loop at its best batch size.

- direct: `model.generate` over ready pixel tensors (frames decoded and processed before
  the clock starts), for each batch size in --batch-sizes; the best is the reference.
- pipeline (`--pipeline pool`, the default): the Ray pipeline's two model-side stages,
  the same code with the Ray hops replaced by processes (Ray itself cannot be carried to
  the GPU machine): `--frame-workers` spawned processes run `pipeline.frame_pool_row`
  (the CPU frame pool: unpickle a source's row, decode each clip's middle frame, run the
  image processor's resize, drop the frames, pickle) on rows they make themselves (in Ray
  the source stage's output never passes through the actor's process), and hand each
  result over through shared memory (/dev/shm, as Ray's object store does); the main
  process fetches them and runs `pipeline.ModelStageActor` on batches of those rows on
  `--actor-calls` threads, as Ray calls the actor (unpickle, stack, normalise on the
  device, batched generation, captions written to the clips, pickle). Clips arrive as mp4
  bytes, 4 per source. Reported beside the rate: the pool's seconds per clip and its
  rate alone (no actor), and the actor's seconds per batch in `generate` and outside it,
  so a run says which side binds.
- `--pipeline inproc`: the actor decoding its own clips (`frame_pool: false`), with
  `--decode-threads` threads ahead of the generation.

Generated length is fixed (min_new_tokens = max_new_tokens), so random weights give the
throughput of real ones. --shape tiny: a tiny BLIP-2 saved and loaded through the stage's
real loading code (CPU). --shape opt-2.7b: BLIP-2 OPT-2.7B shape, random bf16 weights built
on the GPU and attached to the stage.

    python benchmarks/bench_caption.py --shape tiny --clips 96
    python benchmarks/bench_caption.py --shape opt-2.7b --clips 1024 --batch-sizes 64,128
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from hdvg import media, pipeline
from hdvg.config import ModelsConfig, from_dict
from hdvg.frames import decode_frames
from hdvg.media import VideoSpec
from hdvg.pipeline import ModelStageActor, apply_stages, frame_pool_row
from hdvg.records import Clip, SourceRecord, SourceResult
from hdvg.stages import build_stage
from hdvg.stages.models import testing as T


def make_results(data: bytes, n: int, per_source: int = 4, first: int = 0,
                 copy: bool = False) -> list[SourceResult]:  # fmt: skip
    """`n` clips of `data`, `per_source` a source; `copy`: each clip its own bytes, as real
    clips are (one shared object would be pickled once per source)."""
    out = []
    for s in range(first * per_source, first * per_source + n, per_source):
        r = SourceResult(SourceRecord(f"src{s}", "bench", s))
        for i in range(min(per_source, first * per_source + n - s)):
            r.clips.append(Clip(f"src{s}_{i:04d}", f"src{s}", "bench", i, 0, 2, 0, 50, 2.0,
                                1280, 720, 25.0, data=bytes(bytearray(data)) if copy
                                else data))  # fmt: skip
        out.append(r)
    return out


_W: dict = {}  # a frame-pool worker's state


def _pool_init(cfg, data: bytes, per_source: int, shm: str) -> None:
    """A frame-pool worker's set-up (Ray's worker start): stages built, processor loaded,
    one intra-op thread as Ray gives a 1-CPU task (OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)
    stages = pipeline.model_stages(cfg)
    for s in stages:
        s.prepare([])
    pipeline._POOL_STAGES[cfg.hash()] = stages
    _W.update(data=data, per_source=per_source, shm=shm)


def _pool_task(i: int, cfg) -> tuple[str, float, int, list[int]]:
    """One source through the frame pool: its row made here (the source stage's output),
    `frame_pool_row`, the result left in shared memory. (path, seconds, clips, the CPUs this
    worker keeps off for the GPU actor: `models.actor_cores`)."""
    (r,) = make_results(_W["data"], _W["per_source"], _W["per_source"], first=i, copy=True)
    row = {"order": i, "result": pickle.dumps(r)}
    t0 = time.perf_counter()
    out = frame_pool_row(row, cfg)
    dt = time.perf_counter() - t0
    path = f"{_W['shm']}/{i}-{os.getpid()}-{time.monotonic_ns()}"
    for col in COLUMNS:  # a block's columns, side by side in shared memory
        Path(f"{path}.{col}").write_bytes(out[col])
    return path, dt, len(r.clips), sorted(pipeline.keep_cores(cfg))


COLUMNS = ("result", "clip_data")


def _fetch(path: str) -> dict:
    """The hop pool -> actor: the row's columns read out of shared memory (Ray's object
    store maps them without even this copy)."""
    row = {}
    for col in COLUMNS:
        p = Path(f"{path}.{col}")
        row[col] = p.read_bytes()
        p.unlink()
    return row


def _shm_dir() -> str | None:
    """/dev/shm when it has room for a run's rows (containers often give it 64 MB; the
    pool may run ahead of the actor by the whole run), else the system's temp folder."""
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > 8 * 1024**3 else None
    except OSError:
        return None


class PoolBench:
    """The frame pool's processes, started once and warm, and the actor fed from them."""

    def __init__(self, cfg, data: bytes, workers: int, per_source: int):
        self.cfg, self.workers, self.per_source = cfg, workers, per_source
        self.shm = tempfile.mkdtemp(prefix="hdvg-pool-", dir=_shm_dir())
        ctx = mp.get_context("spawn")  # no fork of a CUDA process
        self.pool = ctx.Pool(workers, initializer=_pool_init,
                             initargs=(cfg, data, per_source, self.shm))  # fmt: skip
        self.task = partial(_pool_task, cfg=cfg)
        self.pool_s: list[float] = []
        self.row_bytes: list[int] = []
        self.next = 0
        self.kept: set[int] = set()
        for path, _, _, kept in self.pool.map(self.task, range(2 * workers), chunksize=1):
            _fetch(path)  # workers up and warm
            self.kept.update(kept)

    def sources(self, n_clips: int) -> range:
        n = -(-n_clips // self.per_source)
        self.next += n
        return range(self.next - n, self.next)

    def pool_only(self, n_clips: int) -> float:
        """Clips/s the pool alone supplies (results fetched and thrown away)."""
        t0 = time.perf_counter()
        n = 0
        for path, _, k, _ in self.pool.imap(self.task, self.sources(n_clips), chunksize=1):
            _fetch(path)
            n += k
        return n / (time.perf_counter() - t0)

    def run(self, actor, n_clips: int, per_batch: int, calls: int) -> tuple[float, float, list]:
        """Seconds for `n_clips` through the pool and the actor; the rate once the pipeline
        is full (clips after the first batch over the time after it: the pool's fill time
        left out, as a long run amortises it); the results' rows."""
        finished: list[float] = []  # when each actor call ended
        done: list = []
        inflight: deque = deque()
        with ThreadPoolExecutor(calls, thread_name_prefix="actor-call") as ex:
            sync()
            t0 = time.perf_counter()
            buf = []

            def collect():
                out = inflight.popleft().result()
                done.extend(dict(zip(COLUMNS, r, strict=True))
                            for r in zip(*(out[c] for c in COLUMNS), strict=True))  # fmt: skip

            for path, dt, k, _ in self.pool.imap(self.task, self.sources(n_clips), chunksize=1):
                row = _fetch(path)
                self.pool_s.append(dt / k)
                self.row_bytes.append((len(row["result"]) / k, len(row["clip_data"]) / k))
                buf.append(row)
                self.pool_done = time.perf_counter()  # the pool's last row: decoding ends
                if len(buf) == per_batch:
                    while len(inflight) > calls:  # Ray's tasks in flight per actor
                        collect()
                    batch = {c: [r[c] for r in buf] for c in COLUMNS}
                    inflight.append(ex.submit(actor, batch))
                    inflight[-1].add_done_callback(lambda _: finished.append(time.perf_counter()))
                    buf = []
            if buf:
                inflight.append(ex.submit(actor, {c: [r[c] for r in buf] for c in COLUMNS}))
            while inflight:
                collect()
            sync()
            t1 = time.perf_counter()
        n_first = per_batch * self.per_source
        steady = (n_clips - n_first) / (t1 - finished[0]) if len(finished) > 1 else 0.0
        return t1 - t0, steady, done

    def close(self) -> None:
        self.pool.terminate()
        shutil.rmtree(self.shm, ignore_errors=True)


def run_pool(cfg, st, data: bytes, n_clips: int, workers: int, per_batch: int,
             calls: list[int], per_source: int = 4):  # fmt: skip
    """The pipeline behind the frame pool, once per actor-calls value on the same warm
    pool; yields the rates and the breakdown of both sides of each."""
    pb = PoolBench(cfg, data, workers, per_source)
    spans: list[tuple[float, float]] = []  # each `generate` batch: (start, end)
    real = st._generate

    def timed(inputs):
        t = time.perf_counter()
        try:
            return real(inputs)
        finally:
            spans.append((t, time.perf_counter()))

    st._generate = timed
    try:
        pool_only = pb.pool_only(min(n_clips, 512))
        for c in calls:
            actor = ModelStageActor(cfg, stages=[st])
            pb.run(actor, per_batch * per_source, per_batch, c)  # warm-up: one batch
            actor.timings.clear()
            st.timings.clear()
            pb.pool_s.clear()
            pb.row_bytes.clear()
            spans.clear()
            dt, steady, done = pb.run(actor, n_clips, per_batch, c)
            res = _pool_result(pb, actor, st, dt, done, workers, c, pool_only)
            res["steady_captions_per_s"] = steady
            res["actor"] |= contention(spans, pb.pool_done)
            yield res
    finally:
        st._generate = real
        pb.close()


def contention(spans: list[tuple[float, float]], pool_done: float) -> dict:
    """Seconds per batch of the stage's `_generate` (`generate` with its device copy and text
    decoding, a few ms) while the pool still decoded (the batch began before its last row) and
    after (the actor alone on the CPUs): their ratio is what the decoders cost `generate`,
    beside the direct loop's time per batch."""
    out = {}
    for name, sel in (("busy", [e - b for b, e in spans if b < pool_done]),
                      ("idle", [e - b for b, e in spans if b >= pool_done])):  # fmt: skip
        out[f"generate_s_pool_{name}"] = round(sum(sel) / len(sel), 4) if sel else None
        out[f"batches_pool_{name}"] = len(sel)
    return out


def _pool_result(pb, actor, st, dt, done, workers, calls, pool_only) -> dict:
    back = [pipeline.result_of(row) for row in done]
    assert all(c.caption and c.frames is None and c.data for r in back for c in r.clips)
    n = sum(len(r.clips) for r in back)
    a, g = actor.timings, st.timings
    calls_n = max(1, a["calls"])
    per_clip = sum(pb.pool_s) / max(1, len(pb.pool_s))
    frames_s = sum(r.source.timings.get("frames", 0.0) for r in back) / n
    other = a["process_s"] - g["generate_s"] - g["to_device_s"] - g["decode_text_s"]
    row_mb, data_mb = (sum(b[i] for b in pb.row_bytes) / len(pb.row_bytes) / 1e6 for i in (0, 1))
    return {
        "captions_per_s": n / dt,
        "frame_workers": workers,
        "actor_calls": calls,
        "pool": {
            "s_per_clip": round(per_clip, 4),  # frame_pool_row: unpickle, decode, resize, pickle
            "frames_s_per_clip": round(frames_s, 4),  # of which decode + prepare
            "capacity_clips_per_s": round(workers / per_clip, 1),
            "cpus_kept_off": sorted(pb.kept),  # for the actor (models.actor_cores)
            "alone_clips_per_s": round(pool_only, 1),  # measured, no actor
            # what the actor unpickles, and the mp4 bytes it passes on untouched
            "row_mb_per_clip": round(row_mb, 3),
            "clip_data_mb_per_clip": round(data_mb, 3),
        },
        "actor": {  # seconds per call (one batch), summed over threads, / calls
            "batches": a["calls"],
            "images_per_batch": round(g["images"] / calls_n, 1),
            "generate_s": round(g["generate_s"] / calls_n, 4),
            "to_device_s": round(g["to_device_s"] / calls_n, 4),
            "decode_text_s": round(g["decode_text_s"] / calls_n, 4),
            "process_other_s": round(other / calls_n, 4),  # batching, captions onto clips
            "unpickle_s": round(a["unpickle_s"] / calls_n, 4),
            "pickle_s": round(a["pickle_s"] / calls_n, 4),
            "lock_wait_s": round(a["lock_wait_s"] / calls_n, 4),
            # the device's share of the wall clock: 1.0 = generate never waits for the CPU
            "generate_busy": round(g["generate_s"] / dt, 3),
        },
    }


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    # a timeout's SIGTERM unwinds: the frame pool's processes are ended on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "opt-2.7b"], default="tiny")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--size", default="1280x720", help="clip size (the HD-VG minimum is 720p)")
    ap.add_argument("--decode-threads", type=int, default=4, help="--pipeline inproc")
    ap.add_argument("--pipeline", choices=["pool", "inproc", "both"], default="pool")
    ap.add_argument("--inproc-clips", type=int, default=512, help="clips for --pipeline inproc")
    ap.add_argument("--frame-workers", default=str(max(1, (os.cpu_count() or 2) - 2)),
                    help="frame-pool processes; a list runs the pool pipeline once per value")  # fmt: skip
    ap.add_argument("--actor-calls", default="2", help="models.actor_calls; a list: each")
    ap.add_argument("--pool-runs", default=None,
                    help="instead of the two above: WORKERSxCALLS[:rCORES],... e.g. 14x1,14x2,"
                         "14x1:r0 (rCORES: models.actor_cores for that pool)")  # fmt: skip
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="caption.cache, for the direct loop and the stage alike")  # fmt: skip
    ap.add_argument("--static-compile", choices=["cudagraphs", "inductor"], default="cudagraphs",
                    help="caption.static_compile: what compiles the decode step (--cache static)")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    ap.add_argument("--clip", default=None, help="use this mp4 instead of making one (no ffmpeg)")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="hdvg-bench-"))
    if a.clip:
        data = Path(a.clip).read_bytes()
    else:
        data = media.make_video(tmp / "clip.mp4", VideoSpec(w, h, 25, (2.0,))).read_bytes()
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    params = {"min_new_tokens": a.tokens, "max_new_tokens": a.tokens,
              "decode_threads": a.decode_threads, "cache": a.cache,
              "static_compile": a.static_compile}  # fmt: skip
    device = "cpu" if a.shape == "tiny" else "cuda"
    if a.shape == "tiny":
        params["path"] = str(T.save_tiny_blip2(tmp / "blip2"))
        st = build_stage("caption", params)
        st.bind(ModelsConfig(device="cpu"))
        st.setup()  # the real loading code
    else:
        st = build_stage("caption", params)
        st.bind(ModelsConfig(), check=False)
        model, proc = T.full_blip2("cuda", torch.bfloat16, tmp / "tok")
        st.attach(model, proc, "blip2-opt-2.7b-shape@random")
        # the frame pool loads the processor only: a folder with it and the model's config
        params["path"] = str(tmp / "blip2-proc")
        proc.save_pretrained(params["path"])
        model.config.to_json_file(str(tmp / "blip2-proc" / "config.json"))
    fr = decode_frames(data)
    pixels = st.processor(images=[fr.images[fr.middle]] * max(sizes), return_tensors="pt")[
        "pixel_values"].to(st.device, st.dtype)  # fmt: skip

    def gen(n: int):
        with torch.inference_mode():
            st.model.generate(pixel_values=pixels[:n], **st.generate_kwargs())

    direct = {}
    for b in sizes:
        gen(b)  # warm-up
        sync()
        reps = max(2, a.clips // b)
        t0 = time.perf_counter()
        for _ in range(reps):
            gen(b)
        sync()
        direct[b] = reps * b / (time.perf_counter() - t0)
        print(f"direct batch {b}: {direct[b]:.1f} captions/s", file=sys.stderr)
    best_b = max(direct, key=direct.get)
    report(a, direct, best_b, {}, [])

    st.cfg.batch_size = best_b
    params["batch_size"] = best_b
    per_source = 4
    pipe: dict[str, float] = {}
    if a.pipeline in ("inproc", "both"):
        apply_stages([st], make_results(data, best_b))  # warm-up
        n = min(a.clips, a.inproc_clips)
        results = make_results(data, n, per_source)
        sync()
        t0 = time.perf_counter()
        apply_stages([st], results)
        sync()
        dt = time.perf_counter() - t0
        assert all(c.caption is not None for r in results for c in r.clips)
        pipe["inproc"] = n / dt
        report(a, direct, best_b, pipe, [])
        print(f"stage, decoding in the actor: {pipe['inproc']:.1f} captions/s", file=sys.stderr)
    pools = []
    if a.pipeline in ("pool", "both"):
        # priorities as in a Ray run: the actor at Ray's worker niceness (15), the pool's
        # processes at models.cpu_nice (19, set by frame_pool_row itself); the direct loop
        # above ran at the default priority, its best case
        try:
            os.nice(max(0, 15 - os.nice(0)))
        except OSError:
            pass
        # (workers, models.actor_cores or None: the recipe's default) -> actor calls, in order
        runs: dict[tuple[int, int | None], list[int]] = {}
        if a.pool_runs:
            for run in a.pool_runs.split(","):
                wc, _, cores = run.partition(":r")
                w, c = (int(v) for v in wc.split("x"))
                runs.setdefault((w, int(cores) if cores else None), []).append(c)
        else:
            for w in a.frame_workers.split(","):
                runs[int(w), None] = [int(c) for c in a.actor_calls.split(",")]
        for (w, cores), calls in runs.items():
            models = {"device": device} | ({} if cores is None else {"actor_cores": cores})
            pool_cfg = from_dict({"clip_stages": {"caption": params}, "models": models})
            for r in run_pool(pool_cfg, st, data, a.clips, w, max(1, best_b // per_source),
                              calls, per_source):  # fmt: skip
                r["actor_cores"] = pool_cfg.models.actor_cores
                pools.append(r)
                key = f"pool{w}x{r['actor_calls']}" + ("" if cores is None else f"r{cores}")
                pipe[key] = r["captions_per_s"]
                pipe[key + "_steady"] = r["steady_captions_per_s"]
                report(a, direct, best_b, pipe, pools)
                print(f"frame pool ({w} processes), {r['actor_calls']} actor calls: "
                      f"{pipe[key]:.1f} captions/s ({pipe[key + '_steady']:.1f} once full); "
                      f"{json.dumps({k: r[k] for k in ('pool', 'actor')})}", file=sys.stderr)  # fmt: skip
    report(a, direct, best_b, pipe, pools, final=True)
    return 0


def report(a, direct: dict, best_b: int, pipe: dict, pools: list, final: bool = False) -> None:
    """The result so far, to --out (rewritten after each part: a run cut short by its
    timeout keeps what it measured) and, at the end, to stdout."""
    res = {
        "benchmark": "caption", "shape": a.shape, "tokens": a.tokens, "clips": a.clips, "cache": a.cache,
        "clip_size": a.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "direct_captions_per_s": {str(k): round(v, 2) for k, v in direct.items()},
        "direct_best_batch": best_b, "direct_best_captions_per_s": round(direct[best_b], 2),
        "pipeline_captions_per_s": {k: round(v, 2) for k, v in pipe.items()},
        "ratio": {k: round(v / direct[best_b], 3) for k, v in pipe.items()},
        "best_pipeline": max(pipe, key=pipe.get) if pipe else None,
        "frame_workers": a.frame_workers,
        "pool_runs": [{k: (round(v, 2) if k.endswith("captions_per_s") else v)
                       for k, v in p.items()} for p in pools],
        "decode_threads": a.decode_threads, "cpus": os.cpu_count(), "complete": final,
    }  # fmt: skip
    if final:
        print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
