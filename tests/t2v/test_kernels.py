"""The fused Triton norm and GEGLU kernels (``hdvg/t2v/kernels.py``), run on the CPU by
Triton's interpreter: the same kernel code the GPU compiles, with fp32 arithmetic on bf16
loads. On a machine with a GPU the same tests run the compiled kernels on CUDA tensors.

Each case compares values and all three gradients with the plain aten ops, on the layouts the
U-Net hands the norms (contiguous NCHW / NCFHW, a frames-major strided NCFHW, outputs written
in the consumer's ``perm`` layout, strided rows); the U-Net test runs a whole forward and
backward with every norm it can take on the kernels. (On the GPU: tests/t2v/test_gpu.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")


@pytest.fixture
def kernels():
    """hdvg.t2v.kernels, its kernels compiled for the GPU or, without one, run by Triton's
    interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported)."""
    import hdvg.t2v.kernels as mod

    if not torch.cuda.is_available():
        assert mod.interpreting(), "TRITON_INTERPRET=1 must be set before triton is imported"
    with torch.device(DEV):
        yield mod


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, g, leaves):
    out.backward(g)
    return [t.grad for t in leaves]


GROUP_CASES = [
    # shape, groups, silu, perm, layout of x (a function of a contiguous tensor)
    ((2, 8, 5, 6), 4, True, None, lambda t: t),  # res-block: NCHW, SiLU folded in
    ((2, 8, 3, 4, 4), 2, True, None, lambda t: t),  # temporal conv: NCFHW
    # temporal transformer: frames-major memory (B, F, C, H, W) seen as NCFHW, output laid
    # out (b h w f c) for the temporal tokens
    (
        (2, 12, 3, 4, 5),
        3,
        False,
        (0, 3, 4, 2, 1),
        lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    ),  # fmt: skip
    ((3, 6, 4, 4), 3, False, (0, 2, 3, 1), lambda t: t),  # spatial transformer: (n h w c) tokens
    ((2, 6, 4, 4), 2, True, None, lambda t: t.contiguous(memory_format=torch.channels_last)),
]


# how a group's spatial span is cut into parts (programs), as (TILE, GN_PROGRAMS): one part
# (these small groups are one tile), a part per tile, two parts of several tiles each (the
# first case's last tile and last part are short: 30 = 7 x 4 + 2 = 16 + 14)
SPLITS = {"one_part": (4096, 1), "tile_parts": (8, 1024), "two_parts": (8, None)}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("shape,groups,silu,perm,layout", GROUP_CASES)
def test_group_kernels_matches_aten(kernels, monkeypatch, split, shape, groups, silu, perm, layout):
    tile, programs = SPLITS[split]
    monkeypatch.setattr(kernels, "TILE", tile)
    monkeypatch.setattr(kernels, "GN_PROGRAMS", programs or 2 * shape[0] * groups)
    n_groups, s = shape[0] * groups, math.prod(shape[2:])
    bs = kernels._group_tiles(shape[1] // groups, s)[1]
    chunk, parts = kernels._group_split(n_groups, s, bs)
    assert parts == {"one_part": 1, "tile_parts": -(-s // bs), "two_parts": 2}[split]
    assert (chunk == bs) == (split == "tile_parts") or parts == 1
    torch.manual_seed(0)
    x = layout(torch.randn(shape) * 3 + 1)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    leaves, ref = _leaves(x, w, b), _leaves(x, w, b)
    got = kernels.group_norm(*leaves, groups, 1e-5, silu, torch.float32, perm)
    want = F.group_norm(ref[0], groups, ref[1], ref[2], 1e-5)
    want = F.silu(want) if silu else want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if perm is None:
        assert got.stride() == x.stride()  # written in the input's own layout
    else:
        assert got.permute(perm).is_contiguous()
    # the consumer's gradient arrives in its own layout (here: a transposed copy)
    g = torch.randn(shape).transpose(-1, -2).contiguous().transpose(-1, -2)
    for a, r in zip(_grads(got, g, leaves), _grads(want, g, ref), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_group_kernels_bf16_as_cuda_autocast(kernels):
    """bf16 in, bf16 out, fp32 statistics: what CUDA autocast's fp32 norm gives once cast."""
    torch.manual_seed(0)
    x = (torch.randn(2, 8, 4, 6) * 2 + 3).bfloat16()
    w, b = torch.randn(8), torch.randn(8)
    got = kernels.group_norm(x, w, b, 4, 1e-5, True, torch.bfloat16)
    want = F.silu(F.group_norm(x.float(), 4, w, b, 1e-5))
    assert got.dtype == torch.bfloat16
    # the fp32 result rounded once to bf16 (summation order differs from aten's): to nearest
    # on the GPU, half an ulp; the interpreter's cast truncates, a whole ulp
    rel = 2**-8 + 2**-16 if DEV == "cuda" else 2**-7  # (+ the fp32 sums order)
    assert ((got.float() - want).abs() <= want.abs() * rel + 1e-6).all()
    assert (got.float() - want).abs().max() > 0  # it did round: bf16 output, not fp32


