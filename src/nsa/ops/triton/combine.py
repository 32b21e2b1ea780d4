"""Fused gate combination (Eq. 5): o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win, forward and backward.

One pass each way instead of the 5 elementwise ops (+3 products and 3 reductions in backward) of the eager form.
Rows are (token, query head) pairs; o_* [R, Dv], gates [R, 3]. Math in fp32, outputs in the input dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import device_jit, interpreting, next_pow2


@device_jit
def _load_rows(A, B, C, GATE, R, D, s_g, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows: (r, mask, offsets, the three gates [BLOCK_R], the three branch outputs) in fp32."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    m = (r < R)[:, None] & (d < D)[None, :]
    off = r[:, None] * D + d[None, :]
    g0 = tl.load(GATE + r * s_g, mask=r < R, other=0.0).to(tl.float32)
    g1 = tl.load(GATE + r * s_g + 1, mask=r < R, other=0.0).to(tl.float32)
    g2 = tl.load(GATE + r * s_g + 2, mask=r < R, other=0.0).to(tl.float32)
    a = tl.load(A + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + off, mask=m, other=0.0).to(tl.float32)
    c = tl.load(C + off, mask=m, other=0.0).to(tl.float32)
    return r, m, off, g0, g1, g2, a, b, c


@triton.jit
def _combine_fwd_kernel(A, B, C, GATE, O, R, D, s_g, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r, m, off, g0, g1, g2, a, b, c = _load_rows(A, B, C, GATE, R, D, s_g, BLOCK_R, BLOCK_D)
    o = g0[:, None] * a + g1[:, None] * b + g2[:, None] * c
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _combine_bwd_kernel(A, B, C, GATE, DO, DA, DB, DC, DG, R, D, s_g,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r, m, off, g0, g1, g2, a, b, c = _load_rows(A, B, C, GATE, R, D, s_g, BLOCK_R, BLOCK_D)
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DA + off, (g0[:, None] * do).to(DA.dtype.element_ty), mask=m)
    tl.store(DB + off, (g1[:, None] * do).to(DB.dtype.element_ty), mask=m)
    tl.store(DC + off, (g2[:, None] * do).to(DC.dtype.element_ty), mask=m)
    tl.store(DG + r * 3, tl.sum(do * a, 1).to(DG.dtype.element_ty), mask=r < R)
    tl.store(DG + r * 3 + 1, tl.sum(do * b, 1).to(DG.dtype.element_ty), mask=r < R)
    tl.store(DG + r * 3 + 2, tl.sum(do * c, 1).to(DG.dtype.element_ty), mask=r < R)


COMBINE_WARPS = 8  # 4096-element row blocks: the backward spills registers on sm_90 with 4 warps (AOT check)


def _block_r(D: int) -> int:
    return 16 if interpreting() else max(1, 4096 // next_pow2(D))


def combine_fwd(a, b, c, g):
    """o = g0*a + g1*b + g2*c on contiguous rows a/b/c [R, D], g [R, 3]."""
    R, D = a.shape
    o = torch.empty_like(a)
    br = _block_r(D)
    if R:
        _combine_fwd_kernel[(triton.cdiv(R, br),)](a, b, c, g, o, R, D, g.stride(0), BLOCK_R=br,
                                                   BLOCK_D=next_pow2(D, lo=1), num_warps=COMBINE_WARPS)
    return o


def combine_bwd(a, b, c, g, do):
    """(da, db, dc, dg) of `combine_fwd` for the output gradient do [R, D]."""
    R, D = a.shape
    do = do.contiguous().reshape(R, D)
    da, db, dc = torch.empty_like(a), torch.empty_like(b), torch.empty_like(c)
    dg = torch.empty_like(g)
    br = _block_r(D)
    if R:
        _combine_bwd_kernel[(triton.cdiv(R, br),)](a, b, c, g, do, da, db, dc, dg, R, D, g.stride(0),
                                                   BLOCK_R=br, BLOCK_D=next_pow2(D, lo=1), num_warps=COMBINE_WARPS)
    return da, db, dc, dg
