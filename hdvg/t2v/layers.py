"""Attention and normalization building blocks of the U-Net, written for GPU memory and kernels.

Parameter names follow diffusers, so its checkpoints load (``to_q``/``to_k``/``to_v`` are fused
on load, see :class:`Attention`). What differs from a plain ``nn.Module`` stack, and why
(measured by ``benchmarks/t2v_memory.py``: bytes autograd keeps for backward per sample):

- **Norms keep their bf16 input only.** CUDA autocast runs group/layer norm in fp32: autograd
  then keeps an fp32 copy of the norm's input (2x a bf16 tensor), the fp32 output (for a
  following SiLU) and, for every matmul after it, a separate bf16 cast of that output.
  :class:`_Norm` computes the same fp32 numbers and returns them in bf16 (where the next
  matmul would have cast them), keeping just the bf16 input and the statistics; a SiLU
  after a group norm is folded in and the norm recomputed in backward (one memory-bound
  kernel). Outside autocast they are the plain ops, bit for bit.
- **GEGLU + output projection keep one tensor.** ``h * gelu(gate)`` and the ``Linear`` after
  it would keep the projection, ``gelu(gate)`` and the product; :class:`_GegluFeedForward`
  keeps the projection only (and the block's input, as the first ``Linear`` would) and
  recomputes the rest in backward.
- **Fused projections.** Self-attention runs one ``to_qkv`` matmul (one kept input, one
  kernel, instead of three of each); cross-attention one ``to_kv`` on the context.
- **No masks, head dim 64, last dim contiguous**, so SDPA takes the flash kernel on a GPU;
  ``q``/``k``/``v`` are strided views of the fused projection, which flash accepts as is.
- **Fused kernels, opt-in** (``train.kernels: triton``, :func:`use_kernels`): on CUDA the norms
  (+ SiLU) and GEGLU run the Triton kernels of :mod:`hdvg.t2v.kernels` (bf16 read once per
  pass, fp32 inside, strided layouts read and written in place); the eager paths here stay
  the default and the fallback for anything those kernels do not take.
- **Layouts chosen for the next kernel, not copied into** (``benchmarks/t2v_traffic.py``:
  bytes moved by non-matmul kernels per step). A norm's output cast writes the layout its
  consumer views (attention tokens), its input and gradient go to contiguous fp32 in one
  cast, residual adds read the token / window layouts as strided views, and the qkv split
  lets its backward's ``stack`` write the projection's layout directly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

aten = torch.ops.aten


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls around ``x`` run in: autocast's, else ``x``'s own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


_weight_casts: dict | None = None  # (id, dtype) -> (tensor, version, cast), in cached_casts()


@contextlib.contextmanager
def cached_casts():
    """Inside this context, without grad, the weights the U-Net casts itself (the fused
    feed-forward's) are cast once, as autocast's own cache does for every other layer
    until its context exits: a sampler casts each weight once per video, not once per
    denoising step. An in-place update of a weight (its version) invalidates its cast."""
    global _weight_casts
    outer, _weight_casts = _weight_casts, {}
    try:
        yield
    finally:
        _weight_casts = outer


def cast_weight(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, from the :func:`cached_casts` cache when one is open and grad is off."""
    cache = _weight_casts
    if cache is None or t.dtype == dtype or torch.is_grad_enabled():
        return t.to(dtype)
    key = (id(t), dtype)  # the entry holds `t`, so no other tensor takes its id meanwhile
    hit = cache.get(key)
    if hit is None or hit[1] != t._version:
        hit = cache[key] = (t, t._version, t.to(dtype))
    return hit[2]


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4D tensor laid out NHWC in memory (and not also NCHW, as when H = W = 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _Norm(torch.autograd.Function):
    """Group or layer norm (optionally + SiLU) that keeps only its input and the statistics.

    Under CUDA autocast it computes in fp32 and returns the autocast dtype -- the numbers
    autocast's fp32 norm produces once the next matmul casts them -- but keeps the bf16
    input, not an fp32 copy, and nothing of its output (the consumer keeps that; with SiLU
    the norm is recomputed in backward). Under CPU autocast (which runs norms in the input's
    dtype) and outside autocast it computes what the plain op computes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: tuple, silu: bool, nd: torch.dtype, out_dtype, perm):
        y, mean, rstd = _norm_fwd(_dense(x, nd), _up(weight, nd), _up(bias, nd), spec)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.spec, ctx.silu, ctx.nd = spec, silu, nd
        y = F.silu(y) if silu else y
        if perm is None:
            return y.to(out_dtype)
        # the cast writes the layout the consumer reads (e.g. tokens): its permute-copy is saved
        out = y.permute(perm).to(out_dtype, memory_format=torch.contiguous_format)
        return out.permute(sorted(range(len(perm)), key=perm.__getitem__))

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        nd, spec = ctx.nd, ctx.spec
        xn, wn, bn = _dense(x, nd), _up(weight, nd), _up(bias, nd)
        if ctx.silu:  # recompute the norm's output instead of having kept it
            y = _norm_fwd(xn, wn, bn, spec)[0]
            # the gradient read in its own dtype, upcast on load (exact: the same fp32 numbers
            # as a cast first, without the cast's pass); written over y. Contiguous, as CPU
            # kernels round strided operands differently (scalar, not vector, exp)
            gy = aten.silu_backward.grad_input(grad.contiguous(), y, grad_input=y)
        else:  # one pass from the consumer's layout (tokens, windows) and dtype
            gy = _dense(grad, nd)
        mask = list(ctx.needs_input_grad[:3])
        if spec[0] == "group":
            _, n, c, hw, groups, _ = spec
            gx, gw, gb = aten.native_group_norm_backward(
                gy, xn, mean, rstd, wn, n, c, hw, groups, mask
            )
        else:
            gx, gw, gb = aten.native_layer_norm_backward(gy, xn, spec[1], mean, rstd, wn, bn, mask)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(gx, x), cast(gw, weight), cast(gb, bias), None, None, None, None, None


def _dense(x: torch.Tensor, nd: torch.dtype) -> torch.Tensor:
    """``x`` in ``nd``, contiguous, as the CUDA norm kernels take it: one copy-cast, not a
    cast that keeps a permuted layout and then a contiguous copy (none when it already is).
    In its own dtype ``to`` would hand back a permuted (B, H, W, F, C) view as it is (its
    suggested layout is "contiguous"), which CUDA's group norm refuses: hence ``contiguous``."""
    if x.dtype == nd:
        return x.contiguous()
    return x.to(nd, memory_format=torch.contiguous_format)


def _up(p: torch.Tensor, nd: torch.dtype) -> torch.Tensor:
    """Norm weights go up to fp32 with the input; else they stay (CPU kernels take mixed)."""
    return p.to(nd) if nd == torch.float32 else p


def _norm_fwd(x, weight, bias, spec):
    """``x``: contiguous (:func:`_dense`), as CUDA's kernels take it."""
    if spec[0] == "group":
        _, n, c, hw, groups, eps = spec
        return aten.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
    return aten.native_layer_norm(x, spec[1], weight, bias, spec[2])


def _apply_norm(x: torch.Tensor, weight, bias, spec: tuple, silu: bool, perm=None) -> torch.Tensor:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # as autocast: CUDA's runs norms in fp32, the CPU's not
        nd = x.dtype if dev == "cpu" else torch.float32
        out_dtype = torch.get_autocast_dtype(dev)
    else:
        nd = out_dtype = x.dtype
    with torch.autocast(dev, enabled=False):
        y = _triton_norm(x, weight, bias, spec, silu, out_dtype, perm)
        if y is not None:
            return y
        if torch.compiler.is_compiling() or _compiled_norm is not None:
            fn = _plain_norm if torch.compiler.is_compiling() else _compiled_norm
            groups = spec[4] if spec[0] == "group" else 0  # 0: layer norm over the last dim
            return fn(x, weight, bias, groups, spec[-1], silu, nd, out_dtype)
        return _Norm.apply(x, weight, bias, spec, silu, nd, out_dtype, perm)


def _plain_norm(x, weight, bias, groups: int, eps: float, silu: bool, nd, out_dtype):
    """The same numbers as :class:`_Norm` from plain ops, for torch.compile: inductor fuses the
    casts, the norm and the SiLU into one kernel for any memory layout (channels-last too,
    where CUDA's eager group norm copies to NCHW), and its partitioner chooses what backward
    keeps and what it recomputes, so the custom backward has nothing left to add there."""
    w, b = _up(weight, nd), _up(bias, nd)
    if groups:
        y = F.group_norm(x.to(nd), groups, w, b, eps)
    else:
        y = F.layer_norm(x.to(nd), x.shape[-1:], w, b, eps)
    return (F.silu(y) if silu else y).to(out_dtype)


_compiled_norm = None  # set by compile_norms
_kernels = "aten"  # set by use_kernels


def use_kernels(kind: str = "aten") -> None:
    """``"triton"``: on CUDA tensors the group / layer norms (+ SiLU) and GEGLU run the fused
    kernels of :mod:`hdvg.t2v.kernels` (one bf16 read per pass, fp32 inside; layouts they do
    not take keep the aten path); ``"aten"``: :class:`_Norm` and :class:`_GegluFeedForward`'s eager
    ops. Process-wide, like :func:`compile_norms`."""
    global _kernels
    if kind not in ("aten", "triton"):
        raise ValueError(f"kernels must be aten or triton, not {kind!r}")
    if kind == "triton":
        from hdvg.t2v import kernels

        if not kernels.available():
            raise RuntimeError("train.kernels: triton needs the triton package")
    _kernels = kind


def _triton_for(x: torch.Tensor):
    """:mod:`hdvg.t2v.kernels` when they are on and can run on ``x``, else None."""
    if _kernels != "triton" or torch.compiler.is_compiling():
        return None
    from hdvg.t2v import kernels

    return kernels if (x.is_cuda or kernels.interpreting()) else None


def _triton_norm(x, weight, bias, spec, silu, out_dtype, perm):
    kernels = _triton_for(x)
    if kernels is None or weight is None or bias is None:  # the kernels take affine norms
        return None
    if spec[0] == "group":
        _, _, _, _, groups, eps = spec
        return kernels.group_norm(x, weight, bias, groups, eps, silu, out_dtype, perm)
    if len(spec[1]) != 1 or silu:
        return None
    return kernels.layer_norm(x, weight, bias, spec[2], out_dtype)


def compile_norms(enable: bool = True, **compile_kwargs) -> None:
    """Run every group / layer norm (+ SiLU) of an otherwise eager model through one
    ``torch.compile``-d function: the norms fused into a kernel or two each, in any memory
    layout, for the compile time of small graphs (``dynamic=True``: one graph per norm kind,
    rank, layout and channel count -- group norm specializes on channels -- ~9 in the tiny
    U-Net), not ~30 block graphs. ``enable=False`` goes back to :class:`_Norm`."""
    global _compiled_norm
    compile_kwargs.setdefault("dynamic", True)
    if enable:  # past dynamo's default limit (8) the other norms ran eager (one log line)
        raise_recompile_limit()
    _compiled_norm = torch.compile(_plain_norm, **compile_kwargs) if enable else None


def raise_recompile_limit(limit: int = 64) -> None:
    """Let dynamo keep ``limit`` compiled variants of one function (a norm kind, rank, layout
    and channel count each; a block class and shape each under regional compile): past its
    default of 8 it runs the function eagerly from then on, with one log line."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name moved in torch 2.7
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def group_norm(
    norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False, perm: tuple | None = None
) -> torch.Tensor:
    """``norm(x)`` (then SiLU if asked), keeping one tensor for backward: see :class:`_Norm`.

    ``perm``: the output is laid out as ``x.permute(perm)`` contiguous (same shape and values),
    for a consumer that views it in that order; the compiled paths ignore it."""
    n, c = x.shape[:2]
    spec = ("group", n, c, x[0, 0].numel(), norm.num_groups, norm.eps)
    return _apply_norm(x, norm.weight, norm.bias, spec, silu, perm)


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm(norm, x, silu=True)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` keeping only its input for backward: see :class:`_Norm`."""
    spec = ("layer", list(norm.normalized_shape), norm.eps)
    return _apply_norm(x, norm.weight, norm.bias, spec, False)


# attention calls by what they attend over: spatial self-attention (tokens of a frame), text
# cross-attention, temporal self-attention (a pixel's frames), swap windows (frames x h x w)
ATTENTION_KINDS = ("spatial", "cross", "temporal", "swap")
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# ... and "triton": hdvg.t2v.kernels.short_attention, several short sequences packed per tile
# (a pixel's frames), SDPA's own choice for calls it does not take
ATTENTION_BACKENDS = (*SDPA_BACKENDS, "triton")
_attention_backends: dict[str, list | str] = {}  # set by use_attention_backends


def use_attention_backends(choice: dict[str, str] | None = None) -> None:
    """The attention backend of each kind of call (:data:`ATTENTION_KINDS` -> a name of
    :data:`ATTENTION_BACKENDS`, e.g. ``{"temporal": "triton"}``): an SDPA backend, or the
    short-sequence Triton kernel (CUDA tensors; SDPA for calls it declines); kinds not named
    keep SDPA's own choice (flash where it applies). ``benchmarks/bench_attention.py`` times
    every call of the U-Net under each and prints the fastest per kind. Process-wide, like
    :func:`use_kernels`. Under torch.compile the SDPA choices are ignored (inductor picks);
    ``"triton"`` holds (the kernel is a custom op, opaque to the compiler)."""
    choice = dict(choice or {})
    error = attention_backends_error(choice)
    if error:
        raise ValueError(error)
    _attention_backends.clear()
    for kind, name in choice.items():
        _attention_backends[kind] = name if name == "triton" else [SDPA_BACKENDS[name]]


def attention_backends_error(choice: dict[str, str]) -> str | None:
    """What is wrong with a kind -> backend mapping (the first thing), or None."""
    for kind, name in choice.items():
        if kind not in ATTENTION_KINDS:
            return f"attention kind must be one of {ATTENTION_KINDS}, not {kind!r}"
        if name not in ATTENTION_BACKENDS:
            return f"attention backend must be one of {ATTENTION_BACKENDS}, not {name!r}"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` on the SDPA backend chosen for ``kind``."""
    choice = _attention_backends.get(kind)
    if not isinstance(choice, list) or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(choice):
        return F.scaled_dot_product_attention(q, k, v)


def _short_attention(proj: torch.Tensor, heads: int, kind: str) -> torch.Tensor | None:
    """The fused projection's self-attention by :func:`hdvg.t2v.kernels.short_self_attention`
    when ``kind`` is set to ``"triton"`` and the kernel takes it, else None."""
    if _attention_backends.get(kind) != "triton":  # custom ops: compiled models keep it too
        return None
    from hdvg.t2v import kernels

    if not kernels.available() or not (proj.is_cuda or kernels.interpreting()):
        return None
    return kernels.short_self_attention(proj, heads)


class Attention(nn.Module):
    """Multi-head attention through SDPA; ``cross=False`` is self-attention.

    Self-attention holds one fused ``to_qkv`` projection, cross-attention ``to_q`` and a fused
    ``to_kv``; a diffusers / ModelScope state dict with separate ``to_q``/``to_k``/``to_v``
    is fused on load (:meth:`_fuse_on_load`), so checkpoints of either layout load.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        cross=None,
        kind: str = "spatial",
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.kind = kind  # one of ATTENTION_KINDS: which attention backend it uses
        self.cross = context_dim is not None if cross is None else cross
        if self.cross:
            self.to_q = nn.Linear(dim, inner, bias=False)
            self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.register_load_state_dict_pre_hook(self._fuse_on_load)

    @staticmethod
    def _fuse_on_load(module, state_dict, prefix, *_):
        names = ["to_k", "to_v"] if module.cross else ["to_q", "to_k", "to_v"]
        keys = [f"{prefix}{n}.weight" for n in names]
        if all(k in state_dict for k in keys):
            fused = "to_kv" if module.cross else "to_qkv"
            state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.heads
        if self.cross:
            ctx = x if context is None else context
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=h)  # (B, h, N, d)
            k, v = _heads(self.to_kv(ctx), 2, h)
            out = attention(q, k, v, self.kind)  # (B, h, N, d)
        else:
            proj = self.to_qkv(x)  # (B, N, 3*h*d)
            out = _short_attention(proj, h, self.kind)  # the Triton kernel, if chosen and taken
            if out is None:
                out = attention(*_heads(proj, 3, h), self.kind)  # (B, h, N, d)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))  # (B, N, C)


def _heads(proj: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """``(B, N, parts*h*d)`` -> ``parts`` strided ``(B, h, N, d)`` views (last dim contiguous, as
    flash takes them), split on the dim whose backward ``stack`` writes the projection's
    layout: one copy of the gradients, not a stack and then a permute-copy."""
    split = rearrange(proj, "b n (p h d) -> b n p h d", p=parts, h=heads)
    return tuple(t.transpose(1, 2) for t in split.unbind(2))


class _GegluFeedForward(torch.autograd.Function):
    """``linear(h * gelu(gate), wo, bo)`` for ``h, gate = linear(x, wp, bp).chunk(2, -1)``,
    keeping ``x`` and the projection ``a`` only (the product is recomputed in backward).
    With ``use_kernels("triton")`` the product is one fused kernel, and so is ``a``'s
    gradient, which also writes the recomputed product and sums the projection's bias
    gradient on the way (one read of ``a`` in backward, not three); else eager ops. The
    matmuls are the ones autograd would run for the two ``Linear`` layers, in ``x``'s dtype
    (the caller casts under autocast), so the eager path's values and gradients are those of
    the plain modules."""

    @staticmethod
    def forward(ctx, x, wp, bp, wo, bo):
        a = F.linear(x, wp, bp)  # (..., 2I)
        kernels = _triton_for(a)
        prod = kernels.geglu(a) if kernels else None
        ctx.fused = prod is not None
        if prod is None:
            hid, gate = a.chunk(2, dim=-1)
            prod = hid * F.gelu(gate)
        ctx.save_for_backward(x, a, wp, wo)
        ctx.biases = bp is not None, bo is not None
        return F.linear(prod, wo, bo)

    @staticmethod
    def backward(ctx, grad):
        x, a, wp, wo = ctx.saved_tensors
        need_x, need_wp, need_bp, need_wo, need_bo = ctx.needs_input_grad
        need_bp, need_bo = need_bp and ctx.biases[0], need_bo and ctx.biases[1]
        g2 = grad.reshape(-1, grad.shape[-1])  # (T, C)
        gbo = g2.sum(0) if need_bo else None
        gy = grad.matmul(wo)  # (..., I)
        i = gy.shape[-1]
        if ctx.fused:
            from hdvg.t2v import kernels

            ga, prod, gbp = kernels.geglu_backward(a, gy, product=need_wo, bias=need_bp)
            gbp = gbp.to(a.dtype) if need_bp else None  # summed in fp32 by the kernel
        else:
            hid, gate = a.chunk(2, dim=-1)
            gelu = F.gelu(gate)  # recomputed: (..., I)
            prod = hid * gelu if need_wo else None
            ga = torch.empty_like(a)
            torch.mul(gy, gelu, out=ga[..., :i])
            aten.gelu_backward.grad_input(gy * hid, gate, grad_input=ga[..., i:])
            gbp = ga.reshape(-1, 2 * i).sum(0) if need_bp else None
        gwo = g2.t().mm(prod.reshape(-1, i)) if need_wo else None
        ga2 = ga.reshape(-1, 2 * i)  # (T, 2I)
        gwp = ga2.t().mm(x.reshape(-1, x.shape[-1])) if need_wp else None
        gx = ga.matmul(wp) if need_x else None
        return gx, gwp, gbp, gwo, gbo


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward (diffusers ``FeedForward``); see :class:`_GegluFeedForward`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj, out = self.net[0].proj, self.net[2]
        if torch.compiler.is_compiling():  # inductor fuses h * gelu(gate) and picks what to keep
            h, gate = proj(x).chunk(2, dim=-1)
            return out(h * F.gelu(gate))  # (B, N, C)
        dt = compute_dtype(x)
        ws = (proj.weight, proj.bias, out.weight, out.bias)
        w = [cast_weight(t, dt) for t in ws]  # as autocast would, cached as its casts are
        with torch.autocast(x.device.type, enabled=False):
            return _GegluFeedForward.apply(x.to(dt), *w)  # (B, N, C)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attn, then attn2 (text cross-attn, or a second self-attn), then FF.

    diffusers' ``BasicTransformerBlock`` with ``norm_type="layer_norm"``; its temporal variant
    (``double_self_attention=True``) runs attn2 as self-attention too.
    """

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int | None, kind: str = "spatial"
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, kind=kind)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            dim, heads, head_dim, context_dim, kind="cross" if context_dim else kind
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(layer_norm(self.norm1, x))  # (B, N, C)
        x = x + self.attn2(layer_norm(self.norm2, x), context)  # (B, N, C)
        return x + self.ff(layer_norm(self.norm3, x))  # (B, N, C)


class SpatialTransformer(nn.Module):
    """Per-frame spatial self-attention + text cross-attention (diffusers ``Transformer2DModel``,
    linear projections, one block)."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, head_dim, context_dim)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape  # (BF, C, H, W)
        t = group_norm(self.norm, x, perm=(0, 2, 3, 1))  # laid out (n h w c): tokens by a view
        t = rearrange(t, "n c h w -> n (h w) c")  # (BF, HW, C)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)  # context: (BF, L, D)
        t = self.proj_out(t)
        return x + rearrange(t, "n (h w) c -> n c h w", h=h, w=w)  # (BF, C, H, W)


class TemporalTransformer(nn.Module):
    """Self-attention along frames at every pixel (diffusers ``TransformerTemporalModel``).

    The group norm spans (frames, h, w) of each video, as in diffusers. Its output cast writes
    the tokens' ``(B*H*W, F, C)`` layout (the ``proj_in`` matmul's input, no extra copy); SDPA
    sees ``(B*H*W, heads, F, 64)``; the residual add reads ``proj_out``'s token layout as a
    strided view, not through a copy back to ``(B*F, C, H, W)``.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, None, kind="temporal")]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        _, _, h, w = x.shape  # (BF, C, H, W)
        v = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)  # (B, C, F, H, W), a view
        t = group_norm(self.norm, v, perm=(0, 3, 4, 2, 1))  # laid out (b h w f c)
        t = self.proj_in(rearrange(t, "b c f h w -> (b h w) f c"))  # (BHW, F, C)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        # the add's output takes x's layout (NCHW or channels-last), so the folds are views
        out = rearrange(x, "(b f) c h w -> b f c h w", f=num_frames)
        out = out + rearrange(t, "(b h w) f c -> b f c h w", h=h, w=w)  # (B, F, C, H, W)
        return rearrange(out, "b f c h w -> (b f) c h w")
