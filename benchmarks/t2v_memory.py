"""Activation memory and op counts of the t2v U-Net against diffusers' UNet3DConditionModel,
measured without a GPU.

    python benchmarks/t2v_memory.py [--width 320 --cpu-width 128] [--only hdvg] [--ckpt MODE]

Both models at the same widths (SD-2.x: ``width``*[1,2,4,4]), random weights, train mode,
bf16 autocast as in training. Two passes per model:

``gpu_*`` -- the paper-like size (16 frames, latent 32x32) on *fake* CUDA tensors
(``FakeTensorMode``: shapes and dtypes only, no memory, no GPU). CUDA autocast's policy is
what decides most of the saved bytes (it runs group/layer norm in fp32, so a norm's input,
its fp32 output and the bf16 copy the next matmul needs may all be kept), and the CPU's policy
differs, so this is the figure that predicts the H100. SDPA is routed to the flash kernel
when the real dispatcher would pick it (bf16, no mask, head dim <= 256) and to the
memory-efficient kernel otherwise, as on an H100; forward only (the fake backward needs a
CUDA context). ``gpu_saved_gib_per_sample``: bytes of the tensors autograd keeps for backward
(``saved_tensors_hooks``, deduplicated by storage) -- batch 2 minus batch 1, so weights and
their bf16 casts drop out. ``gpu_saved_by_module_gib``: the batch-1 figure split by the
innermost running module class; ``gpu_fwd_ops``: aten ops in that forward (views apart).

``cpu_*`` -- a reduced size on real CPU tensors (``--cpu-width 128 --frames 8 --latent 16``,
batch 1; widths 128*[1,2,4,4], still head dim 64):
saved bytes likewise, aten ops of one forward+backward (``TorchDispatchMode``;
``cpu_kernel_ops`` leaves out views, ~ kernel launches), and the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB, GiB = 2**20, 2**30


def build(kind: str, width: int, ckpt: str | None = None, levels=None) -> torch.nn.Module:
    from hdvg.t2v.config import UNetConfig
    from hdvg.t2v.unet import SwapUNet

    cfg = UNetConfig(block_out_channels=tuple(width * m for m in (1, 2, 4, 4)))
    torch.manual_seed(0)
    if kind == "hdvg":
        m = SwapUNet(cfg)
        if ckpt:
            m.set_gradient_checkpointing(ckpt, levels)
    else:
        from diffusers import UNet3DConditionModel

        m = UNet3DConditionModel(
            block_out_channels=cfg.block_out_channels,
            attention_head_dim=cfg.head_dim,
            cross_attention_dim=cfg.cross_attention_dim,
            norm_num_groups=cfg.norm_num_groups,
        )
    return m.train()


def inputs(b: int, frames: int, lat: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, frames, lat, lat, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, 77, 1024, generator=g)
    return x.to(device), t.to(device), text.to(device)


def run(model, x, t, text):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model(x, t, text)
        return out if torch.is_tensor(out) else out.sample


class ModuleStack:
    """Names the innermost running module (forward pre/post hooks) to attribute saved tensors."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = ["(top)"]
        self.handles = []
        for _, m in model.named_modules():
            cls = type(m).__name__
            if cls in ("ModuleList", "Sequential", "Dropout"):
                continue
            self.handles.append(m.register_forward_pre_hook(self._push(cls)))
            self.handles.append(m.register_forward_hook(self._pop))

    def _push(self, cls):
        def fn(_m, _i):
            self.stack.append(cls)

        return fn

    def _pop(self, _m, _i, _o):
        self.stack.pop()

    def close(self):
        for h in self.handles:
            h.remove()


def saved_bytes(model, x, t, text, attribute: bool = False):
    """Bytes of distinct storages saved for backward in one forward (parameters left out),
    optionally split by module class and by dtype."""
    seen: dict[int, int] = {}
    by_mod: collections.Counter = collections.Counter()
    by_dtype: collections.Counter = collections.Counter()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    mods = ModuleStack(model) if attribute else None

    def pack(tensor):
        if tensor.layout != torch.strided:
            return tensor
        st = tensor.untyped_storage()
        key = st._cdata  # the StorageImpl: views share it, fake (meta) storages too
        if key not in seen and key not in params:
            seen[key] = st.nbytes()
            by_dtype[str(tensor.dtype).removeprefix("torch.")] += st.nbytes()
            if mods:
                by_mod[mods.stack[-1]] += st.nbytes()
        return tensor

    # a non-reentrant checkpoint keeps its inputs (for the recompute) outside any hook: count them
    import hdvg.t2v.unet as unet

    real_ckpt = unet.checkpoint

    def ckpt(fn, *args, **kw):
        for a in args:
            if torch.is_tensor(a):
                pack(a)
        return real_ckpt(fn, *args, **(kw | {"preserve_rng_state": False}))  # no CUDA RNG here

    unet.checkpoint = ckpt
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = run(model, x, t, text)
    finally:
        unet.checkpoint = real_ckpt
        if mods:
            mods.close()
    del out
    return sum(seen.values()), by_mod, by_dtype


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "permute",
    "transpose",
    "t",
    "expand",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "slice",
    "select",
    "as_strided",
    "alias",
    "detach",
    "unflatten",
    "flatten",
    "narrow",
    "_reshape_alias",
    "lift_fresh",
}


def op_summary(ops: collections.Counter, prefix: str) -> dict:
    ops = collections.Counter({k: v for k, v in ops.items() if k != "device"})  # prim.device
    views = sum(n for op, n in ops.items() if op in VIEW_OPS)
    kernels = collections.Counter({k: v for k, v in ops.items() if k not in VIEW_OPS})
    return {
        f"{prefix}_ops": sum(ops.values()),
        f"{prefix}_kernel_ops": sum(ops.values()) - views,
        f"{prefix}_top_ops": dict(kernels.most_common(12)),
    }


