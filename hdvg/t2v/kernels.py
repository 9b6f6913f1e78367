"""Fused Triton kernels for the U-Net's group and layer norms (+ SiLU), GEGLU and short
(temporal) attention, forward and backward.

Why: on the H100 the eager training step spends ~53 % of its GPU time in elementwise and copy
kernels, and the norms move 57 % of those bytes (RESULTS.md, issue 7): CUDA autocast runs a
norm in fp32, so eager aten casts the bf16 input up, normalizes, applies SiLU and casts the
result down in separate passes (~28 bytes per element in forward). These kernels read the bf16
input once per pass and write the bf16 output once, with the statistics in fp32 -- the numbers
of autocast's fp32 norm up to summation order -- and the backward recomputes the normalized
value instead of keeping it. Bytes per element: group norm forward 3 reads + 1 write, backward
2 x (input + gradient) + 1 write; layer norm (a row in one tile) 1 + 1 and 3 + 1. GEGLU
(``h * gelu(gate)``, 19 passes of its width in eager forward + backward) is one read of the
projection and one write each way; its backward also writes the product recomputed for the
out-projection's weight gradient and sums the projection's bias gradient.
``benchmarks/t2v_traffic.py --kernels triton`` counts the step's non-matmul bytes with them:
332.9 -> 152.1 GB at batch 4, paper size. A group norm's span is cut into parts so a launch
has >= :data:`GN_PROGRAMS` programs (the temporal norms' groups are whole videos: one program
each would leave most of a GPU idle), the parts' sums combined exactly.

Short attention (``train.attention_backends: {temporal: triton}``): softmax attention over a
pixel's frames with several sequences packed per tile (block-diagonal), where flash pads each
16-frame sequence to a 128-row block; the backward recomputes the probabilities and writes the
fused qkv projection's gradient directly.

Layouts: a group norm's input, output and gradient are read and written through their
strides (``(N, C, *spatial)`` with the spatial dims merged to at most two), so the
``perm`` layouts :func:`hdvg.t2v.layers.group_norm` writes for its consumers (attention tokens)
and the strided residual sums it reads need no copy. A layer norm's rows may span up to six
strided dims (the swap windows' view of the frames) and write contiguous rows for the next
matmul. Anything else returns ``None`` and the caller keeps the aten path.

Selected with ``train.kernels: triton`` (:func:`hdvg.t2v.layers.use_kernels`). Tests
run the same kernels on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, fp32
arithmetic on bf16 loads, as the GPU does; its bf16 cast truncates where the GPU rounds).
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch's CUDA wheels ship triton
    triton = None


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1`` when this module loaded)."""
    return triton is not None and type(_gn_fwd).__name__ == "InterpretedFunction"


# --- layouts ----------------------------------------------------------------------------


def _merge(shape, *strides_list, keep: int = 2):
    """Merge adjacent dims that are one dim in every tensor's strides; None if more than
    ``keep`` remain. Returns (sizes, [strides per tensor]), padded to ``keep`` dims in front."""
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides_list]
    for d, size in enumerate(shape):
        if size == 1:
            continue  # any stride: never stepped over
        cur = [st[d] for st in strides_list]
        if sizes and all(m[-1] == c * size for m, c in zip(merged, cur, strict=True)):
            sizes[-1] *= size
            for m, c in zip(merged, cur, strict=True):
                m[-1] = c
        else:
            sizes.append(size)
            for m, c in zip(merged, cur, strict=True):
                m.append(c)
    if len(sizes) > keep:
        return None
    pad = keep - len(sizes)
    return [1] * pad + sizes, [[0] * pad + m for m in merged]


def _group_layout(x: torch.Tensor, *others: torch.Tensor):
    """``(N, C, S1, S2)`` sizes and each tensor's strides, or None when the spatial dims do not
    merge to two in every tensor."""
    return _group_layout_of(x.shape, x.stride(), *(t.stride() for t in others))


# the layouts repeat every step: worked out once per (shape, strides), then a dict lookup
# (~125 us of Python per norm call before, next to a kernel of tens of us)
@functools.lru_cache(maxsize=4096)
def _group_layout_of(shape: tuple, *strides: tuple):
    sp = _merge(shape[2:], *[st[2:] for st in strides])
    if sp is None:
        return None
    sizes, sp_strides = sp
    per = tuple((st[0], st[1], *s) for st, s in zip(strides, sp_strides, strict=True))
    return (shape[0], shape[1], *sizes), per


ROW_DIMS = 6  # leading dims a layer norm's rows may span after merging (swap windows: 6)


def _row_layout(x: torch.Tensor, *others: torch.Tensor):
    """Rows over the leading dims, C last: ``(M, C)``, the rows' dims merged in every tensor
    (at most :data:`ROW_DIMS`, else None) as one int32 table ``[sizes, strides of each
    tensor]`` for the kernels, and each tensor's channel stride."""
    return _row_layout_of(x.shape, x.stride(), *(t.stride() for t in others))


@functools.lru_cache(maxsize=4096)
def _row_layout_of(shape: tuple, *strides: tuple):
    rows = _merge(shape[:-1], *[st[:-1] for st in strides], keep=ROW_DIMS)
    if rows is None:
        return None
    sizes, row_strides = rows
    first = next((i for i, n in enumerate(sizes) if n != 1), ROW_DIMS - 1)  # drop the padding
    table = (*sizes[first:], *(s for st in row_strides for s in st[first:]))
    return (math.prod(shape[:-1]), shape[-1]), table, tuple(st[-1] for st in strides)


