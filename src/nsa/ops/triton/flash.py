"""Flash-style Triton kernels for the two "dense under a mask" branches, forward and backward.

MODE 0, sliding window (§3.3.3): query t reads token keys in [t - w + 1, t] of its own sequence.
MODE 1, compression (Eq. 7): query t reads compressed key i iff i*d + l - 1 <= t; keys are the packed
compressed tokens of the query's sequence.

Layout: q [Tq, HQ, Dk], k [Tk, HKV, Dk], v [Tk, HKV, Dv] packed and contiguous; `cu_q`/`cu_k` int64 [N+1] offsets.
Online softmax in base 2 with fp32 accumulators. Backward: dQ per query tile and dK/dV per key tile (each loops
over the G query heads of its KV head), so no atomics and bitwise-repeatable gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (autotune_configs, device_jit, dot_precision, dq_step, host_offsets, interpreting, next_pow2,
                    online_softmax_step, tile_table)

LOG2E = 1.4426950408889634


@device_jit
def _visible(pos_q, pos_k, WINDOW, CMP_L, CMP_D, MODE: tl.constexpr):
    """Mask of [BM, 1] query positions against [1, BN] key positions (both inside the sequence)."""
    if MODE == 0:
        vis = (pos_k <= pos_q) & (pos_k > pos_q - WINDOW)
    else:
        vis = pos_k * CMP_D + CMP_L - 1 <= pos_q
    return vis


@device_jit
def _key_hi(p_hi, Lk, CMP_L, CMP_D, MODE: tl.constexpr):
    """One past the last key visible to the query at position p_hi."""
    if MODE == 0:
        hi = tl.minimum(p_hi + 1, Lk)
    else:
        n = tl.maximum(p_hi - CMP_L + 1, 0) // CMP_D + 1
        hi = tl.minimum(tl.where(p_hi >= CMP_L - 1, n, 0), Lk)
    return hi


@device_jit
def _tile_seq(TILES, CU_Q, CU_K):
    """Program pid's row of a tile table over CU_Q's rows: its first packed row, its sequence's rows [qs, qe),
    and that sequence's first row and row count in CU_K."""
    pid = tl.program_id(0)
    seq = tl.load(TILES + 2 * pid)
    row0 = tl.load(TILES + 2 * pid + 1).to(tl.int64)
    qs = tl.load(CU_Q + seq).to(tl.int64)
    qe = tl.load(CU_Q + seq + 1).to(tl.int64)
    ks = tl.load(CU_K + seq).to(tl.int64)
    return row0, qs, qe, ks, tl.load(CU_K + seq + 1).to(tl.int64) - ks