def test_layer_kernels_matches_aten(kernels):
    torch.manual_seed(0)
    from hdvg.t2v.swap import window_view

    # contiguous tokens; every other token of a larger tensor (rows merge to one stride); the
    # swap windows' view of (B*F, C, H, W) frames: (B, nF, nH, nW, wf, wh, ww, C), C strided
    windows = window_view(torch.randn(2 * 4, 12, 4, 6), 4, (2, 2, 3))
    for x in (torch.randn(4, 5, 16) * 2, (torch.randn(3, 8, 10) + 1)[:, ::2], windows):
        w, b = torch.randn(x.shape[-1]), torch.randn(x.shape[-1])
        leaves, ref = _leaves(x, w, b), _leaves(x, w, b)
        got = kernels.layer_norm(*leaves, 1e-5, torch.float32)
        want = F.layer_norm(ref[0], x.shape[-1:], ref[1], ref[2], 1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous()  # rows for the next matmul
        g = torch.randn(x.shape)
        for a, r in zip(_grads(got, g, leaves), _grads(want, g, ref), strict=True):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tile", [4096, 32], ids=["row_per_program", "rows_per_program"])
def test_geglu_kernel_matches_aten(kernels, monkeypatch, tile):
    """``h * gelu(gate)`` and the gradient of its input, one kernel each (fp32 inside); the
    backward also writes the recomputed product and sums the bias gradient when asked: 15
    rows in programs of one row each, or of 8 rows in tiles of one (the last program short)."""
    monkeypatch.setattr(kernels, "TILE", tile)
    monkeypatch.setattr(kernels, "ROW_PROGRAMS", 256 if tile == 4096 else 2)
    torch.manual_seed(0)
    a = torch.randn(3, 5, 2 * 24) * 2
    ref = a.clone().requires_grad_()
    hid, gate = ref.chunk(2, dim=-1)
    want = hid * F.gelu(gate)
    got = kernels.geglu(a)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape)
    want.backward(g)
    grad_a, prod, grad_bias = kernels.geglu_backward(a, g)
    torch.testing.assert_close(grad_a, ref.grad, rtol=1e-5, atol=1e-5)
    assert prod is None and grad_bias is None
    grad_a, prod, grad_bias = kernels.geglu_backward(a, g, product=True, bias=True)
    torch.testing.assert_close(grad_a, ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prod, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_bias, ref.grad.sum((0, 1)), rtol=1e-5, atol=1e-5)
    # bf16 in and out, one rounding of the fp32 product (the interpreter truncates: an ulp)
    got = kernels.geglu(a.bfloat16())
    exact = a.bfloat16().float().chunk(2, -1)
    exact = exact[0] * F.gelu(exact[1])
    assert got.dtype == torch.bfloat16
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()
    assert kernels.geglu(a.transpose(0, 1)) is None  # not contiguous: the eager path