# -- fake CUDA pass -------------------------------------------------------------------------


def fake_cuda_model(model: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """Swap every parameter and buffer for a fake CUDA tensor of the same shape and dtype."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                fake = FakeTensor(mode, torch.empty_like(p, device="meta"), torch.device("cuda"))
                mod._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = FakeTensor(
                    mode, torch.empty_like(b, device="meta"), torch.device("cuda")
                )
    return model


@contextlib.contextmanager
def cuda_autocast_and_sdpa(paths: collections.Counter):
    """CUDA autocast without a GPU (``torch.autocast("cuda")`` refuses one), and SDPA sent to
    the kernel an H100 would run: its saved tensors are the flash / efficient kernel's."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type != "cuda":
            return real(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(dt) for x in (q, k, v))
        if any(x.stride(-1) != 1 for x in (q, k, v)):
            paths["non_contiguous_last_dim"] += 1
        if attn_mask is None and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            paths["flash"] += 1
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=scale
            )[0]
        paths["efficient"] += 1
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale
        )[0]

    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    F.scaled_dot_product_attention = sdpa
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()  # as torch.autocast's __enter__: weight casts are cached
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


def measure_fake_cuda(kind: str, args) -> dict:
    mode = FakeTensorMode()
    with torch.device("meta"):
        model = build(kind, args.width, args.ckpt, args.ckpt_levels)
    fake_cuda_model(model, mode)
    paths: collections.Counter = collections.Counter()
    row: dict = {"gpu_frames": args.gpu_frames, "gpu_latent": args.gpu_latent}
    with mode, cuda_autocast_and_sdpa(paths):
        # torch.autocast("cuda") would refuse without a GPU: run() on a fake CUDA input enters
        # torch.autocast("cuda") -- keep it off and use the flags set above instead
        b1, b2 = (inputs(b, args.gpu_frames, args.gpu_latent, "cuda") for b in (1, 2))
        total1, by_mod, by_dtype = saved_bytes_fake(model, b1, attribute=True)
        total2, _, _ = saved_bytes_fake(model, b2)
        counter = OpCounter()
        with counter, torch.no_grad():
            forward(model, *b1)
    row["gpu_saved_gib_batch1"] = total1 / GiB
    row["gpu_saved_gib_per_sample"] = (total2 - total1) / GiB
    row["gpu_saved_by_dtype_gib"] = {k: round(v / GiB, 2) for k, v in by_dtype.most_common()}
    row["gpu_saved_by_module_gib"] = {k: round(v / GiB, 2) for k, v in by_mod.most_common()}
    row["gpu_sdpa_calls"] = dict(paths)
    row.update(op_summary(counter.ops, "gpu_fwd"))
    return row


def forward(model, x, t, text):
    out = model(x, t, text)  # autocast is already on (flags), as in run()
    return out if torch.is_tensor(out) else out.sample


def saved_bytes_fake(model, batch, attribute=False):
    global run
    real_run = run
    run = lambda m, x, t, text: forward(m, x, t, text)  # noqa: E731 - no torch.autocast("cuda")
    try:
        return saved_bytes(model, *batch, attribute=attribute)
    finally:
        run = real_run


# -- real CPU pass --------------------------------------------------------------------------


def measure_cpu(kind: str, args) -> dict:
    model = build(kind, args.cpu_width, args.ckpt, args.ckpt_levels)
    row: dict = {"cpu_width": args.cpu_width, "params": sum(p.numel() for p in model.parameters())}
    row.update(cpu_frames=args.frames, cpu_latent=args.latent)
    b1, b2 = inputs(1, args.frames, args.latent), inputs(2, args.frames, args.latent)
    total1, by_mod, _ = saved_bytes(model, *b1, attribute=True)
    total2, _, _ = saved_bytes(model, *b2)
    row["cpu_saved_mib_batch1"] = total1 / MiB
    row["cpu_saved_mib_per_sample"] = (total2 - total1) / MiB
    row["cpu_saved_by_module_mib"] = {k: round(v / MiB, 1) for k, v in by_mod.most_common()}
    gc.collect()
    counter = OpCounter()
    with counter:
        run(model, *b1).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    row.update(op_summary(counter.ops, "cpu"))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run(model, *b1).float().square().mean().backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    row["cpu_step_s"] = min(times)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=320, help="level-0 width; levels x[1,2,4,4]")
    p.add_argument("--gpu-frames", type=int, default=16)
    p.add_argument("--gpu-latent", type=int, default=32)
    p.add_argument("--cpu-width", type=int, default=128, help="CPU pass (320 needs ~14 GB)")
    p.add_argument("--frames", type=int, default=8, help="CPU pass")
    p.add_argument("--latent", type=int, default=16, help="CPU pass")
    p.add_argument("--only", choices=["hdvg", "diffusers"], default=None)
    p.add_argument("--skip", choices=["cpu", "gpu"], default=None, help="leave out one pass")
    p.add_argument("--ckpt", default=None, help="hdvg gradient checkpointing mode")
    p.add_argument("--ckpt-levels", type=int, nargs="+", default=None, help="0 = top level")
    p.add_argument("--repeats", type=int, default=2, help="timed CPU forward+backward passes")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for kind in [args.only] if args.only else ["hdvg", "diffusers"]:
        row = {"model": kind, "width": args.width, "grad_checkpointing": args.ckpt}
        row["ckpt_levels"] = args.ckpt_levels
        if args.skip != "gpu":
            row.update(measure_fake_cuda(kind, args))
            print(json.dumps(row), flush=True)
            gc.collect()
        if args.skip != "cpu":
            row.update(measure_cpu(kind, args))
            gc.collect()
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
