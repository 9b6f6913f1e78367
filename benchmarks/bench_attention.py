"""Every attention call of the t2v U-Net's training step, timed under each SDPA backend.

    python benchmarks/bench_attention.py [--batch 4] [--iters 10] [--json OUT.json]

Why: the H100 profile gives flash attention 9 % of the step's GPU time for 7 % of its FLOPs
(4.65 of 63.76 TFLOP at batch 4), and the issue measured plain temporal attention over 16
frames at ~4 TFLOP/s against ~294 on 1,024-token windows. Which calls are slow, and whether
another backend (memory-efficient, cuDNN, or the plain math path: two batched matmuls and a
softmax, which for 16 keys is a few MB) or hdvg's own short-sequence Triton kernel (several
frame sequences packed per tile, ``t2v/kernels.py``) runs them faster, decides what
``Attention`` should call for each kind. One device check answers it in seconds.

The calls are the U-Net's own: one forward of the paper-size model (SD-2.x widths, 16 frames,
latent 32x32, 77 text tokens; on a CPU the tiny preset, as a smoke run) with SDPA recorded --
shapes, strides (the strided q/k/v views of the fused projections) and how many per step.
Each distinct call is then rebuilt with the same strides and timed forward + backward (bf16,
CUDA events) under each backend that takes it (``triton``: on a GPU, or on a CPU under
``TRITON_INTERPRET=1``). The JSON has, per call: count per step,
milliseconds per call and TFLOP/s by backend; and per backend choice the step's attention
milliseconds (each backend everywhere; each call's fastest; each kind's fastest), and that
last choice as a ``train.attention_backends`` / ``bench_t2v.py --attention-backends`` value.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hdvg.t2v import kernels  # noqa: E402
from hdvg.t2v.layers import ATTENTION_BACKENDS as BACKENDS  # noqa: E402
from hdvg.t2v.layers import SDPA_BACKENDS  # noqa: E402


def record_calls(batch: int, device: torch.device) -> collections.Counter:
    """(q, k, v shapes and strides) of every SDPA call in one U-Net forward, with counts."""
    from hdvg.t2v.config import UNET_PRESETS, UNetConfig, from_dict
    from hdvg.t2v.layers import Attention
    from hdvg.t2v.unet import SwapUNet

    base = device.type == "cuda"
    cfg = from_dict(UNetConfig, UNET_PRESETS["base" if base else "tiny"])
    frames, lat, text_len = (16, 32, 77) if base else (4, 8, 8)
    with torch.device(device):
        model = SwapUNet(cfg).to(torch.bfloat16)
        x = torch.randn(batch, cfg.in_channels, frames, lat, lat, dtype=torch.bfloat16)
        text = torch.randn(batch, text_len, cfg.cross_attention_dim, dtype=torch.bfloat16)
        t = torch.full((batch,), 10)
    calls: collections.Counter = collections.Counter()
    real = F.scaled_dot_product_attention
    kind = [""]  # the kind (layers.ATTENTION_KINDS) of the call in progress
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.register_forward_pre_hook(lambda m, *_: kind.__setitem__(0, m.kind))

    def spy(q, k, v, *args, **kwargs):
        calls[(kind[0], *((tuple(a.shape), a.stride()) for a in (q, k, v)))] += 1
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(x, t, text)
    finally:
        F.scaled_dot_product_attention = real
    return calls


def rebuild(call, device: torch.device) -> list[torch.Tensor]:
    """q, k, v with the recorded shapes and strides, each over its own storage (views of
    packed projections keep their strides: the span their storage needs is allocated)."""
    out = []
    for shape, stride in call[1:]:
        span = kernels.storage_span(torch.empty_strided(shape, stride, device="meta"))
        base = torch.randn(span, device=device, dtype=torch.bfloat16)
        out.append(base.as_strided(shape, stride).detach().requires_grad_())
    return out


def flops(call) -> float:
    """Forward + backward FLOPs of one call: 4*B*h*Nq*Nk*d forward, 2.5x that backward."""
    (b, h, nq, d), (_, _, nk, _) = call[1][0], call[2][0]
    return 3.5 * 4 * b * h * nq * nk * d


TRITON_TOLERANCE = 2e-2  # relative; bf16 inputs and outputs, fp32 inside both


def triton_error(q, k, v, grad) -> float | None:
    """The short-sequence kernel's largest relative error (output and the three gradients,
    by norm) against SDPA's math backend in fp32 on the same bf16 inputs; None where the
    kernel does not take them."""
    mine = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = kernels.short_attention(*mine)
    if out is None:
        return None
    out.backward(grad)
    with sdpa_kernel([SDPA_BACKENDS["math"]]):
        want = F.scaled_dot_product_attention(*ref)
    want.backward(grad.float())
    pairs = [(out, want)] + [(a.grad, b.grad) for a, b in zip(mine, ref, strict=True)]
    return max(((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in pairs)


def time_call(call, backend: str, device: torch.device, iters: int) -> float | None:
    """Milliseconds per forward + backward, or None where the backend does not take it."""
    q, k, v = rebuild(call, device)
    grad = torch.randn(q.shape, device=device, dtype=q.dtype)
    if backend == "triton" and device.type != "cuda" and not kernels.interpreting():
        return None  # the short-sequence kernel: CUDA (or Triton's interpreter)

    if backend == "triton":  # timed only where it computes SDPA's numbers
        err = triton_error(q, k, v, grad)
        if err is None or err > TRITON_TOLERANCE:
            if err is not None:
                print(f"short_attention differs from SDPA by {err:.3g} on {call}: not timed",
                      file=sys.stderr)  # fmt: skip
            return None

    def step():
        if backend == "triton":
            out = kernels.short_attention(q, k, v)
            if out is None:
                raise RuntimeError("short_attention does not take these inputs")
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.backward(out, grad)

    try:
        chosen = [SDPA_BACKENDS[backend]] if backend in SDPA_BACKENDS else None
        with sdpa_kernel(chosen) if chosen else contextlib.nullcontext():
            for _ in range(2):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                for _ in range(iters):
                    step()
                end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end) / iters
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            return (time.perf_counter() - t0) * 1e3 / iters
    except RuntimeError:  # no kernel of this backend takes these inputs
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = record_calls(args.batch, device)
    rows = []
    for call, count in sorted(calls.items(), key=lambda kv: -flops(kv[0]) * kv[1]):
        (b, h, nq, d), (_, _, nk, _) = call[1][0], call[2][0]
        ms = {name: time_call(call, name, device, args.iters) for name in BACKENDS}
        taken = {k: v for k, v in ms.items() if v is not None}
        best = min(taken, key=taken.get) if taken else None
        rows.append({
            "call": call[0], "q": [b, h, nq, d], "keys": nk, "per_step": count,
            "ms": {k: round(v, 4) for k, v in taken.items()},
            "tflop_s": {k: round(flops(call) / v / 1e9, 3) for k, v in taken.items()},
            "fastest": best,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    def step_ms(pick) -> float | None:
        total = 0.0
        for r in rows:
            name = pick(r)
            if name is None or name not in r["ms"]:
                return None
            total += r["ms"][name] * r["per_step"]
        return round(total, 3)

    # per kind, the backend with the least total time over that kind's calls (one taking all)
    kinds: dict[str, dict[str, float]] = {}
    for r in rows:
        per = kinds.setdefault(r["call"], {})
        for name in BACKENDS:
            t = r["ms"].get(name)
            per[name] = per.get(name, 0.0) + t * r["per_step"] if t is not None else float("inf")
    best = {k: min(per, key=per.get) for k, per in kinds.items()}
    result = {
        "benchmark": "attention",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "batch": args.batch,
        "torch": torch.__version__,
        "calls": rows,
        "step_ms": {
            **{name: step_ms(lambda r, n=name: n) for name in BACKENDS},
            "fastest_per_call": step_ms(lambda r: r["fastest"]),
        },
        "step_tflop": round(sum(flops(c) * n for c, n in calls.items()) / 1e12, 3),
        "kind_ms": {
            k: {n: round(t, 3) for n, t in per.items() if t < float("inf")}
            for k, per in kinds.items()
        },  # fmt: skip
        "fastest_per_kind": best,
        "step_ms_fastest_per_kind": round(sum(kinds[k][n] for k, n in best.items()), 3),
        # for train.attention_backends / bench_t2v.py --attention-backends: kinds not on flash
        "attention_backends": ",".join(f"{k}={n}" for k, n in sorted(best.items()) if n != "flash"),
    }
    print(json.dumps({k: result[k] for k in ("step_ms", "kind_ms", "attention_backends")}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
