"""Memory traffic of the t2v U-Net's non-matmul kernels in one training step, without a GPU.

    python benchmarks/t2v_traffic.py [--batch 4] [--width 320] [--top 15] [--json PATH]
        [--kernels aten|triton]

One forward + backward of the paper-like size (16 frames, latent 32x32, widths
``width``*[1,2,4,4], text length 77) at bf16 autocast as the trainer runs it (``mse_loss``
on the fp32 prediction), on *fake* CUDA tensors: ``t2v_memory.py``'s setup, so CUDA
autocast's casts and the flash-attention path are the H100's, and nothing is computed.

Every aten op that is not a view and not a matmul-class kernel (mm / addmm / bmm / baddbmm,
convolution and its backward, SDPA flash / efficient attention and their backward) is
counted as one kernel that reads its tensor inputs and writes its outputs:
``nonmatmul_gb`` is the sum of those bytes (a broadcast input counts its distinct elements),
an estimate of the traffic that bounds the eager step on the H100 (53 % of GPU time in
elementwise / copy kernels, RESULTS.md issue 7). Kernels' internal traffic is not seen (the
norms' two passes, cuDNN's own transposes), nor the optimizer (``adamw_gb`` estimates a fused
AdamW step apart). Matmul-class FLOPs come from torch's FLOP-counter formulas.

The fake backward cannot go through autograd's engine (it wants a CUDA context), so
:func:`run_backward` walks the graph itself: each node called once all its consumers have
delivered, gradients for one input summed and cast / reduced to the input's metadata as
the engine does; parameters' ``AccumulateGrad`` is skipped (it steals the first gradient
after ``zero_grad(set_to_none=True)``). Ops are attributed to the innermost running module
(forward) or to the module whose forward created the autograd node (backward), named by
the block (res-block, temporal conv, spatial / temporal / swap attention) and the path
inside it, indices dropped.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from t2v_memory import build, cuda_autocast_and_sdpa, fake_cuda_model, inputs  # noqa: E402

GB = 1e9
MATMUL_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_forward", "_flash_attention_backward",
    "_efficient_attention_forward", "_efficient_attention_backward",
}  # fmt: skip
# no kernel: views the schema does not mark as aliases, allocations, metadata
FREE_OPS = {
    "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "resize_", "set_", "as_strided_", "_local_scalar_dense", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "detach_",
}  # fmt: skip
WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_"}


def implicit_copies(name: str, args) -> list[torch.Tensor]:
    """Operands a matmul-class CUDA kernel copies before it runs (a copy the dispatcher does not
    see): cuDNN wants input, weight and gradient in one memory format, cuBLAS a unit stride in
    one of a matrix's last two dims, flash attention a unit last stride (and, in backward, the
    output and its gradient contiguous as (B, N, heads, d))."""
    if name.startswith("convolution"):
        ts = list(args[:3] if name == "convolution_backward" else args[:2])
        cl = torch.channels_last if ts[-1].dim() == 4 else torch.channels_last_3d
        nhwc = any(t.is_contiguous(memory_format=cl) and not t.is_contiguous() for t in ts[-2:])
        fmt = cl if nhwc else torch.contiguous_format
        return [t for t in ts if not t.is_contiguous(memory_format=fmt)]
    if name in ("mm", "bmm", "addmm", "baddbmm"):
        mats = args[1:3] if name.startswith(("addmm", "baddbmm")) else args[:2]
        return [m for m in mats if m.stride(-1) != 1 and m.stride(-2) != 1]
    if name == "_scaled_dot_product_flash_attention":
        return [t for t in args[:3] if t.stride(-1) != 1]
    if name == "_scaled_dot_product_flash_attention_backward":
        grad_out, q, k, v, out = args[:5]
        bnhd = [t for t in (grad_out, out) if not t.transpose(1, 2).is_contiguous()]
        return bnhd + [t for t in (q, k, v) if t.stride(-1) != 1]
    return []


def span_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: a broadcast (stride-0) dim holds one element."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


class Traffic(TorchDispatchMode):
    """Counts bytes, kernel-ops and FLOPs per op and per module label (set by :class:`Labels`)."""

    def __init__(self, labels: Labels):
        super().__init__()
        self.labels = labels
        self.phase = "fwd"
        self.bytes: collections.Counter = collections.Counter()  # (phase, op, label) -> bytes
        self.calls: collections.Counter = collections.Counter()
        self.flops: collections.Counter = collections.Counter()  # op -> FLOPs
        self.group = "other"  # what the running code is, for by_group (see measure)
        self.by_group: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in MATMUL_OPS:
            for t in implicit_copies(name, args):  # read and written once more
                key = (self.phase, f"implicit copy in {name}", self.labels.current)
                self.bytes[key] += 2 * span_bytes(t)
                self.calls[key] += 1
            if func.overloadpacket in flop_registry:
                shape = lambda x: x.shape if torch.is_tensor(x) else x  # noqa: E731
                self.flops[name] += flop_registry[func.overloadpacket](
                    *tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out)
                )
            return out
        if func.is_view or name in FREE_OPS:
            return out
        outs = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
        if not outs:
            return out
        skip = {a.name for a in func._schema.arguments if a.is_out}  # written: counted as outputs
        ins = [v for k, v in kwargs.items() if k not in skip]
        ins += list(args[1:] if name in WRITE_ONLY_SELF else args)
        ins = [t for t in tree_flatten(ins)[0] if torch.is_tensor(t)]
        if name == "_to_copy":  # casts apart from layout copies, by direction
            short = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
            same = ins[0].dtype == outs[0].dtype
            name += " (layout)" if same else f" ({short(ins[0])}->{short(outs[0])})"
        key = (self.phase, name, self.labels.current)
        nbytes = sum(span_bytes(t) for t in ins + outs)
        self.bytes[key] += nbytes
        self.calls[key] += 1
        weight = name.startswith("_to_copy") and isinstance(args[0], torch.nn.Parameter)
        self.by_group["autocast weight casts" if weight else self.group] += nbytes
        return out


class Labels:
    """The innermost running module's label, and autograd nodes tagged with the module whose
    forward created them (pre-hook: what exists on entry belongs to the caller; post-hook: what
    is new on exit belongs to this module)."""

    TAG = "t2v_traffic_module"

    def __init__(self, model: torch.nn.Module):
        from hdvg.t2v.unet import REGION_TYPES

        self.stack = ["(top)"]
        self.current = "(top)"
        self.handles = []
        regions: dict[str, str] = {}
        for name, m in model.named_modules():
            if isinstance(m, REGION_TYPES):
                regions[name] = type(m).__name__
            inside = (r for r in regions if name == r or name.startswith(r + "."))
            owner = max(inside, key=len, default=None)
            if owner is None:
                label = re.sub(r"\.\d+", "", name) or "(top)"
            else:
                local = re.sub(r"\.?\d+\.?", ".", name[len(owner) :]).strip(".")
                label = f"{regions[owner]}/{local or '(self)'}"
            self.handles.append(m.register_forward_pre_hook(self._push(label)))
            self.handles.append(m.register_forward_hook(self._pop))

    def _push(self, label):
        def fn(_m, args):
            self.tag(args, self.stack[-1])
            self.stack.append(label)
            self.current = label

        return fn

    def _pop(self, _m, _args, out):
        self.tag(out, self.stack.pop())
        self.current = self.stack[-1]

    def tag(self, tensors, label: str) -> None:
        todo = [t.grad_fn for t in tree_flatten(tensors)[0] if torch.is_tensor(t)]
        while todo:
            node = todo.pop()
            if node is None or self.TAG in node.metadata:
                continue
            node.metadata[self.TAG] = label
            todo += [n for n, _ in node.next_functions]

    def close(self):
        for h in self.handles:
            h.remove()


def run_backward(loss: torch.Tensor, traffic: Traffic) -> int:
    """``loss.backward()`` without autograd's engine (see the module docstring); returns the
    number of nodes run."""
    deps: collections.Counter = collections.Counter()
    seen, todo = {loss.grad_fn}, [loss.grad_fn]
    while todo:
        for nxt, _ in todo.pop().next_functions:
            if nxt is not None:
                deps[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    buffers = {loss.grad_fn: [torch.ones_like(loss)]}
    ready, ran = [loss.grad_fn], 0
    while ready:
        node = ready.pop()
        grads = buffers.pop(node, [])
        traffic.labels.current = node.metadata.get(Labels.TAG, "(unattributed)")
        if node.name() != "torch::autograd::AccumulateGrad":
            grads += [None] * (len(node._input_metadata) - len(grads))
            if hasattr(node, "_forward_cls"):  # a custom Function: its backward, in Python
                outs = node.apply(*grads)
                # one gradient per forward input; ours take their tensors first, then options
                outs, rest = outs[: len(node.next_functions)], outs[len(node.next_functions) :]
                assert all(g is None for g in rest), node
            else:
                # a weight's cast back to fp32 (its next node accumulates the parameter's grad)
                nxt = node.next_functions[0][0] if node.next_functions else None
                cast = node.name() == "ToCopyBackward0" and nxt is not None
                cast = cast and nxt.name() == "torch::autograd::AccumulateGrad"
                traffic.group = "autocast weight casts" if cast else "other"
                outs = node(*grads)
                traffic.group = "other"
            outs = (outs,) if not isinstance(outs, tuple) else outs
            ran += 1
        else:
            outs = ()
        outs += (None,) * (len(node.next_functions) - len(outs))
        for (nxt, nr), g in zip(node.next_functions, outs, strict=True):
            if nxt is None:
                continue
            if g is not None:
                meta = nxt._input_metadata[nr]
                if g.shape != meta.shape:  # the engine reduces a broadcast gradient
                    g = g.sum_to_size(meta.shape)
                if g.dtype != meta.dtype:  # and casts to the input's dtype
                    g = g.to(meta.dtype)
                buf = buffers.setdefault(nxt, [None] * len(nxt._input_metadata))
                if buf[nr] is None:
                    buf[nr] = g
                else:
                    traffic.group = "gradient sums (engine)"
                    buf[nr] = buf[nr] + g
                    traffic.group = "other"
            deps[nxt] -= 1
            if deps[nxt] == 0:
                ready.append(nxt)
    return ran


class CustomFunctionGroups:
    """While the norms' and GEGLU's custom autograd functions run (forward and backward), their
    ops count in a group of their own: the norms' fp32 compute and casts, GEGLU's recompute."""

    def __init__(self, traffic: Traffic):
        from hdvg.t2v import layers

        self.patched = []
        groups = {layers._Norm: "norms (+ SiLU, fp32 casts)", layers._GegluFeedForward: "GEGLU"}
        for cls, group in groups.items():
            for name in ("forward", "backward"):
                fn = getattr(cls, name)
                self.patched.append((cls, name, cls.__dict__[name]))
                setattr(cls, name, staticmethod(self.wrap(fn, group, traffic)))

    @staticmethod
    def wrap(fn, group, traffic):
        def run(*args):
            prev, traffic.group = traffic.group, group
            try:
                return fn(*args)
            finally:
                traffic.group = prev

        return run

    def close(self):
        for cls, name, orig in self.patched:
            setattr(cls, name, orig)


class FusedKernelLaunches:
    """``--kernels triton``: the fused kernels of ``hdvg/t2v/kernels.py`` cannot run on fake
    tensors, so each launch is replaced by the bytes the kernel moves by construction: tensor
    arguments read or written as many times as its passes touch them (group norm forward: the
    input three times -- mean and variance of each part, then normalize -- and the output once;
    backward: input and gradient twice -- the parts' sums, then the input gradient -- and the
    input gradient written once; layer norm: one tile per row, each tensor once;
    GEGLU: each tensor once), the per-channel / per-row statistics and weights once. What the launch would write is left
    unwritten (fake tensors hold no data)."""

    PASSES = {  # kernel -> times per big tensor argument, by position
        "_gn_stats": {0: 2},
        "_gn_fwd": {0: 1, 1: 1},
        "_gn_sums": {0: 1, 1: 1},
        "_gn_bwd": {0: 1, 1: 1, 2: 1},
        "_ln_fwd": {0: 1, 1: 1},
        "_ln_bwd": {0: 1, 1: 1, 2: 1},
        "_geglu_fwd": {0: 1, 1: 1},
        "_geglu_bwd": {0: 1, 1: 1, 2: 1},
    }

    # tensor arguments a launch uses only when its flag is set (else another tensor stands in)
    OPTIONAL = {"_geglu_bwd": {3: "PRODUCT", 4: "BIAS"}}

    def __init__(self, traffic: Traffic):
        from hdvg.t2v import kernels, layers

        self.kernels, self.layers, self.saved = kernels, layers, {}
        for name, passes in self.PASSES.items():
            self.saved[name] = getattr(kernels, name)
            setattr(kernels, name, self.launcher(name, passes, traffic))
        layers.use_kernels("triton")

    @staticmethod
    def launcher(name, passes, traffic):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **flags):
                    nbytes = 0
                    optional = FusedKernelLaunches.OPTIONAL.get(name, {})
                    for i, a in enumerate(args):
                        if torch.is_tensor(a) and flags.get(optional.get(i), True):
                            nbytes += passes.get(i, 1) * span_bytes(a)
                    key = (traffic.phase, f"triton {name}", traffic.labels.current)
                    traffic.bytes[key] += nbytes
                    traffic.calls[key] += 1
                    kind = "GEGLU" if "geglu" in name else "norms"
                    traffic.by_group[f"{kind} (fused Triton kernels)"] += nbytes

                return run

        return Launch()

    def close(self):
        for name, fn in self.saved.items():
            setattr(self.kernels, name, fn)
        self.layers.use_kernels("aten")


def measure(args) -> dict:
    mode = FakeTensorMode()
    with torch.device("meta"):
        model = build("hdvg", args.width)
    if args.channels_last:  # on the meta weights: the fake ones below keep their strides
        from hdvg.t2v.unet import to_channels_last

        to_channels_last(model)
    fake_cuda_model(model, mode)
    params = sum(p.numel() for p in model.parameters())
    labels = Labels(model)
    traffic = Traffic(labels)
    grouped = CustomFunctionGroups(traffic)
    fused = FusedKernelLaunches(traffic) if args.kernels == "triton" else None
    paths: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    with mode, cuda_autocast_and_sdpa(paths):
        x, t, text = inputs(args.batch, args.frames, args.latent, "cuda")
        if args.channels_last:
            from hdvg.t2v.unet import channels_last_input

            x = channels_last_input(x)  # as bench_t2v.py --channels-last feeds it
        target = torch.empty_like(x)
        with traffic:
            pred = model(x, t, text)  # autocast is on (cuda_autocast_and_sdpa's flags)
            labels.tag(pred, "(top)")
            with torch.autocast("cuda", enabled=False):
                loss = F.mse_loss(pred.float(), target)
            labels.tag(loss, "(loss)")
            traffic.phase = "bwd"
            with torch.no_grad():  # as the engine runs backward without create_graph
                nodes = run_backward(loss, traffic)
    labels.close()
    grouped.close()
    if fused:
        fused.close()
    wall = time.perf_counter() - t0

    by_op: collections.Counter = collections.Counter()
    by_phase_op: collections.Counter = collections.Counter()
    by_label: collections.Counter = collections.Counter()
    by_block: collections.Counter = collections.Counter()
    by_label_op: collections.Counter = collections.Counter()
    calls_op: collections.Counter = collections.Counter()
    for (phase, op, label), b in traffic.bytes.items():
        by_op[op] += b
        by_phase_op[f"{op} ({phase})"] += b
        by_label[label] += b
        by_block[label.split("/")[0]] += b
        by_label_op[f"{label} :: {op} ({phase})"] += b
        calls_op[op] += traffic.calls[(phase, op, label)]
    total = sum(by_op.values())
    flops = sum(traffic.flops.values())
    gb = lambda c: {k: round(v / GB, 2) for k, v in c.most_common(args.top)}  # noqa: E731
    return {
        "batch": args.batch,
        "frames": args.frames,
        "latent": args.latent,
        "width": args.width,
        "kernels": args.kernels,
        "channels_last": args.channels_last,
        "params": params,
        "nonmatmul_gb": round(total / GB, 2),
        "nonmatmul_gb_fwd": round(
            sum(b for (p, _, _), b in traffic.bytes.items() if p == "fwd") / GB, 2
        ),
        "nonmatmul_kernel_ops": sum(traffic.calls.values()),
        "nonmatmul_gb_by_group": {k: round(v / GB, 2) for k, v in traffic.by_group.most_common()},
        "matmul_tflop": round(flops / 1e12, 2),
        "flop_per_nonmatmul_byte": round(flops / total, 1),
        "adamw_gb": round(params * 4 * 7 / GB, 2),  # fused AdamW: reads p, g, m, v; writes p, m, v
        "sdpa_calls": dict(paths),
        "backward_nodes": nodes,
        "top_ops_gb": gb(by_op),
        "top_ops_calls": {k: calls_op[k] for k, _ in by_op.most_common(args.top)},
        "top_ops_by_phase_gb": gb(by_phase_op),
        "blocks_gb": gb(by_block),
        "top_modules_gb": gb(by_label),
        "top_module_ops_gb": gb(by_label_op),
        "matmul_tflop_by_op": {k: round(v / 1e12, 2) for k, v in traffic.flops.most_common()},
        "wall_s": round(wall, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=320, help="level-0 width; levels x[1,2,4,4]")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument(
        "--kernels", default="aten", choices=["aten", "triton"],
        help="norms and GEGLU as eager aten ops, or the fused Triton kernels (counted, not run)",
    )  # fmt: skip
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC model and input (`to_channels_last`), as bench_t2v.py's flag")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    row = measure(args)
    print(json.dumps(row, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
