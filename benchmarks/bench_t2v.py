"""t2v benchmarks: U-Net training step (time, samples/s, MFU, peak memory) and loader throughput.

    python benchmarks/bench_t2v.py model  --batch 2 8 [--compile] [--baseline] --json OUT.json
    python benchmarks/bench_t2v.py loader --clips 24 --json OUT.json

``model``: the swap-attention U-Net at the paper-like size (16 frames, 256x256 -> latent
16x32x32, SD-2.x widths, random weights), bf16 autocast, one AdamW training step per
iteration. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward+backward (matmuls, convs and SDPA; no recompute); MFU = FLOPs / step time / the
chip's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). ``--baseline`` also times diffusers'
``UNet3DConditionModel`` at the same widths. On a CPU it runs the tiny preset (a smoke run).

``loader``: hdvg-format shards of 640x360 H.264 clips; clips/s on one core for a plain PyAV
decode of every frame against ``ShardClips`` (16 frames at 8 fps, 256x256 crop), and the
loader with 2 DataLoader workers.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16.items():
        if key in name:
            return val
    return None


def bench_model(args) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from hdvg.t2v.config import UNET_PRESETS, UNetConfig, from_dict
    from hdvg.t2v.unet import SwapUNet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = "base" if device.type == "cuda" else "tiny"
    cfg = from_dict(UNetConfig, {**UNET_PRESETS[preset], "gradient_checkpointing": args.ckpt})
    frames, lat = (16, 32) if preset == "base" else (4, 8)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    def make(kind: str):
        if kind == "hdvg":
            m = SwapUNet(cfg)
        else:
            from diffusers import UNet3DConditionModel

            m = UNet3DConditionModel(
                block_out_channels=cfg.block_out_channels,
                attention_head_dim=cfg.head_dim,
                cross_attention_dim=cfg.cross_attention_dim,
                norm_num_groups=cfg.norm_num_groups,
            )
        return m.to(device).train()

    results = []
    kinds = ["hdvg"] + (["diffusers"] if args.baseline and device.type == "cuda" else [])
    for kind in kinds:
        model = make(kind)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        fwd = model
        if args.compile and kind == "hdvg":
            fwd = torch.compile(model)
        for b in args.batch if kind == "hdvg" else args.batch[:1]:
            x = torch.randn(b, 4, frames, lat, lat, device=device)
            t = torch.randint(0, 1000, (b,), device=device)
            text = torch.randn(b, 77, cfg.cross_attention_dim, device=device)

            def step(fwd=fwd, opt=opt, x=x, t=t, text=text):
                train_step(fwd, opt, x, t, text, device)

            try:
                t_warm = time.perf_counter()
                for _ in range(args.warmup):
                    step()
                sync(device)
                warm_s = time.perf_counter() - t_warm
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(device)
                dt = (time.perf_counter() - t0) / args.steps
            except torch.OutOfMemoryError:
                results.append({"model": kind, "batch": b, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            # model FLOPs (no recomputation counted), on one sample: FLOPs are linear in the
            # batch, and a batch-1 count cannot run out of memory where the timed loop did not
            ckpt = getattr(model, "set_gradient_checkpointing", None)
            if ckpt:
                ckpt(False)
            with FlopCounterMode(display=False) as fc:  # eager model: counts every op
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = model(x[:1], t[:1], text[:1])
                    out = out if torch.is_tensor(out) else out.sample
                out.float().square().mean().backward()
            if ckpt:
                ckpt(args.ckpt)
            model.zero_grad(set_to_none=True)
            flops = fc.get_total_flops() * b
            peak = peak_flops(device)
            row = {
                "model": kind,
                "params": params,
                "batch": b,
                "frames": frames,
                "latent": [lat, lat],
                "compiled": bool(args.compile and kind == "hdvg"),
                "grad_checkpointing": args.ckpt,
                "step_s": dt,
                "samples_s": b / dt,
                "tflop_per_step": flops / 1e12,
                "achieved_tflops": flops / dt / 1e12,
                "mfu": flops / dt / peak if peak else None,
                "warmup_s": warm_s,
            }
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            print(json.dumps(row), flush=True)
            results.append(row)
        model = opt = fwd = None  # free before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def train_step(fwd, opt, x, t, text, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fwd(x, t, text)
        out = out if torch.is_tensor(out) else out.sample  # diffusers returns an output object
    out.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_clip_shards(root: Path, n: int) -> Path:
    import imageio_ffmpeg

    shards = root / "shards"
    shards.mkdir(parents=True)
    sources = ["testsrc2", "mandelbrot", "life=mold=10:ratio=0.5", "gradients=speed=0.05"]
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for i in range(n):
            src = sources[i % len(sources)]
            sep = ":" if "=" in src else "="
            mp4 = root / f"{i}.mp4"
            cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f"]
            cmd += ["lavfi", "-i", f"{src}{sep}size=640x360:rate=24", "-t", "4", "-c:v", "libx264"]
            cmd += ["-pix_fmt", "yuv420p", "-preset", "veryfast", str(mp4)]
            subprocess.run(cmd, check=True, timeout=120, stdin=subprocess.DEVNULL)
            key = f"{i:016x}_0000"
            meta = {"clip_id": key, "width": 640, "height": 360, "fps": 24.0, "duration_s": 4.0}
            for name, data in [
                (f"{key}.json", json.dumps(meta).encode()),
                (f"{key}.mp4", mp4.read_bytes()),
                (f"{key}.txt", b"a synthetic clip"),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def bench_loader(args) -> dict:
    import av

    from hdvg.t2v.config import DataConfig
    from hdvg.t2v.data import ShardClips, make_loader, read_tar

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_clip_shards(Path(tmp), args.clips)
        raw = [s["mp4"] for s in read_tar(str(root / "shards" / "shard-000000.tar"))]
        t0 = time.perf_counter()
        for data in raw:  # plain decode of every frame, native size, one thread
            with av.open(io.BytesIO(data)) as c:
                c.streams.video[0].thread_type = "SLICE"
                for f in c.decode(video=0):
                    f.to_ndarray(format="rgb24")
        plain = len(raw) / (time.perf_counter() - t0)

        cfg = DataConfig(frames=16, size=(256, 256), fps=8.0, batch_size=1, num_workers=0)
        ds = ShardClips(str(root), cfg)
        it = iter(ds)
        t0 = time.perf_counter()
        for _ in range(args.clips):
            next(it)
        one_core = args.clips / (time.perf_counter() - t0)

        cfg2 = DataConfig(frames=16, size=(256, 256), fps=8.0, batch_size=1, num_workers=2)
        loader = iter(make_loader(ShardClips(str(root), cfg2), cfg2))
        next(loader)  # worker start-up
        t0 = time.perf_counter()
        n = 2 * args.clips
        for _ in range(n):
            next(loader)
        two_workers = n / (time.perf_counter() - t0)
    row = {
        "clips": args.clips,
        "clip": "640x360 H.264, 24 fps, 4 s (96 frames)",
        "sample": "16 frames at 8 fps, 256x256 center crop",
        "plain_decode_clips_s_per_core": plain,
        "loader_clips_s_per_core": one_core,
        "loader_clips_s_2_workers": two_workers,
        "loader_vs_plain": one_core / plain,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["model", "loader", "all"])
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--baseline", action="store_true", help="also time diffusers' UNet3D")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--json", default=None, help="append results to this JSON file")
    args = p.parse_args()
    out = {
        "machine": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.what in ("model", "all"):
        out["model"] = bench_model(args)
    if args.what in ("loader", "all"):
        out["loader"] = bench_loader(args)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(runs + [out], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
