"""Caption throughput: the `caption` stage inside the pipeline against the same model
called directly in a loop at its best batch size.

- direct: `model.generate` over ready pixel tensors (frames decoded and processed before
  the clock starts), for each batch size in --batch-sizes; the best is the reference.
- pipeline: `pipeline.apply_stages([caption], results)`, the code a model actor runs
  on each batch of sources: clips as mp4 bytes, frames decoded (`hdvg.frames`), processor,
  batched generation, captions written to the clips.

Generated length is fixed (min_new_tokens = max_new_tokens), so random weights give the
throughput of real ones. --shape tiny: a tiny BLIP-2 saved and loaded through the stage's
real loading code (CPU). --shape opt-2.7b: BLIP-2 OPT-2.7B shape, random bf16 weights built
on the GPU and attached to the stage.

    python benchmarks/bench_caption.py --shape tiny --clips 96
    python benchmarks/bench_caption.py --shape opt-2.7b --clips 1024 --batch-sizes 32,64,128
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdvg import media
from hdvg.config import ModelsConfig
from hdvg.frames import decode_frames
from hdvg.media import VideoSpec
from hdvg.pipeline import apply_stages
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
    ap.add_argument("--decode-threads", type=int, default=4)
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
    apply_stages([st], make_results(data, best_b))  # warm-up
    results = make_results(data, a.clips)
    sync()
    t0 = time.perf_counter()
    apply_stages([st], results)
    sync()
    dt = time.perf_counter() - t0
    clips = [c for r in results for c in r.clips]
    assert all(c.caption is not None for c in clips)
    pipe = len(clips) / dt
    res = {
        "benchmark": "caption", "shape": a.shape, "tokens": a.tokens, "clips": len(clips),
        "clip_size": a.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "direct_captions_per_s": {str(k): round(v, 2) for k, v in direct.items()},
        "direct_best_batch": best_b, "direct_best_captions_per_s": round(direct[best_b], 2),
        "pipeline_captions_per_s": round(pipe, 2), "ratio": round(pipe / direct[best_b], 3),
        "decode_threads": a.decode_threads,
    }  # fmt: skip
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
