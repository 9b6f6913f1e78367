"""Caption throughput: the `caption` stage inside the pipeline against the same model
called directly in a loop at its best batch size.

- direct: `model.generate` over ready pixel tensors (frames decoded and processed before
  the clock starts), for each batch size in --batch-sizes; the best is the reference.
- pipeline (`--pipeline pool`, the default): the Ray pipeline's two model-side stages,
  the same code with the Ray hops replaced by processes (Ray itself cannot be carried to
  the GPU machine): `--frame-workers` spawned processes run `pipeline.frame_pool_row`
  (the CPU frame pool: unpickle a source's row, decode each clip's middle frame, run the
  image processor, pickle) and the main process runs `pipeline.ModelStageActor` on
  batches of those rows as they arrive (unpickle, stack, batched generation, captions
  written to the clips, frames dropped, pickle). Clips arrive as mp4 bytes, 4 per source.
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
import sys
import tempfile
import time
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


def make_results(data: bytes, n: int, per_source: int = 4) -> list[SourceResult]:
    out = []
    for s in range(0, n, per_source):
        r = SourceResult(SourceRecord(f"src{s}", "bench", s))
        for i in range(min(per_source, n - s)):
            r.clips.append(Clip(f"src{s}_{i:04d}", f"src{s}", "bench", i, 0, 2, 0, 50, 2.0,
                                1280, 720, 25.0, data=data))  # fmt: skip
        out.append(r)
    return out


def _pool_init(cfg) -> None:
    """A frame-pool worker's set-up (Ray's worker start): stages built, processor loaded,
    one intra-op thread as Ray gives a 1-CPU task (OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)
    stages = pipeline.model_stages(cfg)
    for s in stages:
        s.prepare([])
    pipeline._POOL_STAGES[cfg.hash()] = stages


def run_pool(cfg, st, results: list[SourceResult], workers: int, per_batch: int) -> float:
    """Seconds for `results` through the frame pool (processes) and the model actor."""
    actor = ModelStageActor(cfg, stages=[st])
    rows = [{"order": i, "result": pickle.dumps(r)} for i, r in enumerate(results)]
    ctx = mp.get_context("spawn")  # no fork of a CUDA process
    with ctx.Pool(workers, initializer=_pool_init, initargs=(cfg,)) as pool:
        pool.map(partial(frame_pool_row, cfg=cfg), rows[:workers])  # workers up and warm
        sync()
        t0 = time.perf_counter()
        buf, done = [], []
        for row in pool.imap(partial(frame_pool_row, cfg=cfg), rows, chunksize=1):
            buf.append(row["result"])
            if len(buf) == per_batch:
                done += actor({"result": buf})["result"]
                buf = []
        if buf:
            done += actor({"result": buf})["result"]
        sync()
        dt = time.perf_counter() - t0
    back = [pickle.loads(b) for b in done]
    assert all(c.caption and c.frames is None for r in back for c in r.clips)
    return dt


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "opt-2.7b"], default="tiny")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--size", default="1280x720", help="clip size (the HD-VG minimum is 720p)")
    ap.add_argument("--decode-threads", type=int, default=4, help="--pipeline inproc")
    ap.add_argument("--pipeline", choices=["pool", "inproc", "both"], default="pool")
    ap.add_argument("--inproc-clips", type=int, default=512, help="clips for --pipeline inproc")
    ap.add_argument("--frame-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
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
              "decode_threads": a.decode_threads}  # fmt: skip
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
            st.model.generate(pixel_values=pixels[:n], max_new_tokens=a.tokens,
                              min_new_tokens=a.tokens, do_sample=False)  # fmt: skip

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

    st.cfg.batch_size = best_b
    params["batch_size"] = best_b
    cfg = from_dict({"clip_stages": {"caption": params}, "models": {"device": device}})
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
        print(f"stage, decoding in the actor: {pipe['inproc']:.1f} captions/s", file=sys.stderr)
    if a.pipeline in ("pool", "both"):
        run_pool(cfg, st, make_results(data, best_b, per_source), 1, best_b // per_source)
        dt = run_pool(cfg, st, make_results(data, a.clips, per_source), a.frame_workers,
                      max(1, best_b // per_source))  # fmt: skip
        pipe["pool"] = a.clips / dt
        print(f"stage behind the frame pool ({a.frame_workers} processes): "
              f"{pipe['pool']:.1f} captions/s", file=sys.stderr)  # fmt: skip
    best_pipe = max(pipe, key=pipe.get)
    res = {
        "benchmark": "caption", "shape": a.shape, "tokens": a.tokens, "clips": a.clips,
        "clip_size": a.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "direct_captions_per_s": {str(k): round(v, 2) for k, v in direct.items()},
        "direct_best_batch": best_b, "direct_best_captions_per_s": round(direct[best_b], 2),
        "pipeline_captions_per_s": {k: round(v, 2) for k, v in pipe.items()},
        "ratio": {k: round(v / direct[best_b], 3) for k, v in pipe.items()},
        "best_pipeline": best_pipe, "frame_workers": a.frame_workers,
        "decode_threads": a.decode_threads, "cpus": os.cpu_count(),
    }  # fmt: skip
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
