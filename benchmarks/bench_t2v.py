"""t2v benchmarks: U-Net training step (time, samples/s, MFU, peak memory) and loader throughput.

    python benchmarks/bench_t2v.py model  [--batch 4 8 12 16] [--ckpt [layer|attention|block]]
        [--compile [full|regional|norms] [--compile-timeout 120]] [--channels-last]
        [--kernels aten|triton] [--attention-backends temporal=math,...]
        [--baseline [--baseline-batch 8]] [--profile PREFIX] [--json OUT.json]
    python benchmarks/bench_t2v.py loader --clips 24 --json OUT.json
    python benchmarks/bench_t2v.py ema [--unet JSON]

``model``: the swap-attention U-Net at the paper-like size (16 frames, 256x256 -> latent
16x32x32, SD-2.x widths, random weights), bf16 autocast, one AdamW training step per
iteration. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward+backward (matmuls, convs and SDPA; no recompute); MFU = FLOPs / step time / the
chip's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). ``--baseline`` also times diffusers'
``UNet3DConditionModel`` at the same widths. A batch sweep stops at the first out-of-memory
batch. ``--compile``: the whole U-Net, ``regional``: each block apart (``unet.compile_regions``), or
``norms``: only the group / layer norms (``layers.compile_norms``), the rest eager;
the first (compiling) step is timed apart as ``compile_s`` and given up after
``--compile-timeout`` s. ``--channels-last``: NHWC weights and input (``unet.to_channels_last``).
``--kernels triton``: the norms in the fused Triton kernels (``t2v/kernels.py``).
``--attention-backends``: the backend per attention kind (``benchmarks/bench_attention.py``).
``--profile PREFIX``: 2 more steps under torch.profiler on a GPU; the row gets GPU ms per step
by kernel kind and the top kernels, ``PREFIX.<model>.txt`` the full table. Each row is written
to ``--json`` as soon as it is measured. On a CPU it runs the tiny preset (a smoke run).

``ema``: the trainer's EMA update per step (:func:`bench_ema`).

``loader``: hdvg-format shards of 640x360 H.264 clips; clips/s on one core for a plain PyAV
decode of every frame against ``ShardClips`` (16 frames at 8 fps, 256x256 crop), and the
loader with 2 DataLoader workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def parse_backends(spec: str | None) -> dict[str, str]:
    """``temporal=math,swap=cudnn`` -> {"temporal": "math", "swap": "cudnn"}"""
    return dict(item.split("=", 1) for item in (spec or "").split(",") if item)


def bench_model(args, results: list[dict]) -> list[dict]:
    from hdvg.t2v.config import UNET_PRESETS, UNetConfig, from_dict
    from hdvg.t2v.layers import use_attention_backends, use_kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    cfg = from_dict(UNetConfig, {**UNET_PRESETS[preset], **json.loads(args.unet or "{}")})
    frames, lat = (
        args.frames or (16 if preset == "base" else 4),
        args.latent or (32 if preset == "base" else 8),
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    runs = [("hdvg", args.batch)]
    if args.baseline:
        runs.append(("diffusers", args.baseline_batch))
    for kind, batches in runs:
        model = make_model(kind, cfg, device, args)
        params = sum(p.numel() for p in model.parameters())
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-5, fused=True)  # as the trainer
        compiled = args.compile if kind == "hdvg" else None
        kernels = args.kernels if kind == "hdvg" else "aten"
        use_kernels(kernels)  # hdvg's own norms only (diffusers calls nn.GroupNorm)
        use_attention_backends()  # FLOPs counted on SDPA (the counter does not see Triton's)
        flop_per_sample, aten_ops = count_flops(model, cfg, frames, lat, device, args)  # eager
        backends = parse_backends(args.attention_backends) if kind == "hdvg" else {}
        use_attention_backends(backends)  # hdvg's Attention only
        fwd = model
        if compiled == "full":
            fwd = torch.compile(model, backend=args.compile_backend, dynamic=args.compile_dynamic)
        elif compiled == "regional":  # in place; compiles lazily in the first step
            from hdvg.t2v.unet import compile_regions

            compile_regions(model, backend=args.compile_backend, dynamic=args.compile_dynamic)
        elif compiled == "norms":  # the norms alone; the rest stays eager
            from hdvg.t2v.layers import compile_norms

            compile_norms(backend=args.compile_backend)
        for b in batches:
            row = {"model": kind, "params": params, "batch": b, "frames": frames}
            row |= {"preset": preset, "unet": json.loads(args.unet or "{}")}
            row["aten_ops_fwd_bwd"] = aten_ops  # eager, before compile; the optimizer's apart
            row |= {"latent": [lat, lat], "compiled": compiled, "channels_last": args.channels_last}
            row |= {"kernels": kernels, "attention_backends": backends}
            row |= {"grad_checkpointing": args.ckpt if kind == "hdvg" else None}  # hdvg only
            row |= {"ckpt_levels": args.ckpt_levels if kind == "hdvg" else None}
            x, t, text = make_inputs(b, cfg, frames, lat, device, args)

            def step(fwd=fwd, opt=opt, trained=trained, x=x, t=t, text=text):
                train_step(fwd, opt, trained, x, t, text, device)

            def stage(name: str, row=row) -> None:  # saved, so a killed run says where it was
                row["stage"] = name
                args.save()

            results.append(row)
            try:
                if compiled:  # the first step compiles: time it apart, under a guard
                    stage("compile")
                    t0 = time.perf_counter()
                    with compile_cache(args.compile_cache, row), compile_progress(row, args.save):
                        with time_limit(args.compile_timeout):
                            step()
                            sync(device)
                    row["compile_s"] = time.perf_counter() - t0
                    stats = torch._dynamo.utils.counters["stats"]
                    row["compiled_graphs"] = stats["unique_graphs"]  # distinct graphs, fwd+bwd each
                stage("warmup")
                t_warm = time.perf_counter()
                for _ in range(args.warmup):
                    step()
                sync(device)
                row["warmup_s"] = time.perf_counter() - t_warm
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                stage("timed steps")
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(device)
                dt = (time.perf_counter() - t0) / args.steps
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except (Exception, CompileTimeout) as e:  # inductor may wrap it in its own error
                if "CompileTimeout" not in f"{type(e).__name__} {e}":
                    raise
                row["error"] = f"compile did not finish in {args.compile_timeout} s"
            if "error" in row:
                print(json.dumps(row), flush=True)
                args.save()
                x = t = text = None
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break  # a larger batch would fail the same way: save the time
            flops = flop_per_sample * b
            peak = peak_flops(device)
            row |= {"step_s": dt, "samples_s": b / dt, "tflop_per_step": flops / 1e12}
            row |= {
                "achieved_tflops": flops / dt / 1e12,
                "mfu": flops / dt / peak if peak else None,
            }
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            print(json.dumps(row), flush=True)
            if args.profile and device.type == "cuda":
                stage("profile")  # the timing above is saved first
                row |= profile_steps(step, device, f"{args.profile}.{kind}.txt")
            stage("done")
        model = opt = fwd = None  # free before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def make_model(kind: str, cfg, device: torch.device, args) -> torch.nn.Module:
    with torch.device(device):  # initialize on the device: seconds, not a minute, at 1.5B
        if kind == "hdvg":
            from hdvg.t2v.unet import SwapUNet

            m = SwapUNet(cfg)
            if args.ckpt:
                m.set_gradient_checkpointing(args.ckpt, args.ckpt_levels)
        else:
            from diffusers import UNet3DConditionModel

            down = ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in cfg.attention_levels]
            up = [d.replace("Down", "Up") for d in reversed(down)]
            m = UNet3DConditionModel(
                block_out_channels=cfg.block_out_channels,
                down_block_types=down,
                up_block_types=up,
                layers_per_block=cfg.layers_per_block,
                attention_head_dim=cfg.head_dim,
                cross_attention_dim=cfg.cross_attention_dim,
                norm_num_groups=cfg.norm_num_groups,
            )
    if args.channels_last and kind == "hdvg":
        from hdvg.t2v.unet import to_channels_last

        to_channels_last(m)
    elif args.channels_last:  # the 2D convs' weights; diffusers' Conv3d runs NCDHW
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.to(memory_format=torch.channels_last)
    return m.train()


def make_inputs(b: int, cfg, frames: int, lat: int, device: torch.device, args):
    x = torch.randn(b, 4, frames, lat, lat, device=device)
    if args.channels_last:  # (B, C, F, H, W) -> frames fold into the batch as NHWC
        from hdvg.t2v.unet import channels_last_input

        x = channels_last_input(x)
    t = torch.randint(0, 1000, (b,), device=device)
    text = torch.randn(b, 77, cfg.cross_attention_dim, device=device)
    return x, t, text


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: each is at least one kernel launch on a GPU,
    so this is the host work an eager step has to queue."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_flops(model, cfg, frames: int, lat: int, device: torch.device, args) -> tuple:
    """Model FLOPs of one sample's forward+backward (no recompute counted): FLOPs are linear
    in the batch, and a batch-1 count cannot run out of memory where the timed loop did not.
    Also the aten ops of that forward+backward (eager; the batch does not change it)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, text = make_inputs(1, cfg, frames, lat, device, args)
    ckpt = getattr(model, "set_gradient_checkpointing", None)
    if ckpt:
        ckpt(False)
    with FlopCounterMode(display=False) as fc, OpCounter() as oc:  # eager: counts every op
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t, text)
            out = out if torch.is_tensor(out) else out.sample
        out.float().square().mean().backward()
    if ckpt:
        ckpt(args.ckpt, args.ckpt_levels)
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops()), oc.ops