def test_layouts_the_kernels_do_not_take_are_declined(kernels):
    """None (the caller keeps aten) for rows over more than six strided dims, spatial dims
    that do not merge to two, and inputs with gaps in memory."""
    w = torch.randn(10)

    def rows(k):  # k row dims, none of which merge (reversed), C last
        return torch.randn(*[2] * k, 10).permute(*range(k - 1, -1, -1), k)

    assert kernels.layer_norm(rows(7), w, w, 1e-5, torch.float32) is None
    assert kernels.layer_norm(rows(6), w, w, 1e-5, torch.float32) is not None
    assert kernels.layer_norm(rows(6)[1:], w, w, 1e-5, torch.float32) is None  # gaps
    x = torch.randn(2, 10, 3, 4, 5).permute(0, 1, 3, 2, 4)  # spatial (4, 3, 5): no merge
    assert kernels.group_norm(x, w, w, 2, 1e-5, False, torch.float32) is None
    x = torch.randn(2, 10, 8, 8)[..., ::2]  # gaps in memory: no shared layout with its grads
    assert kernels.group_norm(x, w, w, 2, 1e-5, False, torch.float32) is None
    assert kernels.group_norm(x.contiguous(), w, w, 2, 1e-5, False, torch.float32) is not None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_unet_with_triton_norms_matches_aten(kernels, monkeypatch, channels_last):
    """A whole tiny U-Net forward + backward with ``train.kernels: triton``: aten's output
    and every parameter's gradient, with every norm and every GEGLU on the kernels; NCHW, and
    channels-last (``to_channels_last``: the norms read and write NHWC as they find it).
    Small tiles: the larger groups run in several parts, as the paper-size temporal norms do."""
    monkeypatch.setattr(kernels, "TILE", 128)
    monkeypatch.setattr(kernels, "GN_PROGRAMS", 8)  # 2 to 4 parts: few interpreted programs
    parts = []
    real_split = kernels._group_split
    monkeypatch.setattr(
        kernels, "_group_split", lambda *a: parts.append(real_split(*a)) or parts[-1]
    )
    from hdvg.t2v import layers
    from hdvg.t2v.layers import FeedForward
    from hdvg.t2v.swap import SwapAttention
    from hdvg.t2v.unet import SwapUNet, channels_last_input, to_channels_last
    from tests.t2v.test_model import tiny_cfg

    torch.manual_seed(0)  # 2 groups and a 2-frame 4x4 latent: few interpreted programs
    model = SwapUNet(tiny_cfg(temporal_conv_dropout=0.0, norm_num_groups=2)).train()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv3d, SwapAttention)):  # every branch carries values
            for p in m.parameters():
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.1)
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 32)
    if channels_last:
        model, x = to_channels_last(model), channels_last_input(x)
    want = model(x, 10, text)
    want.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ran, declined = [], []  # norm kinds the kernels took / left to aten
    real = layers._triton_norm

    nhwc = []  # group norms handed an NHWC (B*F, C, H, W)

    def spy(x, weight, bias, spec, *rest):
        y = real(x, weight, bias, spec, *rest)
        (declined if y is None else ran).append(spec[0])
        if x.dim() == 4 and layers.is_channels_last(x):
            nhwc.append(y is not None and y.stride() == x.stride())
        return y

    gegl = []  # GEGLU launches: ("fwd", ()) and ("bwd", (product, bias))
    real_geglu, real_geglu_bwd = kernels.geglu, kernels.geglu_backward

    def spy_geglu(a):
        gegl.append(("fwd", ()))
        return real_geglu(a)

    def spy_geglu_bwd(a, g, product=False, bias=False):
        gegl.append(("bwd", (product, bias)))
        return real_geglu_bwd(a, g, product, bias)

    layers.use_kernels("triton")
    layers._triton_norm, kernels.geglu = spy, spy_geglu
    monkeypatch.setattr(kernels, "geglu_backward", spy_geglu_bwd)
    try:
        got = model(x, 10, text)
        got.square().mean().backward()
    finally:
        layers.use_kernels("aten")
        layers._triton_norm, kernels.geglu = real, real_geglu
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)
    assert "group" in ran and "layer" in ran
    assert {p for _, p in parts} > {1}  # groups in one part and in several
    n_ff = sum(isinstance(m, FeedForward) for m in model.modules())
    # forward, then one backward kernel that also recomputes the product and sums the bias
    assert sorted(gegl) == [("bwd", (True, True))] * n_ff + [("fwd", ())] * n_ff and n_ff
    assert not declined  # the swap windows too (rows over six strided dims)
    assert (len(nhwc) > 0 and all(nhwc)) if channels_last else not nhwc  # NHWC in, NHWC out


def test_kernels_config():
    from hdvg.config import ConfigError
    from hdvg.t2v.config import TrainConfig
    from hdvg.t2v.layers import use_kernels

    assert TrainConfig(kernels="triton").kernels == "triton"
    with pytest.raises(ConfigError, match="kernels"):
        TrainConfig(kernels="cudnn")
    with pytest.raises(ValueError, match="aten or triton"):
        use_kernels("cudnn")