@device_jit
def _query_tile(TILES, CU_Q, CU_K, WINDOW, CMP_L, CMP_D, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The query tile of program (pid, .): its first packed row, which of its rows are real, their positions in the
    sequence, the sequence's first key row, and the key range [lo, hi) (lo a multiple of BLOCK_N) its queries can
    see."""
    row0, qs, qe, ks, Lk = _tile_seq(TILES, CU_Q, CU_K)
    rows = row0 + tl.arange(0, BLOCK_M)
    p_lo = row0 - qs
    hi = _key_hi(tl.minimum(row0 + BLOCK_M, qe) - 1 - qs, Lk, CMP_L, CMP_D, MODE)
    if MODE == 0:
        lo = tl.maximum(p_lo - WINDOW + 1, 0)
        lo = lo - lo % BLOCK_N
    else:
        lo = p_lo * 0
    return row0, rows < qe, rows - qs, ks, lo, hi


@device_jit
def _cols(P, base, row_off, ok, DK, LO: tl.constexpr, WIDTH: tl.constexpr):
    """Tile [rows, WIDTH] of head-dim columns LO .. LO + WIDTH - 1 (< DK) at P + base + row_off (zeros past DK)."""
    offs = LO + tl.arange(0, WIDTH)
    return tl.load(P + base + (row_off[:, None] + offs[None, :]), mask=ok[:, None] & (offs[None, :] < DK), other=0.0)


@device_jit
def _key_tile(q, q2, K, V, ks, start, hi, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, qk_scale, pos_q, row_ok, WINDOW, CMP_L,
              CMP_D, MODE: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
              BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Keys start .. start + BLOCK_N - 1 (< hi) of KV head hk: k [BN, BLOCK_DK] and k2 [BN, BLOCK_DK2] (the head
    dim in two power-of-two pieces; k2 is k when BLOCK_DK2 == 0), v [BN, DV], the scaled log2 scores of the query
    tile (q, q2) against them, and the visibility mask."""
    offs_n = tl.arange(0, BLOCK_N)
    cols = start + offs_n
    col_ok = cols < hi
    # an int64 scalar base plus int32 offsets inside the tile (fewer registers than an int64 pointer tile)
    k = _cols(K, (ks + start) * s_kt + hk * s_kh, offs_n * s_kt, col_ok, DK, 0, BLOCK_DK)
    v = _cols(V, (ks + start) * s_vt + hk * s_vh, offs_n * s_vt, col_ok, DV, 0, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BLOCK_DK2 > 0:
        k2 = _cols(K, (ks + start) * s_kt + hk * s_kh, offs_n * s_kt, col_ok, DK, BLOCK_DK, BLOCK_DK2)
        s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
    else:
        k2 = k
    vis = _visible(pos_q[:, None], cols[None, :], WINDOW, CMP_L, CMP_D, MODE)
    return k, k2, v, s * qk_scale, vis & col_ok[None, :] & row_ok[:, None]


@triton.autotune(configs=autotune_configs(), key=["MODE", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "PREC"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, TILES, CU_Q, CU_K,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_lt,
    G, DK, DV, qk_scale, WINDOW, CMP_L, CMP_D,
    MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    hq = tl.program_id(1).to(tl.int64)
    hk = hq // G
    row0, row_ok, pos_q, ks, lo, hi = _query_tile(TILES, CU_Q, CU_K, WINDOW, CMP_L, CMP_D, MODE, BLOCK_M, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _cols(Q, row0 * s_qt + hq * s_qh, offs_m * s_qt, row_ok, DK, 0, BLOCK_DK)
    q2 = _cols(Q, row0 * s_qt + hq * s_qh, offs_m * s_qt, row_ok, DK, BLOCK_DK, BLOCK_DK2) if BLOCK_DK2 > 0 else q

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k, k2, v, s, vis = _key_tile(q, q2, K, V, ks, start, hi, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, qk_scale, pos_q,
                                     row_ok, WINDOW, CMP_L, CMP_D, MODE, PREC, BLOCK_N, BLOCK_DK, BLOCK_DK2,
                                     BLOCK_DV)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, vis, v, PREC)

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(O + row0 * s_ot + hq * s_oh + (offs_m[:, None] * s_ot + offs_dv[None, :]), o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + row0 * s_lt + hq + offs_m * s_lt, lse, mask=row_ok)


@triton.autotune(configs=autotune_configs(), key=["MODE", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "PREC"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, TILES, CU_Q, CU_K,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_lt,
    G, DK, DV, qk_scale, scale, WINDOW, CMP_L, CMP_D,
    MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    hq = tl.program_id(1).to(tl.int64)
    hk = hq // G
    row0, row_ok, pos_q, ks, lo, hi = _query_tile(TILES, CU_Q, CU_K, WINDOW, CMP_L, CMP_D, MODE, BLOCK_M, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    q_base = row0 * s_qt + hq * s_qh
    q = _cols(Q, q_base, offs_m * s_qt, row_ok, DK, 0, BLOCK_DK)
    q2 = _cols(Q, q_base, offs_m * s_qt, row_ok, DK, BLOCK_DK, BLOCK_DK2) if BLOCK_DK2 > 0 else q
    do = _cols(DO, row0 * s_dot + hq * s_doh, offs_m * s_dot, row_ok, DV, 0, BLOCK_DV)
    lse = tl.load(LSE + row0 * s_lt + hq + offs_m * s_lt, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + row0 * s_lt + hq + offs_m * s_lt, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    dq2 = dq  # unused unless the head dim has a second piece
    if BLOCK_DK2 > 0:
        dq2 = tl.zeros([BLOCK_M, BLOCK_DK2], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k, k2, v, s, vis = _key_tile(q, q2, K, V, ks, start, hi, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, qk_scale, pos_q,
                                     row_ok, WINDOW, CMP_L, CMP_D, MODE, PREC, BLOCK_N, BLOCK_DK, BLOCK_DK2,
                                     BLOCK_DV)
        dq, dq2 = dq_step(dq, dq2, s, vis, lse2, delta, do, k, k2, v, PREC, BLOCK_DK2 > 0)
    q_off = offs_m[:, None] * s_qt + offs_dk[None, :]
    tl.store(DQ + q_base + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_dk[None, :] < DK))
    if BLOCK_DK2 > 0:
        offs_dk2 = BLOCK_DK + tl.arange(0, BLOCK_DK2)
        tl.store(DQ + q_base + (offs_m[:, None] * s_qt + offs_dk2[None, :]), (dq2 * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dk2[None, :] < DK))


@triton.autotune(configs=autotune_configs(), key=["MODE", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "PREC"])
@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_, DV_, TILES, CU_Q, CU_K,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_lt, s_split_k, s_split_v,
    G, DK, DV, qk_scale, scale, WINDOW, CMP_L, CMP_D, CHUNK,
    MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    hk = tl.program_id(1).to(tl.int64)
    col0, ks, ke, qs, Lq = _tile_seq(TILES, CU_K, CU_Q)  # a tile table over the keys
    # pointers: an int64 scalar base per tile plus int32 offsets inside it (fewer registers than int64 tiles)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols = col0 + offs_n
    col_ok = cols < ke
    pos_k = cols - ks
    k_base = col0 * s_kt + hk * s_kh
    v_base = col0 * s_vt + hk * s_vh
    k = _cols(K, k_base, offs_n * s_kt, col_ok, DK, 0, BLOCK_DK)
    k2 = _cols(K, k_base, offs_n * s_kt, col_ok, DK, BLOCK_DK, BLOCK_DK2) if BLOCK_DK2 > 0 else k
    v = _cols(V, v_base, offs_n * s_vt, col_ok, DV, 0, BLOCK_DV)

    j_lo = col0 - ks
    j_hi = tl.minimum(col0 + BLOCK_N, ke) - 1 - ks
    if MODE == 0:
        q_lo = j_lo
        q_hi = tl.minimum(j_hi + WINDOW, Lq)
    else:
        q_lo = j_lo * CMP_D + CMP_L - 1
        q_hi = Lq
    # split programs (grid axis 2) take the query positions [sp * CHUNK, (sp + 1) * CHUNK) and write partials
    sp = tl.program_id(2).to(tl.int64)
    q_lo = tl.maximum(q_lo, sp * CHUNK)
    q_hi = tl.minimum(q_hi, (sp + 1) * CHUNK)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    if BLOCK_DK2 > 0:
        dk2 = tl.zeros([BLOCK_N, BLOCK_DK2], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(G):
        hq = hk * G + g
        for m0 in range(q_lo, q_hi, BLOCK_M):
            pos_q = m0 + offs_m
            row_ok = pos_q < q_hi
            row0 = qs + m0
            q = _cols(Q, row0 * s_qt + hq * s_qh, offs_m * s_qt, row_ok, DK, 0, BLOCK_DK)
            do = _cols(DO, row0 * s_dot + hq * s_doh, offs_m * s_dot, row_ok, DV, 0, BLOCK_DV)
            lse = tl.load(LSE + row0 * s_lt + hq + offs_m * s_lt, mask=row_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            delta = tl.load(DELTA + row0 * s_lt + hq + offs_m * s_lt, mask=row_ok, other=0.0)
            # transposed tiles [BN, BM] (keys x queries), so no register tile is transposed for the dots
            st = tl.dot(k, tl.trans(q), input_precision=PREC)
            if BLOCK_DK2 > 0:
                q2 = _cols(Q, row0 * s_qt + hq * s_qh, offs_m * s_qt, row_ok, DK, BLOCK_DK, BLOCK_DK2)
                st += tl.dot(k2, tl.trans(q2), input_precision=PREC)
            vis = _visible(pos_q[None, :], pos_k[:, None], WINDOW, CMP_L, CMP_D, MODE)
            vis = vis & col_ok[:, None] & row_ok[None, :]
            pt = tl.where(vis, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk += tl.dot(dst, q, input_precision=PREC)
            if BLOCK_DK2 > 0:
                dk2 += tl.dot(dst, q2, input_precision=PREC)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(DK_ + sp * s_split_k + k_base + (offs_n[:, None] * s_kt + offs_dk[None, :]),
             (dk * scale).to(DK_.dtype.element_ty), mask=col_ok[:, None] & (offs_dk[None, :] < DK))
    if BLOCK_DK2 > 0:
        offs_dk2 = BLOCK_DK + tl.arange(0, BLOCK_DK2)
        tl.store(DK_ + sp * s_split_k + k_base + (offs_n[:, None] * s_kt + offs_dk2[None, :]),
                 (dk2 * scale).to(DK_.dtype.element_ty), mask=col_ok[:, None] & (offs_dk2[None, :] < DK))
    tl.store(DV_ + sp * s_split_v + v_base + (offs_n[:, None] * s_vt + offs_dv[None, :]),
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


def split_head_dim(d: int) -> tuple[int, int]:
    """The head dim as two power-of-two tile widths (>= 16, as tl.dot needs), the second 0 when one suffices:
    192 -> (128, 64), 128 -> (128, 0), 20 -> (16, 16). Padding 192 to one 256-wide tile would spend a quarter of
    every q/K load and q.k product on zeros."""
    first = max(16, 1 << (max(1, int(d)).bit_length() - 1))
    return (next_pow2(d), 0) if first >= d else (first, next_pow2(d - first))


def _blocks(dk: int, dv: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 16x16 when interpreting; on GPU smaller tiles for wide heads / fp32 (shared memory)."""
    if interpreting():
        return 16, 16
    wide, fp32 = max(dk, dv) > 128, dtype == torch.float32
    if fp32 and max(dk, dv) >= 128:
        return 32, 16  # larger fp32 tiles spill registers on sm_90 even at 8 warps (AOT check)
    return (64, 32) if wide or fp32 else (64, 64)


def _bwd_blocks(dk: int, dv: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the dK/dV kernel: its query step and key tile (dQ uses the forward's tiles). 64x32
    spills registers on sm_90 at 8 warps for Dk > 128 and in fp32, 32x32 does not (cuobjdump through
    benchmarks/triton_aot_check.py, Triton 3.6, with the JIT's divisibility specialisation)."""
    if interpreting():
        return 16, 16
    return (32, 32) if max(dk, dv) > 128 or dtype == torch.float32 else (64, 32)


CMP_SPLIT_QUERIES = 4096  # query positions per dK/dV program of the compressed branch (MODE 1)
CMP_SPLIT_MAX = 16  # at most this many splits ...
CMP_SPLIT_BYTES = 1 << 30  # ... and at most this many bytes of fp32 partials


def _query_split(cu_q: torch.Tensor, mode: int, block_m: int, bytes_per_split: int = 0) -> tuple[int, int]:
    """(CHUNK, NSPLIT) for the dK/dV kernel. Compressed keys are seen by every later query, so at long T one
    program per key tile would loop over the whole sequence (x G heads) while the last tiles finish at once: split
    the query positions into chunks of CMP_SPLIT_QUERIES (fewer, longer chunks past the caps above). Window keys
    see at most w + BLOCK_N queries: no split."""
    bounds = host_offsets(cu_q)
    longest = max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0)
    nsplit = min(triton.cdiv(longest, CMP_SPLIT_QUERIES), CMP_SPLIT_MAX,
                 max(1, CMP_SPLIT_BYTES // max(bytes_per_split, 1)))
    if mode != 1 or nsplit <= 1:
        return max(longest, 1), 1
    chunk = triton.cdiv(triton.cdiv(longest, nsplit), block_m) * block_m
    return chunk, triton.cdiv(longest, chunk)


def masked_attention_fwd(q, k, v, cu_q, cu_k, mode, scale, window, cmp_l, cmp_d):
    """Masked attention (MODE 0: sliding window, 1: compressed tokens, Eq. 7) on contiguous packed tensors q [Tq,HQ,Dk],
    k/v [Tk,HKV,Dk|Dv] with offsets cu_q / cu_k: (o [Tq,HQ,Dv], lse [Tq,HQ] fp32)."""
    Tq, HQ, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[2]
    o = torch.empty(Tq, HQ, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(Tq, HQ, dtype=torch.float32, device=q.device)
    bm, bn = _blocks(Dk, Dv, q.dtype)
    tiles_q = tile_table(cu_q, bm)
    (bdk, bdk2), bdv = split_head_dim(Dk), next_pow2(Dv)
    if tiles_q.shape[0] and HQ:
        _fwd_kernel[(tiles_q.shape[0], HQ)](
            q, k, v, o, lse, tiles_q, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), lse.stride(0),
            HQ // HKV, Dk, Dv, scale * LOG2E, window, cmp_l, cmp_d,
            MODE=mode, PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DK2=bdk2,
            BLOCK_DV=bdv,
        )
    return o, lse


def masked_attention_bwd(q, k, v, o, lse, cu_q, cu_k, do, dlse, mode, scale, window, cmp_l, cmp_d):
    """Gradients (dq, dk, dv) of `masked_attention_fwd` for the output gradient do (None: zero) and the lse
    gradient dlse (None: zero)."""
    Tq, HQ, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[2]
    do = torch.zeros_like(o) if do is None else do.contiguous()
    # delta_t = sum_d dO*O - dlse (the lse term of the chain rule)
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse.float())
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    (bdk, bdk2), bdv = split_head_dim(Dk), next_pow2(Dv)
    prec = dot_precision(q.dtype)
    common = dict(MODE=mode, PREC=prec, BLOCK_DK=bdk, BLOCK_DK2=bdk2, BLOCK_DV=bdv)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1), lse.stride(0))
    bm, bn = _blocks(Dk, Dv, q.dtype)
    tiles_q = tile_table(cu_q, bm)  # the forward's table (cached)
    if tiles_q.shape[0] and HQ:
        _bwd_dq_kernel[(tiles_q.shape[0], HQ)](
            q, k, v, do, lse, delta, dq, tiles_q, cu_q, cu_k, *strides,
            HQ // HKV, Dk, Dv, scale * LOG2E, scale, window, cmp_l, cmp_d, BLOCK_M=bm, BLOCK_N=bn, **common,
        )
    else:
        dq.zero_()
    bm, bn = _bwd_blocks(Dk, Dv, q.dtype)
    tiles_k = tile_table(cu_k, bn)
    if tiles_k.shape[0] and HKV:
        chunk, nsplit = _query_split(cu_q, mode, bm, 4 * (k.numel() + v.numel()))
        dk_out, dv_out = dk, dv
        if nsplit > 1:  # fp32 partials per split, summed in a fixed order below (deterministic)
            dk_out = torch.empty(nsplit, *k.shape, dtype=torch.float32, device=k.device)
            dv_out = torch.empty(nsplit, *v.shape, dtype=torch.float32, device=v.device)
        _bwd_dkv_kernel[(tiles_k.shape[0], HKV, nsplit)](
            q, k, v, do, lse, delta, dk_out, dv_out, tiles_k, cu_q, cu_k, *strides,
            dk_out.stride(0) if nsplit > 1 else 0, dv_out.stride(0) if nsplit > 1 else 0,
            HQ // HKV, Dk, Dv, scale * LOG2E, scale, window, cmp_l, cmp_d, chunk, BLOCK_M=bm, BLOCK_N=bn,
            **common,
        )
        if nsplit > 1:
            dk.copy_(dk_out.sum(0))
            dv.copy_(dv_out.sum(0))
    else:
        dk.zero_()
        dv.zero_()
    return dq, dk, dv


def default_scale(q: torch.Tensor, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)