KERNEL_KINDS = [  # (kind, name fragments), first match wins; cuDNN conv kernels say "gemm" too
    ("triton (fused)", ("triton",)),  # inductor names them after their ops: "..._convolution_..."
    # before conv: cuDNN's attention kernels are named "..._sdpa_sm90_flash_fprop_..."
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "compute_dot_do_o", "dq_to")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_")),
    ("norm", ("norm", "welford", "moments")),
    ("layout", ("copy", "transpose", "nchwtonhwc", "nhwctonchw", "cat", "permute")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((k for k, frags in KERNEL_KINDS if any(f in low for f in frags)), "elementwise")


def profile_steps(step, device: torch.device, path: str, n: int = 2) -> dict:
    """GPU kernel time of ``n`` steps by kernel and by kind (conv / gemm / attention / norm /
    layout copies / ...): where a step's time goes. Full table to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            sync(device)
        events = prof.key_averages()
        path_ = Path(path)
        path_.parent.mkdir(parents=True, exist_ok=True)
        path_.write_text(events.table(sort_by="self_device_time_total", row_limit=60))
        rows = []
        for e in events:
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
            if us > 0:
                rows.append((e.key, us / n / 1e3, e.count // n))  # ms and launches per step
        total = sum(r[1] for r in rows)
        kinds: dict[str, float] = {}
        for name, ms, _ in rows:
            kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
        rows.sort(key=lambda r: -r[1])
        return {
            "gpu_kernel_ms_per_step": total,
            "kernels_per_step": sum(r[2] for r in rows),
            "gpu_ms_by_kind": {
                k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
            },
            "top_kernels": [[name[:90], round(ms, 2), c] for name, ms, c in rows[:15]],
        }
    except Exception as e:  # a profiler failure must not lose the timing already measured
        return {"profile_error": f"{type(e).__name__}: {e}"[:300]}


class CompileTimeout(BaseException):
    """A BaseException, as KeyboardInterrupt, that no ``except Exception`` on the way stops:
    raised as a plain Exception once, a 40-s limit let a CPU compile run past 80 s."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CompileTimeout after ``seconds``, and again every 5 s until it lands (SIGALRM:
    compilation is Python, so it stops), or at a SIGTERM (the device script's ``timeout``), so
    that what the compile finished is still saved (``--compile-cache``) and reported."""

    def fire(*_):
        raise CompileTimeout

    old = signal.signal(signal.SIGALRM, fire), signal.signal(signal.SIGTERM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old[0])
        signal.signal(signal.SIGTERM, old[1])


@contextlib.contextmanager
def compile_progress(row: dict, save, every: float = 20.0):
    """Every ``every`` s, print and save how far the compile has got: dynamo graphs, inductor
    compiles (a forward or a backward graph each; cache hits apart), AOT autograd cache hits,
    and at the end the seconds by phase (dynamo, AOT, inductor...). A compile cut short by its
    timeout then says where it stood, which a device slot's log did not."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    t0 = time.perf_counter()
    done = threading.Event()

    def snap() -> dict:
        ind, aot = counters["inductor"], counters["aot_autograd"]
        row["compile_progress"] = {
            "s": round(time.perf_counter() - t0, 1),
            "dynamo_graphs": counters["stats"]["unique_graphs"],
            "inductor_compiles": ind["fxgraph_cache_miss"] + ind["fxgraph_cache_hit"],
            "inductor_cache_hits": ind["fxgraph_cache_hit"],
            "aot_cache_hits": aot["autograd_cache_hit"],
        }
        return row["compile_progress"]

    def report() -> None:
        while not done.wait(every):
            print(f"compiling: {json.dumps(snap())}", file=sys.stderr, flush=True)
            save()

    watcher = threading.Thread(target=report, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        snap()
        row["compile_phase_s"] = {
            k: round(sum(v), 1) for k, v in compilation_time_metrics.items() if sum(v) >= 0.5
        }


@contextlib.contextmanager
def compile_cache(directory: str | None, row: dict):
    """``--compile-cache DIR``: load every ``*.bin.gz`` there (``torch.compiler`` cache artifacts:
    inductor's graphs with their Triton binaries, AOT autograd's, autotuning) before compiling,
    and write what this compile adds -- also when its timeout cuts it short -- as a new file, so
    that a compile longer than one device call finishes over several (the directory travels
    with the call; gpu_compile.sh). Artifacts are checked against torch, Triton and the GPU."""
    if not directory:
        yield
        return
    import gzip

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    loaded = 0
    for f in sorted(root.glob("*.bin.gz")):
        info = torch.compiler.load_cache_artifacts(gzip.decompress(f.read_bytes()))
        loaded += sum(len(v) for v in getattr(info, "artifacts", {}).values())
    row["compile_cache_loaded"] = loaded
    try:
        yield
    finally:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            name = root / f"compile-{time.strftime('%Y%m%d-%H%M%S')}.bin.gz"
            name.write_bytes(gzip.compress(saved[0], compresslevel=6))
            row["compile_cache_saved"] = {"file": name.name, "bytes": name.stat().st_size}


def train_step(fwd, opt, params, x, t, text, device: torch.device) -> None:
    """One step as hdvg.t2v.train takes it: bf16 autocast forward, backward, clipping and the
    fused AdamW step that skips non-finite gradients (the trainer's own `clip_and_step`)."""
    from hdvg.t2v.train import clip_and_step

    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fwd(x, t, text)
        out = out if torch.is_tensor(out) else out.sample  # diffusers returns an output object
    out.float().square().mean().backward()
    clip_and_step(opt, params, 1.0)
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_clip_shards(root: Path, n: int, size: str = "640x360", gop_s: float = 0.0,
                     latents: tuple[int, ...] | None = None) -> Path:  # fmt: skip
    """``n`` 4-s 24-fps H.264 clips of ``size`` in one shard; ``gop_s``: a keyframe every that
    many seconds (0: x264's default, one GOP a clip here); ``latents``: each clip also carries
    float16 latents of that shape, as the ``latents`` curation stage stores them."""
    import imageio_ffmpeg

    w, h = (int(v) for v in size.split("x"))

    shards = root / "shards"
    shards.mkdir(parents=True)
    sources = ["testsrc2", "mandelbrot", "life=mold=10:ratio=0.5", "gradients=speed=0.05"]
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for i in range(n):
            src = sources[i % len(sources)]
            sep = ":" if "=" in src else "="
            mp4 = root / f"{i}.mp4"
            cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f"]
            cmd += ["lavfi", "-i", f"{src}{sep}size={size}:rate=24", "-t", "4", "-c:v", "libx264"]
            cmd += ["-g", str(round(gop_s * 24))] if gop_s else []
            cmd += ["-pix_fmt", "yuv420p", "-preset", "veryfast", str(mp4)]
            subprocess.run(cmd, check=True, timeout=120, stdin=subprocess.DEVNULL)
            key = f"{i:016x}_0000"
            meta = {"clip_id": key, "width": w, "height": h, "fps": 24.0, "duration_s": 4.0}
            members = [
                (f"{key}.json", json.dumps(meta).encode()),
                (f"{key}.mp4", mp4.read_bytes()),
                (f"{key}.txt", b"a synthetic clip"),
            ]
            if latents:
                z = np.random.default_rng(i).standard_normal(latents).astype(np.float16)
                members.append((f"{key}.latents.npy", _npy(z)))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def bench_loader(args) -> dict:
    import av

    from hdvg.t2v.config import DataConfig
    from hdvg.t2v.data import ShardClips, make_loader, read_tar

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        # the latents a 16x256x256 sample has in the shards (SD-2.x VAE: 4 x 16 x 32 x 32)
        root = make_clip_shards(Path(tmp), args.clips, args.clip_size, args.gop, (4, 16, 32, 32))
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

        lat = DataConfig(frames=16, size=(256, 256), fps=8.0, batch_size=1, num_workers=0,
                         use_latents=True)  # fmt: skip
        it = iter(ShardClips(str(root), lat))
        t0 = time.perf_counter()
        for _ in range(4 * args.clips):  # the stored latents: no video decoded
            assert "latents" in next(it)
        latents_one_core = 4 * args.clips / (time.perf_counter() - t0)

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
        "clip": f"{args.clip_size} H.264, 24 fps, 4 s (96 frames), "
        + (f"a keyframe every {args.gop:g} s" if args.gop else "one GOP"),
        "sample": "16 frames at 8 fps, 256x256 center crop",
        "plain_decode_clips_s_per_core": plain,
        "loader_clips_s_per_core": one_core,
        "loader_clips_s_2_workers": two_workers,
        "loader_vs_plain": one_core / plain,
        "latents_clips_s_per_core": latents_one_core,  # with data.use_latents
    }
    print(json.dumps(row), flush=True)
    return row


def bench_ema(args) -> dict:
    """``train.EMA.update`` per step against a per-tensor ``lerp_`` loop over ``state_dict()``
    (the update before) and, as the floor, one bare ``torch._foreach_lerp_`` over ready
    lists: on the U-Net's structure (~1,500 tensors) at the widths given by ``--unet``
    (small ones measure the per-tensor overhead, which a GPU step pays in launches)."""
    from hdvg.t2v.config import UNET_PRESETS, UNetConfig, from_dict
    from hdvg.t2v.train import EMA
    from hdvg.t2v.unet import SwapUNet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or "base"
    cfg = from_dict(UNetConfig, {**UNET_PRESETS[preset], **json.loads(args.unet or "{}")})
    with torch.device(device):
        model = SwapUNet(cfg)
    ema = EMA(model, 0.9999)

    @torch.no_grad()
    def per_tensor() -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema.shadow[k].lerp_(v.float(), 1e-4)
            else:
                ema.shadow[k].copy_(v)

    avg, src, _ = ema.groups(model)

    def floor() -> None:
        torch._foreach_lerp_(avg, src, 1e-4)

    def timed(fn, n: int = 30) -> float:
        for _ in range(3):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n * 1e3

    row = {"device": str(device), "preset": preset, "unet": json.loads(args.unet or "{}")}
    row |= {
        "tensors": len(model.state_dict()),
        "params": sum(p.numel() for p in model.parameters()),
    }
    row["floor_ms"] = timed(floor)
    row["ema_update_ms"] = timed(lambda: ema.update(model, 10**6))
    row["per_tensor_loop_ms"] = timed(per_tensor)
    row |= {k.replace("_ms", "_vs_floor"): row[k] / row["floor_ms"]
            for k in ("ema_update_ms", "per_tensor_loop_ms")}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["model", "loader", "ema", "all"])
    p.add_argument("--batch", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", choices=["base", "tiny"], default=None, help="default: by device")
    p.add_argument(
        "--unet", default=None, metavar="JSON",
        help="overrides on the preset, e.g. the base structure at small widths for a CPU compile: "
        '\'{"block_out_channels": [32, 64, 128, 128], "head_dim": 16, "norm_num_groups": 8}\'',
    )  # fmt: skip
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--latent", type=int, default=None, help="latent height = width")
    p.add_argument(
        "--compile",
        nargs="?",
        const="full",
        default=None,
        choices=["full", "regional", "norms"],
        help="torch.compile the whole U-Net (default), each block apart, or the norms alone",
    )
    p.add_argument("--compile-timeout", type=float, default=120, help="seconds for compiling")
    p.add_argument("--compile-backend", default="inductor", help="aot_eager: a quick CPU check")
    p.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help="load torch.compile cache artifacts from DIR first, save what the compile adds there",
    )  # fmt: skip
    p.add_argument(
        "--compile-dynamic", action="store_true",
        help="symbolic sizes: one graph per block class instead of one per shape (fewer compiles)",
    )  # fmt: skip
    p.add_argument(
        "--ckpt",
        nargs="?",
        const="layer",
        default=None,
        choices=["layer", "attention", "block"],
        help="gradient checkpointing: per layer (default), attention triples or every block",
    )
    p.add_argument(
        "--ckpt-levels", type=int, nargs="+", default=None, help="only these levels (0 = top)"
    )
    p.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    p.add_argument(
        "--kernels", default="aten", choices=["aten", "triton"],
        help="group / layer norms: eager aten ops or the fused Triton kernels (t2v/kernels.py)",
    )  # fmt: skip
    p.add_argument(
        "--attention-backends", default=None, metavar="KIND=BACKEND,...",
        help="attention backend per kind (train.attention_backends), e.g. temporal=triton; "
        "bench_attention.py prints the fastest",
    )  # fmt: skip
    p.add_argument("--baseline", action="store_true", help="also time diffusers' UNet3D")
    p.add_argument("--baseline-batch", type=int, nargs="+", default=[8])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument(
        "--clip-size", default="640x360", help="loader: the clips' size (curated: >= 720p)"
    )
    p.add_argument("--gop", type=float, default=0.0, help="loader: seconds between keyframes")
    p.add_argument("--json", default=None, help="append results to this JSON file")
    p.add_argument(
        "--profile", default=None, help="profile 2 steps after timing: PREFIX.<model>.txt tables"
    )
    args = p.parse_args()
    out = {
        "machine": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out["args"] = {k: v for k, v in vars(args).items() if k not in ("what", "json")}
    path = Path(args.json) if args.json else None
    runs = json.loads(path.read_text()) if path and path.exists() else []
    rows: list[dict] = []

    def save() -> None:  # rewrite this run's entry after every row: a timeout keeps the rest
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(runs + [out | ({"model": rows} if rows else {})], indent=1))

    args.save = save
    if args.what in ("model", "all"):
        rows = out["model"] = bench_model(args, rows)
    if args.what in ("loader", "all"):
        out["loader"] = bench_loader(args)
    if args.what in ("ema", "all"):
        out["ema"] = bench_ema(args)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