def test_kernels_build_for_an_h100_without_spills():
    """The same kernels compiled for sm_90 here (Triton's ptxas, no GPU): the heaviest tile of
    each builds, fits the register file (<= 128 a thread at its warp count) and spills
    nothing to local memory. Run apart: the interpreter this suite uses builds no GPU code."""
    import json
    import os
    import subprocess
    import sys

    cases = [
        ("_gn_stats", {"BLOCK_C": 128, "BLOCK_S": 32}),
        ("_gn_fwd", {"SILU": True, "BLOCK_C": 32, "BLOCK_S": 128, "BLOCK_K": 64}),
        ("_gn_sums", {"SILU": True, "BLOCK_C": 64, "BLOCK_S": 64}),
        ("_gn_bwd", {"SILU": True, "BLOCK_C": 16, "BLOCK_S": 256, "BLOCK_K": 64}),
        ("_ln_fwd", {"ND": 6, "BLOCK_M": 8, "BLOCK_C": 512}),
        ("_ln_bwd", {"ND": 6, "BLOCK_M": 8, "BLOCK_C": 512}),
        ("_geglu_bwd", {"PRODUCT": True, "BIAS": True, "BLOCK_R": 4, "BLOCK": 1024}),
        ("_short_attn_fwd", {"LP": 16, "R": 64, "D": 64, "F32": False}),
        ("_short_attn_bwd", {"LP": 16, "R": 32, "D": 64, "F32": False}),
    ]
    code = (
        "import json, sys; from hdvg.t2v import kernels; "
        "print(json.dumps(kernels.build_report(90, json.loads(sys.argv[1]))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == [name for name, _ in cases]
    for r in rows:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 128, r


@pytest.mark.parametrize("frames,heads", [(16, 3), (5, 2), (40, 1)])
def test_short_attention_matches_sdpa(kernels, frames, heads):
    """Temporal self-attention over a pixel's frames, several sequences packed per tile: the
    strided q/k/v views of a fused projection as the U-Net hands them (a partial last tile;
    lengths padded to a power of two; one longer than a tile's rows), values and gradients
    against SDPA; the output laid out so the heads merge by a view."""
    from hdvg.t2v.layers import _heads

    torch.manual_seed(0)
    n, d = 7, 16
    proj = torch.randn(n, frames, 3 * heads * d)
    q, k, v = (t.requires_grad_() for t in _heads(proj.clone(), 3, heads))  # strided leaves
    rq, rk, rv = (t.requires_grad_() for t in _heads(proj.clone(), 3, heads))
    assert q.stride() == (frames * 3 * heads * d, d, 3 * heads * d, 1)
    got = kernels.short_attention(q, k, v)
    want = F.scaled_dot_product_attention(rq, rk, rv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.transpose(1, 2).is_contiguous()  # (N, L, H, D) in memory
    g = torch.randn(want.shape)
    for a, r in zip(_grads(got, g, [q, k, v]), _grads(want, g, [rq, rk, rv]), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    assert kernels.short_attention(q[:, :, :3], k, v) is None  # cross-attention lengths
    # the fused projection itself: the same values, its gradient written in place of three
    pp = proj.clone().requires_grad_()
    got = kernels.short_self_attention(pp, heads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward(g)
    want_proj = torch.cat([t.transpose(1, 2).reshape(n, frames, heads * d) for t in
                           (rq.grad, rk.grad, rv.grad)], -1)  # fmt: skip
    torch.testing.assert_close(pp.grad, want_proj, rtol=1e-4, atol=1e-5)
    long = torch.randn(1, 1, kernels.SHORT_ATTENTION_MAX + 1, d)
    assert kernels.short_attention(long, long, long) is None


def test_short_attention_bf16(kernels):
    """bf16 q, k, v as autocast hands them (the training step's dtype): output and gradients
    within bf16 rounding of SDPA computed in fp32 on the same values. (Triton's interpreter
    multiplies bf16 dot operands as raw bits, so the kernel casts them up there: ``F32``.)"""
    from hdvg.t2v.layers import _heads

    torch.manual_seed(0)
    heads, frames, d = 2, 16, 64
    proj = torch.randn(12, frames, 3 * heads * d).to(torch.bfloat16)
    leaf = proj.clone().requires_grad_()
    got = kernels.short_self_attention(leaf, heads)
    pp = proj.float().requires_grad_()
    want = F.scaled_dot_product_attention(*_heads(pp, 3, heads))
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2, rel
    g = torch.randn(want.shape)
    got.backward(g.to(torch.bfloat16))
    want.backward(g)
    rel = (leaf.grad.float() - pp.grad).norm() / pp.grad.norm()
    assert leaf.grad.dtype == torch.bfloat16 and rel < 2e-2, rel


def test_unet_with_short_attention_matches_sdpa(kernels, monkeypatch):
    """``train.attention_backends: {temporal: triton}``: every temporal attention call of a
    tiny U-Net runs the short-sequence kernel (and nothing else does); output and parameter
    gradients equal SDPA's."""
    from hdvg.t2v import layers
    from hdvg.t2v.unet import SwapUNet
    from tests.t2v.test_model import tiny_cfg

    torch.manual_seed(0)
    model = SwapUNet(tiny_cfg(temporal_conv_dropout=0.0)).train()
    for m in model.modules():  # temporal attention's zero-initialized out-projections carry values
        if isinstance(m, layers.TemporalTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.1)
    x, t, text = torch.randn(1, 4, 3, 4, 4), torch.tensor([10]), torch.randn(1, 3, 32)
    want = model(x, t, text)
    want.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    real = kernels.short_self_attention
    monkeypatch.setattr(kernels, "short_self_attention", lambda *a: calls.append(a) or real(*a))
    layers.use_attention_backends({"temporal": "triton"})
    try:
        got = model(x, t, text)
        got.square().mean().backward()
    finally:
        layers.use_attention_backends()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)
    n_temporal = sum(isinstance(m, layers.TemporalTransformer) for m in model.modules())
    assert len(calls) == 2 * n_temporal > 0 and all(p.shape[1] == 3 for p, _ in calls)  # 3 frames


def test_short_attention_ops_pass_opcheck(kernels):
    """The kernel's custom ops (what torch.compile sees): schema, fake tensors with the real
    outputs' strides, autograd registration and AOT dispatch, on the strided views the U-Net
    hands them."""
    from hdvg.t2v.layers import _heads

    torch.manual_seed(0)
    heads, frames, d = 2, 5, 16
    proj = torch.randn(3, frames, 3 * heads * d, requires_grad=True)
    q, k, v = (t.detach().requires_grad_() for t in _heads(proj.detach().clone(), 3, heads))
    g = torch.randn(3, heads, frames, d)
    ops = torch.ops.hdvg
    for op, args in [
        (ops.short_self_attention.default, (proj, heads)),
        (ops.short_attention.default, (q, k, v)),
        (ops.short_self_attention_backward.default, (proj.detach(), g, heads)),
        (ops.short_attention_backward.default, (q.detach(), k.detach(), v.detach(), g)),
    ]:
        torch.library.opcheck(op, args)  # raises on the first failed check


def test_compiled_temporal_attention_keeps_the_kernel(kernels):
    """``train.compile`` with ``attention_backends: {temporal: triton}``: inductor compiles a
    temporal transformer in one graph (no break) with the kernel's forward and backward ops in
    its code, and gives eager SDPA's output and gradients."""
    from torch._inductor.utils import run_and_get_code

    from hdvg.t2v import layers

    torch.manual_seed(0)
    m = layers.TemporalTransformer(32, 2, 16, 4)
    torch.nn.init.normal_(m.proj_out.weight, std=0.1)  # zero-initialized: give it values
    x = torch.randn(2 * 5, 32, 3, 4)

    def step(fn):
        xx = x.clone().requires_grad_()
        out = fn(xx, 5)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in m.parameters()] + [xx.grad]
        m.zero_grad()
        return out.detach(), grads

    want = step(m)
    layers.use_attention_backends({"temporal": "triton"})
    try:
        torch._dynamo.reset()
        got, code = run_and_get_code(step, torch.compile(m, fullgraph=True))
    finally:
        layers.use_attention_backends()
        torch._dynamo.reset()
    code = "\n".join(code)
    assert "hdvg.short_self_attention.default" in code
    assert "hdvg.short_self_attention_backward.default" in code
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