@functools.lru_cache(maxsize=512)
def _device_table(table: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The row table on the device, made once per layout: a fresh host-to-device copy per call
    would wait for the GPU's queue (a pageable copy) and stall the CPU's run-ahead."""
    return torch.tensor(table, dtype=torch.int32, device=device)


TILE = 4096  # elements a program loads at a time (channels x spatial for group norms)
# Warps per program, for the 4096-element tiles: the fewest with no register spills and at most
# ~128 registers a thread in the sm_90 build (``python -m hdvg.t2v.kernels``: registers and
# spill bytes per kernel from the cubin, no GPU needed). Untimed: tune on a GPU.
WARPS = {"gn_stats": 8, "gn_fwd": 8, "gn_sums": 16, "gn_bwd": 16, "ln_fwd": 8, "ln_bwd": 16,
         "geglu_bwd": 16, "short_attn_fwd": 8, "short_attn_bwd": 8}  # fmt: skip
# short attention: rows (packed sequences) per program, at least one sequence's; the fewest
# wasted (block-diagonal) scores within ~96 registers at 8 warps on sm_90, no spills
ATTN_ROWS = {"fwd": 64, "bwd": 32}
# Group norms: at least this many programs (parts of groups) per launch -- ~8 per SM of an H100
# -- and at most MAX_SPLIT parts a group (their partial sums are loaded in one tile). Untimed.
GN_PROGRAMS = 1024
MAX_SPLIT = 64
ROW_PROGRAMS = 256  # GEGLU backward: at most this many blocks of rows (each sums its bias grads)
INT32_MAX = 2**31 - 1  # the kernels index in int32 (64-bit division is slow on the GPU)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _group_tiles(cg: int, s: int) -> tuple[int, int]:
    bc = _pow2(cg)
    return bc, max(2, min(_pow2(s), max(2, TILE // bc)))


def _group_split(groups: int, s: int, bs: int) -> tuple[int, int]:
    """(span, parts): each group's spatial span cut into parts of whole tiles, so that at least
    :data:`GN_PROGRAMS` programs share the work. One program per group left the GPU idle on
    the temporal norms (a group spans a whole video: batch x 32 groups, 128 programs at batch
    4 on an H100's 132 SMs, one block each); the parts' statistics are combined exactly."""
    tiles = -(-s // bs)
    split = max(1, min(tiles, MAX_SPLIT, -(-GN_PROGRAMS // groups)))
    chunk = bs * -(-tiles // split)
    return chunk, -(-s // chunk)


def _row_tiles(c: int) -> tuple[int, int]:
    bc = _pow2(c)
    return bc, max(1, 4096 // bc)


# --- group norm ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile_ptrs(base, c, s, S, S2, sc, s1, s2, cmask):
        """Offsets of a (channels x flattened-spatial) tile and its mask (``s < S``)."""
        off = c[:, None] * sc + ((s // S2) * s1 + (s % S2) * s2)[None, :]
        return base + off, cmask[:, None] & (s < S)[None, :]

    @triton.jit
    def _part_of_program(G, CG, S, CHUNK, SPLIT, BLOCK_C: tl.constexpr):
        """This program's group (``n * G + g``), sample ``n``, the group's channels ``c`` and
        their mask, its part ``k`` of the group's spatial span and that part's ``[lo, hi)``."""
        pid = tl.program_id(0)
        grp = pid // SPLIT
        k = pid % SPLIT
        cr = tl.arange(0, BLOCK_C)
        lo = k * CHUNK
        return grp, grp // G, (grp % G) * CG + cr, cr < CG, k, lo, tl.minimum(S, lo + CHUNK)

    @triton.jit
    def _xhat_dy(xb, gb, c, s, S, S2, sxc, sx1, sx2, sgc, sg1, sg2, cmask, mean, rstd, w, b,
                 SILU: tl.constexpr):  # fmt: skip
        """The normalized input and the gradient reaching it (through SiLU, from the
        recomputed pre-activation) on one tile, and the tile's mask."""
        ptr, m = _tile_ptrs(xb, c, s, S, S2, sxc, sx1, sx2, cmask)
        xhat = (tl.load(ptr, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        gptr, _ = _tile_ptrs(gb, c, s, S, S2, sgc, sg1, sg2, cmask)
        dy = tl.load(gptr, mask=m, other=0.0).to(tl.float32)
        if SILU:
            z = xhat * w + b
            sig = tl.sigmoid(z)
            dy = dy * sig * (1.0 + z * (1.0 - sig))
        return xhat, dy, m

    @triton.jit
    def _gn_stats(X, PART, G, CG, S, S2, CHUNK, SPLIT, sxn, sxc, sx1, sx2,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """Mean and sum of squared deviations of one part of a group (two passes over the
        part, the second from L2: no cancellation on large groups)."""
        grp, n, c, cmask, k, lo, hi = _part_of_program(G, CG, S, CHUNK, SPLIT, BLOCK_C)
        xb = X + n * sxn
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            ptr, m = _tile_ptrs(xb, c, s0 + tl.arange(0, BLOCK_S), hi, S2, sxc, sx1, sx2, cmask)
            acc += tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / (CG * (hi - lo)).to(tl.float32)
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            ptr, m = _tile_ptrs(xb, c, s0 + tl.arange(0, BLOCK_S), hi, S2, sxc, sx1, sx2, cmask)
            d = tl.where(m, tl.load(ptr, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        tl.store(PART + 2 * tl.program_id(0), mean)
        tl.store(PART + 2 * tl.program_id(0) + 1, tl.sum(tl.sum(acc, axis=1), axis=0))

    @triton.jit
    def _gn_fwd(X, Y, W, B, PART, MEAN, RSTD, G, CG, S, S2, CHUNK, SPLIT, eps,
                sxn, sxc, sx1, sx2, syn, syc, sy1, sy2,
                SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
        """The group's statistics from its parts' (Chan's pairwise combination), then this part
        normalized (+ SiLU) and written."""
        grp, n, c, cmask, k, lo, hi = _part_of_program(G, CG, S, CHUNK, SPLIT, BLOCK_C)
        kk = tl.arange(0, BLOCK_K)
        km = kk < SPLIT
        means = tl.load(PART + 2 * (grp * SPLIT + kk), mask=km, other=0.0)
        m2s = tl.load(PART + 2 * (grp * SPLIT + kk) + 1, mask=km, other=0.0)
        counts = tl.where(km, (CG * (tl.minimum(S, (kk + 1) * CHUNK) - kk * CHUNK)), 0)
        counts = counts.to(tl.float32)
        total = (CG * S).to(tl.float32)
        mean = tl.sum(counts * means, axis=0) / total
        dev = tl.where(km, means - mean, 0.0)
        var = (tl.sum(m2s, axis=0) + tl.sum(counts * dev * dev, axis=0)) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + grp, mean, mask=k == 0)
        tl.store(RSTD + grp, rstd, mask=k == 0)
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        xb = X + n * sxn
        yb = Y + n * syn
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ptr, m = _tile_ptrs(xb, c, s, hi, S2, sxc, sx1, sx2, cmask)
            y = (tl.load(ptr, mask=m, other=0.0).to(tl.float32) - mean) * rstd * w + b
            if SILU:
                y = y * tl.sigmoid(y)
            yptr, _ = _tile_ptrs(yb, c, s, hi, S2, syc, sy1, sy2, cmask)
            tl.store(yptr, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_sums(X, DY, W, B, MEAN, RSTD, PDW, PDB, G, CG, C, S, S2, CHUNK, SPLIT,
                 sxn, sxc, sx1, sx2, sgn, sgc, sg1, sg2,
                 SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """Per channel, one part's sums of ``dy`` and ``dy * xhat`` (the bias and weight
        gradients of this sample, in parts)."""
        grp, n, c, cmask, k, lo, hi = _part_of_program(G, CG, S, CHUNK, SPLIT, BLOCK_C)
        mean = tl.load(MEAN + grp)
        rstd = tl.load(RSTD + grp)
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        xb = X + n * sxn
        gb = DY + n * sgn
        a_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        a_dyx = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            xhat, dy, m = _xhat_dy(xb, gb, c, s0 + tl.arange(0, BLOCK_S), hi, S2, sxc, sx1, sx2,
                                   sgc, sg1, sg2, cmask, mean, rstd, w, b, SILU)  # fmt: skip
            a_dy += dy
            a_dyx += tl.where(m, dy * xhat, 0.0)
        part = (n * SPLIT + k) * C + c
        tl.store(PDW + part, tl.sum(a_dyx, axis=1), mask=cmask)
        tl.store(PDB + part, tl.sum(a_dy, axis=1), mask=cmask)

    @triton.jit
    def _gn_bwd(X, DY, DX, W, B, MEAN, RSTD, PDW, PDB, G, CG, C, S, S2, CHUNK, SPLIT,
                sxn, sxc, sx1, sx2, sgn, sgc, sg1, sg2, sdn, sdc, sd1, sd2,
                SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
        """The group's two gradient means from its parts' sums, then this part's input
        gradient."""
        grp, n, c, cmask, k, lo, hi = _part_of_program(G, CG, S, CHUNK, SPLIT, BLOCK_C)
        mean = tl.load(MEAN + grp)
        rstd = tl.load(RSTD + grp)
        kk = tl.arange(0, BLOCK_K)
        parts = (n * SPLIT + kk)[:, None] * C + c[None, :]
        pm = (kk < SPLIT)[:, None] & cmask[None, :]
        dw = tl.sum(tl.load(PDW + parts, mask=pm, other=0.0), axis=0)  # per channel
        db = tl.sum(tl.load(PDB + parts, mask=pm, other=0.0), axis=0)
        wv = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        count = (CG * S).to(tl.float32)
        m1 = tl.sum(db * wv, axis=0) / count  # mean of dy * w over the group
        m2 = tl.sum(dw * wv, axis=0) / count  # mean of dy * w * xhat
        w = wv[:, None]
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        xb = X + n * sxn
        gb = DY + n * sgn
        db_ = DX + n * sdn
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            xhat, dy, m = _xhat_dy(xb, gb, c, s, hi, S2, sxc, sx1, sx2, sgc, sg1, sg2, cmask,
                                   mean, rstd, w, b, SILU)  # fmt: skip
            dx = (dy * w - m1 - xhat * m2) * rstd
            dptr, _ = _tile_ptrs(db_, c, s, hi, S2, sdc, sd1, sd2, cmask)
            tl.store(dptr, dx.to(DX.dtype.element_ty), mask=m)

    # --- layer norm (rows) ------------------------------------------------------------------

    @triton.jit
    def _row_offsets(RD, rows, T: tl.constexpr, ND: tl.constexpr):
        """Element offsets of ``rows`` in tensor ``T``, from the table ``RD``: ND row-dim sizes,
        then each tensor's ND strides (innermost dim last)."""
        r = rows  # int32: 64-bit division is a long software routine on the GPU
        off = tl.zeros_like(r)
        for i in tl.static_range(ND):
            d = ND - 1 - i
            size = tl.load(RD + d)
            off += (r % size) * tl.load(RD + (1 + T) * ND + d)
            r = r // size
        return off

    @triton.jit
    def _row_tile(base, RD, rows, c, M, C, sc, T: tl.constexpr, ND: tl.constexpr):
        m = (rows < M)[:, None] & (c < C)[None, :]
        off = _row_offsets(RD, rows, T, ND)
        return base + off[:, None] + c[None, :] * sc, m

    @triton.jit
    def _ln_fwd(X, Y, W, B, MEAN, RSTD, RD, M, C, eps, sxc, syc,
                ND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # a (rows x C) tile
        c = tl.arange(0, BLOCK_C)
        ptr, m = _row_tile(X, RD, rows, c, M, C, sxc, 0, ND)
        x = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)
        w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        b = tl.load(B + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        yptr, _ = _row_tile(Y, RD, rows, c, M, C, syc, 1, ND)
        tl.store(yptr, (d * rstd[:, None] * w + b).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _ln_bwd(X, DY, DX, W, MEAN, RSTD, DW, DB, RD, M, C, ROWS, sxc, sgc, sdc,
                ND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, ROWS, BLOCK_M):  # ROWS rows per program: weight grads summed here
            rows = pid * ROWS + r0 + tl.arange(0, BLOCK_M)
            mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)[:, None]
            ptr, m = _row_tile(X, RD, rows, c, M, C, sxc, 0, ND)
            xhat = tl.where(m, (tl.load(ptr, mask=m, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            gptr, _ = _row_tile(DY, RD, rows, c, M, C, sgc, 1, ND)
            dy = tl.load(gptr, mask=m, other=0.0).to(tl.float32)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
            g = dy * w
            m1 = tl.sum(g, axis=1)[:, None] / C
            m2 = tl.sum(g * xhat, axis=1)[:, None] / C
            dptr, _ = _row_tile(DX, RD, rows, c, M, C, sdc, 2, ND)
            tl.store(dptr, ((g - m1 - xhat * m2) * rstd).to(DX.dtype.element_ty), mask=m)
        tl.store(DW + pid * C + c, dw, mask=c < C)
        tl.store(DB + pid * C + c, db, mask=c < C)

    # --- GEGLU -------------------------------------------------------------------------

    @triton.jit
    def _gelu_parts(gate):
        """erf-GELU of ``gate`` (F.gelu's default) and its derivative."""
        cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        return gate * cdf, cdf + gate * pdf

    @triton.jit
    def _geglu_fwd(A, P, N, BLOCK: tl.constexpr):
        """``P[r] = A[r, :N] * gelu(A[r, N:])`` for rows r of contiguous (M, 2N) and (M, N)."""
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = col < N
        hid = tl.load(A + row * 2 * N + col, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(A + row * 2 * N + N + col, mask=m, other=0.0).to(tl.float32)
        gelu, _ = _gelu_parts(gate)
        tl.store(P + row * N + col, (hid * gelu).to(P.dtype.element_ty), mask=m)

    @triton.jit
    def _geglu_bwd(A, GP, GA, P, GB, M, N, ROWS,
                   PRODUCT: tl.constexpr, BIAS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """The gradient of ``A`` (M, 2N) from the gradient ``GP`` (M, N) of ``A[:, :N] *
        gelu(A[:, N:])``, for ``ROWS`` rows from this program's first. ``PRODUCT``: also
        write the product to ``P`` (the next matmul's input, recomputed for its weight
        gradient); ``BIAS``: this program's column sums of the gradient to its row of ``GB``
        (the gradient of the bias that made ``A``; the caller adds the programs' rows)."""
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cm = col < N
        first = tl.program_id(0) * ROWS
        sum_h = tl.zeros([BLOCK], dtype=tl.float32)
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        for r0 in range(first, tl.minimum(M, first + ROWS), BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            m = (rows < M)[:, None] & cm[None, :]
            a = A + rows[:, None] * 2 * N + col[None, :]
            hid = tl.load(a, mask=m, other=0.0).to(tl.float32)
            gate = tl.load(a + N, mask=m, other=0.0).to(tl.float32)
            gp = tl.load(GP + rows[:, None] * N + col[None, :], mask=m, other=0.0).to(tl.float32)
            gelu, dgelu = _gelu_parts(gate)
            gh = gp * gelu
            gg = gp * hid * dgelu
            ga = GA + rows[:, None] * 2 * N + col[None, :]
            tl.store(ga, gh.to(GA.dtype.element_ty), mask=m)
            tl.store(ga + N, gg.to(GA.dtype.element_ty), mask=m)
            if PRODUCT:
                prod = (hid * gelu).to(P.dtype.element_ty)
                tl.store(P + rows[:, None] * N + col[None, :], prod, mask=m)
            if BIAS:
                sum_h += tl.sum(tl.where(m, gh, 0.0), axis=0)
                sum_g += tl.sum(tl.where(m, gg, 0.0), axis=0)
        if BIAS:
            gb = GB + tl.program_id(0) * 2 * N + col
            tl.store(gb, sum_h, mask=cm)
            tl.store(gb + N, sum_g, mask=cm)

    # --- attention over short sequences (temporal: a pixel's frames) ------------------------

    @triton.jit
    def _short_rows(s0, S, H, L, sn, sh, sl, LP: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
        """Offsets of this program's (R rows x D) tile -- R // LP sequences of LP rows each,
        rows past a sequence's L or past the last sequence masked -- and the mask."""
        r = tl.arange(0, R)
        seq = s0 + r // LP
        pos = r % LP
        row = (seq // H) * sn + (seq % H) * sh + pos * sl
        m = (seq < S) & (pos < L)
        return row[:, None] + tl.arange(0, D)[None, :], m[:, None]

    @triton.jit
    def _mm(a, b, F32: tl.constexpr):
        """``tl.dot(a, b)``; ``F32``: on operands cast up to fp32 first -- Triton's interpreter
        (CPU tests) multiplies bf16 operands as raw bits; their values are exact in fp32, so
        the product is the GPU's bf16 tensor-core product up to summation order."""
        if F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        return tl.dot(a, b)

    @triton.jit
    def _short_probs(q, k, L, scale, LP: tl.constexpr, R: tl.constexpr, F32: tl.constexpr):
        """Softmax of ``q k^T * scale`` within each sequence (block-diagonal in the tile)."""
        r = tl.arange(0, R)
        same = ((r // LP)[:, None] == (r // LP)[None, :]) & ((r % LP) < L)[None, :]
        x = tl.where(same, _mm(q, tl.trans(k), F32) * scale, float("-inf"))
        x = tl.exp(x - tl.max(x, axis=1)[:, None])
        return x / tl.sum(x, axis=1)[:, None]

    @triton.jit
    def _short_attn_fwd(Q, K, V, OUT, S, H, L, scale,
                        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol,
                        LP: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                        F32: tl.constexpr):  # fmt: skip
        s0 = tl.program_id(0) * (R // LP)
        qo, m = _short_rows(s0, S, H, L, sqn, sqh, sql, LP, R, D)
        ko, _ = _short_rows(s0, S, H, L, skn, skh, skl, LP, R, D)
        vo, _ = _short_rows(s0, S, H, L, svn, svh, svl, LP, R, D)
        q = tl.load(Q + qo, mask=m, other=0.0)
        k = tl.load(K + ko, mask=m, other=0.0)
        p = _short_probs(q, k, L, scale, LP, R, F32)
        v = tl.load(V + vo, mask=m, other=0.0)
        o = _mm(p.to(v.dtype), v, F32)
        oo, _ = _short_rows(s0, S, H, L, son, soh, sol, LP, R, D)
        tl.store(OUT + oo, o.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _short_attn_bwd(Q, K, V, DO, DQ, DK, DV, S, H, L, scale,
                        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, sgn, sgh, sgl,
                        sdn, sdh, sdl,
                        LP: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                        F32: tl.constexpr):  # fmt: skip
        """Recomputes the tile's probabilities (no saved output or statistics: a sequence
        lies whole in one tile); the gradients of q, k, v share one layout (``sd*``)."""
        s0 = tl.program_id(0) * (R // LP)
        qo, m = _short_rows(s0, S, H, L, sqn, sqh, sql, LP, R, D)
        ko, _ = _short_rows(s0, S, H, L, skn, skh, skl, LP, R, D)
        vo, _ = _short_rows(s0, S, H, L, svn, svh, svl, LP, R, D)
        go, _ = _short_rows(s0, S, H, L, sgn, sgh, sgl, LP, R, D)
        q = tl.load(Q + qo, mask=m, other=0.0)
        k = tl.load(K + ko, mask=m, other=0.0)
        v = tl.load(V + vo, mask=m, other=0.0)
        do = tl.load(DO + go, mask=m, other=0.0)
        p = _short_probs(q, k, L, scale, LP, R, F32)
        dv = _mm(tl.trans(p).to(do.dtype), do, F32)
        dp = _mm(do, tl.trans(v), F32).to(tl.float32)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale  # sum(p * dp) = rowsum(do * o)
        dq = _mm(ds.to(k.dtype), k, F32)
        dk = _mm(tl.trans(ds).to(q.dtype), q, F32)
        do_, _ = _short_rows(s0, S, H, L, sdn, sdh, sdl, LP, R, D)
        tl.store(DQ + do_, dq.to(DQ.dtype.element_ty), mask=m)
        tl.store(DK + do_, dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + do_, dv.to(DV.dtype.element_ty), mask=m)


# --- autograd ---------------------------------------------------------------------------


def _out_like(x: torch.Tensor, dtype: torch.dtype, perm) -> torch.Tensor:
    if perm is None:
        return torch.empty_like(x, dtype=dtype)  # x's strides (dense x): one layout for both
    strides = _perm_strides(x.shape, tuple(perm))
    return torch.empty_strided(x.shape, strides, dtype=dtype, device=x.device)


def _grad_for(grad: torch.Tensor, x: torch.Tensor, layout_fn) -> torch.Tensor:
    """The incoming gradient as is when it merges like x; else copied into x's layout."""
    if layout_fn(x, grad) is None:
        grad = torch.empty_like(x, dtype=grad.dtype).copy_(grad)
    return grad


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool, out_dtype, perm):
        y = _out_like(x, out_dtype, perm)
        (n, c, s1, s2), (sx, sy) = _group_layout(x, y)
        cg, s = c // groups, s1 * s2
        bc, bs = _group_tiles(cg, s)
        chunk, split = _group_split(n * groups, s, bs)
        part = torch.empty(n * groups * split, 2, device=x.device, dtype=torch.float32)
        mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        grid = (n * groups * split,)
        _gn_stats[grid](x, part, groups, cg, s, s2, chunk, split, *sx,
                        BLOCK_C=bc, BLOCK_S=bs, num_warps=WARPS["gn_stats"])  # fmt: skip
        _gn_fwd[grid](x, y, weight, bias, part, mean, rstd, groups, cg, s, s2, chunk, split, eps,
                      *sx, *sy, SILU=silu, BLOCK_C=bc, BLOCK_S=bs, BLOCK_K=_pow2(split),
                      num_warps=WARPS["gn_fwd"])  # fmt: skip
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad = _grad_for(grad, x, _group_layout)
        dx = torch.empty_like(x)
        (n, c, s1, s2), (sx, sg, sd) = _group_layout(x, grad, dx)
        groups = ctx.groups
        cg, s = c // groups, s1 * s2
        bc, bs = _group_tiles(cg, s)
        chunk, split = _group_split(n * groups, s, bs)
        dw = torch.empty(n * split, c, device=x.device, dtype=torch.float32)  # per sample, part
        db = torch.empty_like(dw)
        grid = (n * groups * split,)
        args = (groups, cg, c, s, s2, chunk, split)
        _gn_sums[grid](x, grad, weight, bias, mean, rstd, dw, db, *args, *sx, *sg,
                       SILU=ctx.silu, BLOCK_C=bc, BLOCK_S=bs,
                       num_warps=WARPS["gn_sums"])  # fmt: skip
        _gn_bwd[grid](x, grad, dx, weight, bias, mean, rstd, dw, db, *args, *sx, *sg, *sd,
                      SILU=ctx.silu, BLOCK_C=bc, BLOCK_S=bs, BLOCK_K=_pow2(split),
                      num_warps=WARPS["gn_bwd"])  # fmt: skip
        return (dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype),
                None, None, None, None, None)  # fmt: skip


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, out_dtype):
        y = torch.empty(x.shape, device=x.device, dtype=out_dtype)  # rows contiguous: for matmuls
        (m, c), table, (sxc, syc) = _row_layout(x, y)
        nd = len(table) // 3
        mean = torch.empty(m, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        bc, bm = _row_tiles(c)
        rd = _device_table(table, x.device)
        _ln_fwd[(-(-m // bm),)](x, y, weight, bias, mean, rstd, rd, m, c, eps, sxc, syc,
                                ND=nd, BLOCK_M=bm, BLOCK_C=bc, num_warps=WARPS["ln_fwd"])  # fmt: skip
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        grad = _grad_for(grad, x, _row_layout)
        dx = torch.empty_like(x)
        (m, c), table, (sxc, sgc, sdc) = _row_layout(x, grad, dx)
        nd = len(table) // 4
        bc, bm = _row_tiles(c)
        rows = bm * -(-m // (bm * 1024))  # at most ~1k programs; weight grads summed per program
        progs = -(-m // rows)
        dw = torch.empty(progs, c, device=x.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        rd = _device_table(table, x.device)
        _ln_bwd[(progs,)](x, grad, dx, weight, mean, rstd, dw, db, rd, m, c, rows, sxc, sgc, sdc,
                          ND=nd, BLOCK_M=bm, BLOCK_C=bc, num_warps=WARPS["ln_bwd"])  # fmt: skip
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None, None


def _short_attn_launch(q, k, v, o=None, grad=None, dq=None, dk=None, dv=None) -> None:
    """Forward (``o``) or backward (``grad`` -> ``dq``, ``dk``, ``dv``, one shared layout) of
    the short-sequence kernel on (N, H, L, D) views."""
    n, h, seq_len, d = q.shape
    lp = max(16, _pow2(seq_len))
    kind = "fwd" if grad is None else "bwd"
    rows = max(ATTN_ROWS[kind], lp)  # at least one sequence per tile
    grid = (-(-(n * h) // (rows // lp)),)
    common = (n * h, h, seq_len, d**-0.5, *_nhl(q), *_nhl(k), *_nhl(v))
    meta = {"LP": lp, "R": rows, "D": d, "F32": interpreting(),
            "num_warps": WARPS[f"short_attn_{kind}"]}  # fmt: skip
    if grad is None:
        _short_attn_fwd[grid](q, k, v, o, *common, *_nhl(o), **meta)
    else:
        _short_attn_bwd[grid](q, k, v, grad, dq, dk, dv, *common, *_nhl(grad), *_nhl(dq), **meta)


def _qkv_views(proj: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """(N, H, L, D) views of a fused ``(N, L, 3*H*D)`` projection (``layers._heads``'s)."""
    n, seq_len, width = proj.shape
    split = proj.view(n, seq_len, 3, heads, width // (3 * heads))
    return [split[:, :, i].transpose(1, 2) for i in range(3)]


# The short-attention kernel as torch custom ops (forward and backward each one op, autograd
# registered on the forward): opaque to torch.compile, so a compiled U-Net keeps the kernel for
# the calls it takes (``train.attention_backends`` holds under ``train.compile``) with no graph
# break; eager runs the same ops. The fake implementations give the real outputs' strides.


def _heads_last(n: int, h: int, seq_len: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An empty (N, H, L, D) tensor laid out (N, L, H, D): the heads merge by a view."""
    return like.new_empty(n, seq_len, h, d).transpose(1, 2)


def _last_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("hdvg::short_attention", mutates_args=())
def _short_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (_last_dense(t) for t in (q, k, v))
    o = _heads_last(*q.shape, like=q)
    _short_attn_launch(q, k, v, o=o)
    return o


@torch.library.custom_op("hdvg::short_attention_backward", mutates_args=())
def _short_attention_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, grad = (_last_dense(t) for t in (q, k, v, grad))
    dq, dk, dv = (_heads_last(*q.shape, like=q) for _ in range(3))  # laid out as the output
    _short_attn_launch(q, k, v, grad=grad, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


@torch.library.custom_op("hdvg::short_self_attention", mutates_args=())
def _short_self_attention_op(proj: torch.Tensor, heads: int) -> torch.Tensor:
    proj = proj.contiguous()
    q, k, v = _qkv_views(proj, heads)
    o = _heads_last(*q.shape, like=q)
    _short_attn_launch(q, k, v, o=o)
    return o


@torch.library.custom_op("hdvg::short_self_attention_backward", mutates_args=())
def _short_self_attention_bwd_op(
    proj: torch.Tensor, grad: torch.Tensor, heads: int
) -> torch.Tensor:
    """The fused projection's gradient, written by the kernel through its q, k, v views (no
    stack of dq, dk, dv after)."""
    proj = proj.contiguous()
    dproj = torch.empty_like(proj)
    dq, dk, dv = _qkv_views(dproj, heads)
    _short_attn_launch(*_qkv_views(proj, heads), grad=_last_dense(grad), dq=dq, dk=dk, dv=dv)
    return dproj


@_short_attention_op.register_fake
def _(q, k, v):
    return _heads_last(*q.shape, like=q)


@_short_attention_bwd_op.register_fake
def _(q, k, v, grad):
    return tuple(_heads_last(*q.shape, like=q) for _ in range(3))


@_short_self_attention_op.register_fake
def _(proj, heads):
    return _heads_last(*_qkv_views(proj, heads)[0].shape, like=proj)


@_short_self_attention_bwd_op.register_fake
def _(proj, grad, heads):
    return torch.empty_like(proj, memory_format=torch.contiguous_format)


def _save_inputs(ctx, inputs, output) -> None:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    ctx.save_for_backward(*tensors)
    ctx.heads = inputs[-1] if len(tensors) == 1 else None


_short_attention_op.register_autograd(
    lambda ctx, grad: _short_attention_bwd_op(*ctx.saved_tensors, grad), setup_context=_save_inputs
)
_short_self_attention_op.register_autograd(
    lambda ctx, grad: (_short_self_attention_bwd_op(*ctx.saved_tensors, grad, ctx.heads), None),
    setup_context=_save_inputs,
)


def _nhl(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


SHORT_ATTENTION_MAX = 64  # longest sequence the short-attention kernel takes (rows per tile)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Softmax attention of (N, H, L, D) ``q``, ``k``, ``v`` (self-attention: one length) for
    short sequences -- a pixel's frames -- packing ``64 // L`` sequences into one tile so a
    program reads each element once (flash pads every 16-frame sequence to a 128-row block).
    Any strides with the head dim contiguous; the output is laid out (N, L, H, D), so the
    heads merge by a view. None when the kernel does not take the inputs (longer sequences,
    cross-attention, a head dim that is not a power of two >= 16)."""
    if k.shape != q.shape or v.shape != q.shape or not _short_ok(q, k, v):
        return None
    return _short_attention_op(q, k, v)


def short_self_attention(proj: torch.Tensor, heads: int) -> torch.Tensor | None:
    """:func:`short_attention` of the q, k, v in a fused ``(N, L, 3*H*D)`` projection (a
    contiguous ``to_qkv`` output), whose gradient it writes directly (no stack of three)."""
    if proj.dim() != 3 or not proj.is_contiguous() or proj.shape[-1] % (3 * heads):
        return None
    if not _short_ok(*_qkv_views(proj, heads)):
        return None
    return _short_self_attention_op(proj, heads)


def _short_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (q.shape[2] <= SHORT_ATTENTION_MAX and d >= 16 and not d & (d - 1)
            and all(t.stride(-1) == 1 for t in (q, k, v))
            and max(storage_span(t) for t in (q, k, v)) <= INT32_MAX)  # fmt: skip


def storage_span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last, as its strides reach them."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))


def group_norm(x, weight, bias, groups: int, eps: float, silu: bool, out_dtype, perm=None):
    """Fused group norm (+ SiLU) of ``x`` (N, C, *spatial), output in ``out_dtype`` laid out
    as ``x.permute(perm)`` contiguous (``x``'s own layout when ``perm`` is None); None when
    the layout is one the kernel does not take."""
    if x.dim() < 3 or x.shape[1] % groups or not _is_dense(x) or x.numel() > INT32_MAX:
        return None
    y_stride = x.stride() if perm is None else _perm_strides(x.shape, tuple(perm))
    if _group_layout_of(x.shape, x.stride(), y_stride) is None:
        return None
    return _GroupNorm.apply(x, weight, bias, groups, eps, silu, out_dtype, perm)


def layer_norm(x, weight, bias, eps: float, out_dtype):
    """Fused layer norm over the last dim, rows written contiguous; None when the rows span
    more than :data:`ROW_DIMS` strided dims."""
    if x.dim() < 2 or not _is_dense(x) or x.numel() > INT32_MAX or _row_layout(x) is None:
        return None
    return _LayerNorm.apply(x, weight, bias, eps, out_dtype)


def _is_dense(x: torch.Tensor) -> bool:
    """``x`` fills its memory without gaps or overlap (a permutation of a contiguous tensor):
    ``empty_like`` then keeps its strides, so input, output and gradients share one layout."""
    return _dense_of(x.shape, x.stride())


@functools.lru_cache(maxsize=4096)
def _dense_of(shape: tuple, stride: tuple) -> bool:
    expect = 1
    for st, size in sorted((st, n) for n, st in zip(shape, stride, strict=True) if n != 1):
        if st != expect:
            return False
        expect *= size
    return True


@functools.lru_cache(maxsize=4096)
def _perm_strides(shape: tuple, perm: tuple) -> tuple:
    """Strides of a ``shape`` tensor laid out as its ``permute(perm)`` contiguous."""
    st, acc = [0] * len(perm), 1
    for i in reversed(range(len(perm))):
        st[i] = acc
        acc *= shape[perm[i]]
    inv = sorted(range(len(perm)), key=perm.__getitem__)
    return tuple(st[inv[d]] for d in range(len(shape)))


def geglu(a: torch.Tensor) -> torch.Tensor | None:
    """``h * gelu(gate)`` for ``h, gate = a.chunk(2, -1)``, one read of ``a`` and one write, in
    ``a``'s dtype (fp32 inside); None for a non-contiguous ``a``. No autograd: the caller's
    :class:`hdvg.t2v.layers._GegluFeedForward` keeps ``a`` and calls :func:`geglu_backward`."""
    if not a.is_contiguous() or a.shape[-1] % 2:
        return None
    i = a.shape[-1] // 2
    p = a.new_empty(*a.shape[:-1], i)
    block = min(1024, _pow2(i))
    _geglu_fwd[(a.numel() // (2 * i), -(-i // block))](a, p, i, BLOCK=block)
    return p


def geglu_backward(a: torch.Tensor, grad_p: torch.Tensor, product: bool = False,
                   bias: bool = False):  # fmt: skip
    """The gradient of ``a`` (contiguous, as :func:`geglu` took it) from that of its output,
    in one read of ``a`` and ``grad_p``. Returns ``(grad_a, p, grad_bias)``: ``p`` the product
    recomputed on the way (``product=True``, else None), ``grad_bias`` the fp32 sum of
    ``grad_a`` over all rows (``bias=True``, else None)."""
    i = a.shape[-1] // 2
    m = a.numel() // (2 * i)
    grad_a = torch.empty_like(a)
    p = a.new_empty(*a.shape[:-1], i) if product else grad_a  # (unused pointer if not asked)
    block = min(1024, _pow2(i))
    block_r = max(1, TILE // block)
    rows = block_r * -(-m // (block_r * ROW_PROGRAMS))  # few partial sums to add
    progs = -(-m // rows)
    gb = torch.empty(progs, 2 * i, device=a.device, dtype=torch.float32) if bias else grad_a
    _geglu_bwd[(progs, -(-i // block))](a, grad_p.contiguous(), grad_a, p, gb, m, i, rows,
                                        PRODUCT=product, BIAS=bias, BLOCK_R=block_r,
                                        BLOCK=block, num_warps=WARPS["geglu_bwd"])  # fmt: skip
    return grad_a, (p if product else None), (gb.sum(0) if bias else None)


# --- a GPU build report without a GPU ---------------------------------------------------

_PTR_TYPES = {
    **dict.fromkeys(("X", "Y", "DY", "DX", "A", "P", "GP", "GA"), "*bf16"),
    **dict.fromkeys(("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"), "*bf16"),
    **dict.fromkeys(("W", "B", "MEAN", "RSTD", "DW", "DB", "PART", "PDW", "PDB", "GB"), "*fp32"),
    "RD": "*i32",
    "eps": "fp32",
    "scale": "fp32",
}


def build_cases() -> list[tuple[str, dict]]:
    """(kernel, constexprs) of the paper-size U-Net (SD-2.x widths, 32 groups, latent 32x32 and
    16 frames down to 4x4, batch up to 8): every tile shape its norms and GEGLUs launch."""
    cases: set = set()
    for c in (320, 640, 960, 1280, 1920, 2560):
        for s in (16, 64, 256, 1024, 16 * 16, 16 * 64, 16 * 256, 16 * 1024):
            bc, bs = _group_tiles(c // 32, s)
            for name in ("_gn_stats", "_gn_sums"):
                silu = () if name == "_gn_stats" else (("SILU", True),)
                cases.add((name, (*silu, ("BLOCK_C", bc), ("BLOCK_S", bs))))
            for n in (1, 2, 4, 8, 16, 32, 64, 128):  # videos (temporal norms) or frames
                split = _group_split(n * 32, s, bs)[1]
                for name in ("_gn_fwd", "_gn_bwd"):
                    consts = (("BLOCK_C", bc), ("BLOCK_S", bs), ("BLOCK_K", _pow2(split)))
                    cases.add((name, (("SILU", True), *consts)))
    for c in (320, 640, 1280):
        bc, bm = _row_tiles(c)
        for nd in (1, 6):
            for name in ("_ln_fwd", "_ln_bwd"):
                cases.add((name, (("ND", nd), ("BLOCK_M", bm), ("BLOCK_C", bc))))
    cases.add(("_geglu_fwd", (("BLOCK", 1024),)))
    for name, rows in (
        ("_short_attn_fwd", ATTN_ROWS["fwd"]),
        ("_short_attn_bwd", ATTN_ROWS["bwd"]),
    ):
        cases.add((name, (("LP", 16), ("R", rows), ("D", 64), ("F32", False))))  # 16 frames, d 64
    for product, bias in ((False, False), (True, True)):  # GEGLU widths 1280 to 5120: 1024
        consts = (("PRODUCT", product), ("BIAS", bias), ("BLOCK_R", TILE // 1024))
        cases.add(("_geglu_bwd", (*consts, ("BLOCK", 1024))))
    return [(name, dict(consts)) for name, consts in sorted(cases)]


def build_report(arch: int = 90, cases=None) -> list[dict]:
    """Compile the kernels for ``sm_<arch>`` here (Triton's own ptxas; no GPU) and read each
    cubin's registers per thread and spill (local stack) bytes with its cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for name, consts in cases or build_cases():
        fn = globals()[name]
        sig = {a: "constexpr" if a in consts else _PTR_TYPES.get(a, "i32") for a in fn.arg_names}
        warps = WARPS.get(name.strip("_"), 4)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
        use = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res.stdout))
        rows.append({"kernel": name, **consts, "num_warps": warps, "registers": int(use["REG"]),
                     "spill_bytes": int(use["STACK"]) + int(use["LOCAL"])})  # fmt: skip
    return rows


if __name__ == "__main__":  # python -m hdvg.t2v.kernels [ARCH]: one JSON line per kernel build
    import json
    import sys

    for row in build_report(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(json.dumps(row), flush=True)
