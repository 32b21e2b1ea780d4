"""Selected attention (Eq. 12) in Triton: group-centric query tiles, shared KV fetching, deterministic backward.

Tile design (paper §3.4, with the small-group fix of Flash Sparse Attention in spirit): one program owns the
G query heads of one KV head for `BT` consecutive query positions of one sequence, flattened into
`ROWS = max(16, next_pow2(G))` tile rows (row r -> position r // G, head r % G), with `BT = ROWS // G`.
G >= 16 gives BT = 1, the paper's kernel (one query position, all its heads, one tile). Small G packs several
positions into the same tile instead of padding G up to 16 rows. The program streams the *union* of the
positions' selected blocks once (shared KV fetching); each row keeps only the keys of its own position's
blocks, causally. Work per tile is at most what the padded BT = 1 kernel would do, and equal only when the
packed positions share no block. `PACK_SMALL_GROUPS = False` gives the padded kernel (for the benchmark).

Backward: dQ per query tile (same loop as the forward); dK/dV per (selection block, KV head) program that walks a
reverse index (block -> query tiles whose union holds it), built with sort/bincount, so no float atomics and
bitwise-repeatable results.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import LOG2E, split_head_dim
from .utils import (PIPELINED_CONFIGS, autotune_configs, device_jit, dot_precision, dq_step, host_offsets,
                    interpreting, load_cols, next_pow2, online_softmax_step, tile_table)

PACK_SMALL_GROUPS = True
MAX_SEGMENT = 256  # query tiles per dK/dV program; longer reverse lists are split and reduced in order
_BIG = 2**30


@device_jit
def _rows(TILES, CU, IDX, pid, hk, G, N, s_it, s_ih,
          ROWS: tl.constexpr, BT: tl.constexpr, NPAD: tl.constexpr):
    """Per-row (packed token, query head, position, valid) of a tile, its sequence and the rows' own indices."""
    seq = tl.load(TILES + 2 * pid)
    t0 = tl.load(TILES + 2 * pid + 1).to(tl.int64)
    qs = tl.load(CU + seq).to(tl.int64)
    qe = tl.load(CU + seq + 1).to(tl.int64)
    r = tl.arange(0, ROWS)
    tok = t0 + r // G
    row_ok = (r < BT * G) & (tok < qe)
    hq = hk * G + r % G
    if BT > 1:
        offs_n = tl.arange(0, NPAD)
        own = tl.load(IDX + tok[:, None] * s_it + hk * s_ih + offs_n[None, :],
                      mask=row_ok[:, None] & (offs_n[None, :] < N), other=-1)
    else:
        own = tl.zeros([ROWS, NPAD], tl.int32)
    return qs, qe, tok, hq, tok - qs, row_ok, own


@device_jit
def _union_step(ubase, it, NSUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step `it` of a tile's flat loop: (union block, first key of its sub-tile)."""
    if NSUB == 1:
        return tl.load(ubase + it), 0
    return tl.load(ubase + it // NSUB), (it % NSUB) * BLOCK_N


@device_jit
def _member(own, blk, row_ok, BT: tl.constexpr):
    """Rows whose own position selected block `blk` (all rows when BT == 1: the union is their own list)."""
    if BT > 1:
        member = (tl.sum((own == blk).to(tl.int32), 1) > 0) & row_ok
    else:
        member = row_ok
    return member


@device_jit
def _load_block(K, V, qs, L, blk, sub, LP, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, BLOCK_N: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Keys sub .. sub + BLOCK_N - 1 of selection block blk (KV head hk) of the sequence at row qs (length L):
    their positions, which exist, k [BN, BLOCK_DK] and k2 [BN, BLOCK_DK2] (the head dim in two power-of-two
    pieces; k2 is k when BLOCK_DK2 == 0), v [BN, DV] (zeros where not)."""
    offs_n = tl.arange(0, BLOCK_N)
    kpos = blk.to(tl.int64) * LP + sub + offs_n
    k_ok = (sub + offs_n < LP) & (kpos < L)
    k_rows = K + (qs + kpos) * s_kt + hk * s_kh
    k = load_cols(k_rows, k_ok, DK, 0, BLOCK_DK)
    k2 = load_cols(k_rows, k_ok, DK, BLOCK_DK, BLOCK_DK2) if BLOCK_DK2 > 0 else k
    v = load_cols(V + (qs + kpos) * s_vt + hk * s_vh, k_ok, DV, 0, BLOCK_DV)
    return kpos, k_ok, k, k2, v


@device_jit
def _block_tile(q, q2, K, V, qs, L, blk, sub, LP, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, qk_scale, member, pos_q,
                PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """_load_block, plus the scaled log2 scores of the row tile (q, q2) against those keys and the visibility mask
    (row selects blk, key inside the sequence and causal)."""
    kpos, k_ok, k, k2, v = _load_block(K, V, qs, L, blk, sub, LP, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, BLOCK_N,
                                       BLOCK_DK, BLOCK_DK2, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BLOCK_DK2 > 0:
        s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
    return k, k2, v, s * qk_scale, member[:, None] & k_ok[None, :] & (kpos[None, :] <= pos_q[:, None])


@triton.autotune(configs=autotune_configs(PIPELINED_CONFIGS),
                 key=["G", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "BT", "PREC", "NSUB"])
@triton.jit
def _slc_fwd_kernel(
    Q, K, V, O, LSE, IDX, UNION, COUNT, TILES, CU,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_lt, s_it, s_ih, s_ut, s_uh,
    G, N, LP, DK, DV, qk_scale,
    PREC: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, NPAD: tl.constexpr,
    BLOCK_N: tl.constexpr, NSUB: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    qs, qe, tok, hq, pos_q, row_ok, own = _rows(TILES, CU, IDX, pid, hk, G, N, s_it, s_ih, ROWS, BT, NPAD)
    L = qe - qs
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = Q + tok * s_qt + hq * s_qh
    q = load_cols(q_rows, row_ok, DK, 0, BLOCK_DK)
    q2 = load_cols(q_rows, row_ok, DK, BLOCK_DK, BLOCK_DK2) if BLOCK_DK2 > 0 else q
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    cnt = tl.load(COUNT + pid.to(tl.int64) * tl.num_programs(1) + hk)
    ubase = UNION + pid.to(tl.int64) * s_ut + hk * s_uh
    for it in range(cnt * NSUB):  # one flat loop over (block, key sub-tile), so the loads are software-pipelined
        blk, sub = _union_step(ubase, it, NSUB, BLOCK_N)
        member = _member(own, blk, row_ok, BT)
        k, k2, v, s, vis = _block_tile(q, q2, K, V, qs, L, blk, sub, LP, hk, s_kt, s_kh, s_vt, s_vh, DK, DV,
                                       qk_scale, member, pos_q, PREC, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, vis, v, PREC)
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(O + tok[:, None] * s_ot + hq[:, None] * s_oh + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + tok * s_lt + hq, lse, mask=row_ok)


@triton.autotune(configs=autotune_configs(PIPELINED_CONFIGS),
                 key=["G", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "BT", "PREC", "NSUB"])
@triton.jit
def _slc_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDX, UNION, COUNT, TILES, CU,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_lt, s_it, s_ih, s_ut, s_uh,
    G, N, LP, DK, DV, qk_scale, scale,
    PREC: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, NPAD: tl.constexpr,
    BLOCK_N: tl.constexpr, NSUB: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    qs, qe, tok, hq, pos_q, row_ok, own = _rows(TILES, CU, IDX, pid, hk, G, N, s_it, s_ih, ROWS, BT, NPAD)
    L = qe - qs
    q_rows = Q + tok * s_qt + hq * s_qh
    q = load_cols(q_rows, row_ok, DK, 0, BLOCK_DK)
    q2 = load_cols(q_rows, row_ok, DK, BLOCK_DK, BLOCK_DK2) if BLOCK_DK2 > 0 else q
    do = load_cols(DO + tok * s_dot + hq * s_doh, row_ok, DV, 0, BLOCK_DV)
    lse = tl.load(LSE + tok * s_lt + hq, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + tok * s_lt + hq, mask=row_ok, other=0.0)
    dq = tl.zeros([ROWS, BLOCK_DK], tl.float32)
    dq2 = dq  # unused unless the head dim has a second piece
    if BLOCK_DK2 > 0:
        dq2 = tl.zeros([ROWS, BLOCK_DK2], tl.float32)
    cnt = tl.load(COUNT + pid.to(tl.int64) * tl.num_programs(1) + hk)
    ubase = UNION + pid.to(tl.int64) * s_ut + hk * s_uh
    for it in range(cnt * NSUB):  # one flat loop over (block, key sub-tile), so the loads are software-pipelined
        blk, sub = _union_step(ubase, it, NSUB, BLOCK_N)
        member = _member(own, blk, row_ok, BT)
        k, k2, v, s, vis = _block_tile(q, q2, K, V, qs, L, blk, sub, LP, hk, s_kt, s_kh, s_vt, s_vh, DK, DV,
                                       qk_scale, member, pos_q, PREC, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV)
        dq, dq2 = dq_step(dq, dq2, s, vis, lse2, delta, do, k, k2, v, PREC, BLOCK_DK2 > 0)
    offs_dk = tl.arange(0, BLOCK_DK)
    dq_rows = DQ + tok * s_qt + hq * s_qh
    tl.store(dq_rows[:, None] + offs_dk[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dk[None, :] < DK))
    if BLOCK_DK2 > 0:
        offs_dk2 = BLOCK_DK + tl.arange(0, BLOCK_DK2)
        tl.store(dq_rows[:, None] + offs_dk2[None, :], (dq2 * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dk2[None, :] < DK))


@triton.autotune(configs=autotune_configs(), key=["G", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "BT", "PREC"])
@triton.jit
def _slc_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_, DV_, PART_K, PART_V, IDX, REV, SEGMENTS, KV_BLOCKS, TILES, CU,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_lt, s_it, s_ih,
    G, N, LP, NSUB, NB_TOTAL, DK, DV, qk_scale, scale,
    PREC: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, NPAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr,
    LP_PAD: tl.constexpr, PART_DK: tl.constexpr,
):
    """One program per (reverse-index segment, key sub-tile). A block whose list is split over several
    segments writes fp32 partials to PART_*[slot]; `_slc_dkv_reduce_kernel` sums them in segment order."""
    pid0 = tl.program_id(0)
    seg = pid0 // NSUB
    sub = (pid0 % NSUB) * BLOCK_N
    key = tl.load(SEGMENTS + 4 * seg).to(tl.int64)
    e0 = tl.load(SEGMENTS + 4 * seg + 1)
    e1 = tl.load(SEGMENTS + 4 * seg + 2)
    slot = tl.load(SEGMENTS + 4 * seg + 3).to(tl.int64)
    hk = key // NB_TOTAL
    gb = key % NB_TOTAL
    seq = tl.load(KV_BLOCKS + 2 * gb)
    blk = tl.load(KV_BLOCKS + 2 * gb + 1)
    qs = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1).to(tl.int64) - qs
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    kpos, k_ok, k, k2, v = _load_block(K, V, qs, L, blk, sub, LP, hk, s_kt, s_kh, s_vt, s_vh, DK, DV, BLOCK_N,
                                       BLOCK_DK, BLOCK_DK2, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    if BLOCK_DK2 > 0:
        dk2 = tl.zeros([BLOCK_N, BLOCK_DK2], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for e in range(e0, e1):
        tile = tl.load(REV + e)
        _, _, tok, hq, pos_q, row_ok, own = _rows(TILES, CU, IDX, tile, hk, G, N, s_it, s_ih, ROWS, BT, NPAD)
        member = _member(own, blk, row_ok, BT)
        q_rows = Q + tok * s_qt + hq * s_qh
        q = load_cols(q_rows, row_ok, DK, 0, BLOCK_DK)
        do = load_cols(DO + tok * s_dot + hq * s_doh, row_ok, DV, 0, BLOCK_DV)
        lse = tl.load(LSE + tok * s_lt + hq, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        delta = tl.load(DELTA + tok * s_lt + hq, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if BLOCK_DK2 > 0:
            q2 = load_cols(q_rows, row_ok, DK, BLOCK_DK, BLOCK_DK2)
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        vis = member[:, None] & k_ok[None, :] & (kpos[None, :] <= pos_q[:, None])
        p = tl.where(vis, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = tl.trans((p * (dp - delta[:, None])).to(q.dtype))
        dk += tl.dot(ds, q, input_precision=PREC)
        if BLOCK_DK2 > 0:
            dk2 += tl.dot(ds, q2, input_precision=PREC)
    direct = (offs_n * 0 + slot) < 0  # [BLOCK_N]: this segment owns the whole list
    mv = k_ok[:, None] & (offs_dv[None, :] < DV)
    k_rows = (qs + kpos) * s_kt + hk * s_kh
    prow = tl.maximum(slot, 0) * LP_PAD + sub + offs_n  # partial rows are PART_DK wide (the padded head dim)
    for piece in tl.static_range(2 if BLOCK_DK2 > 0 else 1):
        if piece == 0:
            cols = offs_dk
            val = dk * scale
        else:
            cols = BLOCK_DK + tl.arange(0, BLOCK_DK2)
            val = dk2 * scale
        mk = k_ok[:, None] & (cols[None, :] < DK)
        tl.store(DK_ + k_rows[:, None] + cols[None, :], val.to(DK_.dtype.element_ty), mask=mk & direct[:, None])
        tl.store(PART_K + prow[:, None] * PART_DK + cols[None, :], val, mask=mk & (direct[:, None] == 0))
    tl.store(DV_ + (qs + kpos)[:, None] * s_vt + hk * s_vh + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=mv & direct[:, None])
    tl.store(PART_V + prow[:, None] * BLOCK_DV + offs_dv[None, :], dv, mask=mv & (direct[:, None] == 0))


@triton.jit
def _slc_dkv_reduce_kernel(
    DK_, DV_, PART_K, PART_V, SPLITS, KV_BLOCKS, CU,
    s_kt, s_kh, s_vt, s_vh, LP, NSUB, NB_TOTAL, DK, DV,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, LP_PAD: tl.constexpr,
):
    """dK/dV of a block whose reverse list was split: the sum of its partials in a fixed order (deterministic)."""
    pid0 = tl.program_id(0)
    i = pid0 // NSUB
    sub = (pid0 % NSUB) * BLOCK_N
    key = tl.load(SPLITS + 3 * i).to(tl.int64)
    first = tl.load(SPLITS + 3 * i + 1).to(tl.int64)
    nseg = tl.load(SPLITS + 3 * i + 2)
    hk = key // NB_TOTAL
    gb = key % NB_TOTAL
    seq = tl.load(KV_BLOCKS + 2 * gb)
    blk = tl.load(KV_BLOCKS + 2 * gb + 1)
    qs = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1).to(tl.int64) - qs
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    kpos = blk.to(tl.int64) * LP + sub + offs_n
    k_ok = (sub + offs_n < LP) & (kpos < L)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for j in range(nseg):
        prow = (first + j) * LP_PAD + sub + offs_n
        dk += tl.load(PART_K + prow[:, None] * BLOCK_DK + offs_dk[None, :],
                      mask=k_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
        dv += tl.load(PART_V + prow[:, None] * BLOCK_DV + offs_dv[None, :],
                      mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    tl.store(DK_ + (qs + kpos)[:, None] * s_kt + hk * s_kh + offs_dk[None, :], dk.to(DK_.dtype.element_ty),
             mask=k_ok[:, None] & (offs_dk[None, :] < DK))
    tl.store(DV_ + (qs + kpos)[:, None] * s_vt + hk * s_vh + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=k_ok[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------- host side
def tile_shape(G: int, packed: bool | None = None) -> tuple[int, int]:
    """(ROWS, BT): tile rows and query positions per tile for group size G."""
    packed = PACK_SMALL_GROUPS if packed is None else packed
    rows = next_pow2(G)
    return rows, (max(1, rows // G) if packed else 1)


def _block_n(lp: int, rows: int, d: int, dtype: torch.dtype) -> int:
    """Key sub-tile inside a selection block: 16 when interpreting; on GPU bounded by shared memory, and in fp32 by
    registers (16 keys for head dims >= 128 and 32 below keep the sm_90 dK/dV build from spilling at 8 warps)."""
    if interpreting():
        return min(next_pow2(lp), 16)
    if dtype == torch.float32:
        return min(next_pow2(lp), 16 if d >= 128 else 32)
    return min(next_pow2(lp), 32 if d > 128 and rows > 16 else 64)


REDUCE_WARPS = 8  # dK/dV partial sums: [64, Dk] + [64, Dv] fp32 accumulators spill with 4 warps on sm_90


class SelectionPlan:
    """Index preprocessing shared by forward and backward (all torch ops, on the indices' device).

    idx    int32 [Tt, HKV, n]: -1 where the entry is ignored (negative, or after the query's own block).
    union  int32 [NT, HKV, BT*n]: ascending distinct blocks of each tile's positions, -1 padded; count [NT, HKV].
    `build_reverse()` (backward only, so an inference forward skips it) adds
    rev/rev_off: CSR reverse index, (KV head, global block) -> query tiles ascending; kv_blocks [NB, 2];
    segments [NS, 4] (key, start, end, partial slot or -1): the dK/dV programs; splits [NM, 3] (key, first
    slot, count): blocks whose list was split, reduced in slot order.
    """

    def __init__(self, indices, cu, block_size, G, packed=None):
        Tt, HKV, n = indices.shape
        dev = indices.device
        self.cu, self.block_size = cu, block_size
        self.rows, self.bt = tile_shape(G, packed)
        lengths = cu[1:] - cu[:-1]
        seq_of = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths, output_size=Tt)
        pos = torch.arange(Tt, device=dev) - cu[:-1][seq_of]
        idx = indices.long()
        ok = (idx >= 0) & (idx <= (pos // block_size)[:, None, None])
        self.idx = torch.where(ok, idx, -1).to(torch.int32).contiguous()
        self.tiles = tile_table(cu, self.bt)
        NT = self.tiles.shape[0]
        if self.bt == 1:  # the union is the position's own list
            u = torch.where(self.idx < 0, _BIG, self.idx.long())
        else:
            tok = self.tiles[:, 1:2].long() + torch.arange(self.bt, device=dev)
            tok_ok = tok < cu[self.tiles[:, 0].long() + 1][:, None]
            gathered = self.idx[tok.clamp(max=max(Tt - 1, 0))].long()  # [NT, BT, HKV, n]
            gathered = gathered.masked_fill(~tok_ok[:, :, None, None], -1)
            u = gathered.permute(0, 2, 1, 3).reshape(NT, HKV, self.bt * n)
            u = torch.where(u < 0, _BIG, u)
        u = u.sort(-1).values
        dup = torch.zeros_like(u, dtype=torch.bool)
        dup[..., 1:] = u[..., 1:] == u[..., :-1]
        u = torch.where(dup, _BIG, u).sort(-1).values
        # full width BT*n (an upper bound): no device sync for the widest union; programs stop at their count
        self.count = (u < _BIG).sum(-1).to(torch.int32).contiguous()
        self.union = torch.where(u == _BIG, -1, u).to(torch.int32).contiguous()
        self.n = n
        self.npad = next_pow2(n, lo=2)
        self.rev = None

    def build_reverse(self):
        """The reverse index and dK/dV segments (see the class docstring); idempotent."""
        if self.rev is not None:
            return self
        cu, dev = self.cu, self.union.device
        NT, HKV = self.union.shape[:2]
        lengths = cu[1:] - cu[:-1]
        nb = (lengths + self.block_size - 1) // self.block_size
        blk_off = torch.zeros(len(nb) + 1, dtype=torch.long, device=dev)
        blk_off[1:] = nb.cumsum(0)
        bounds = host_offsets(cu)
        self.nb_total = sum(-(-(e - s) // self.block_size) for s, e in zip(bounds[:-1], bounds[1:]))
        kv_seq = torch.repeat_interleave(torch.arange(len(nb), device=dev), nb, output_size=self.nb_total)
        kv_blk = torch.arange(self.nb_total, device=dev) - blk_off[:-1][kv_seq]
        self.kv_blocks = torch.stack([kv_seq, kv_blk], 1).to(torch.int32).contiguous()
        nkeys = HKV * self.nb_total
        tile_id = torch.arange(NT, device=dev)[:, None, None].expand_as(self.union)
        head = torch.arange(HKV, device=dev)[None, :, None].expand_as(self.union)
        gblk = blk_off[self.tiles[:, 0].long()][:, None, None] + self.union.long()
        key = torch.where(self.union >= 0, head * self.nb_total + gblk, nkeys).flatten()  # nkeys: no entry
        sorted_key, order = torch.sort(key, stable=True)  # the valid entries first, grouped by (head, block)
        # off[i] = entries with key < i (bincount would read its max back from the device to size its output)
        off = torch.searchsorted(sorted_key, torch.arange(nkeys + 1, device=dev))
        self.rev_off = off.to(torch.int32).contiguous()
        # split long lists (the init block is selected by every query) into segments of <= MAX_SEGMENT tiles
        cnt = off[1:] - off[:-1]
        nseg = ((cnt + MAX_SEGMENT - 1) // MAX_SEGMENT).clamp(min=1)
        multi = nseg > 1
        # the one device read of the backward's planning: entries, segments, partial slots, split lists
        entries, total, self.num_slots, n_multi = torch.stack(
            [off[-1], nseg.sum(), (nseg * multi).sum(), multi.sum()]).tolist()
        self.rev = tile_id.flatten()[order[:entries]].to(torch.int32).contiguous()
        seg_key = torch.repeat_interleave(torch.arange(len(cnt), device=dev), nseg, output_size=total)
        first_seg = nseg.cumsum(0) - nseg
        start = off[:-1][seg_key] + (torch.arange(total, device=dev) - first_seg[seg_key]) * MAX_SEGMENT
        end = torch.minimum(start + MAX_SEGMENT, off[1:][seg_key])
        split = nseg[seg_key] > 1
        slot = torch.where(split, split.long().cumsum(0) - 1, -1)
        self.segments = torch.stack([seg_key, start, end, slot], 1).to(torch.int32).contiguous()
        multi_keys = torch.sort((~multi).to(torch.int8), stable=True).indices[:n_multi]  # ascending keys
        self.splits = torch.stack([multi_keys, slot[first_seg[multi_keys]], nseg[multi_keys]], 1).to(
            torch.int32).contiguous()
        return self


def _slc_meta(plan, block_size, Dk, Dv, dtype):
    """The kernels' tile constants for a plan, and the key sub-tiles per selection block."""
    meta = dict(PREC=dot_precision(dtype), ROWS=plan.rows, BT=plan.bt, NPAD=plan.npad,
                BLOCK_N=_block_n(block_size, plan.rows, max(Dk, Dv), dtype),
                BLOCK_DK=split_head_dim(Dk)[0], BLOCK_DK2=split_head_dim(Dk)[1], BLOCK_DV=next_pow2(Dv))
    return meta, triton.cdiv(block_size, meta["BLOCK_N"])


def selected_fwd(q, k, v, indices, cu, block_size, scale, packed=None):
    """Selected attention (Eq. 12) on contiguous packed q [Tt,HQ,Dk], k/v [Tt,HKV,Dk|Dv], indices [Tt,HKV,n]:
    (o [Tt,HQ,Dv], lse [Tt,HQ] fp32, plan)."""
    Tt, HQ, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[2]
    G = HQ // HKV
    plan = SelectionPlan(indices, cu, block_size, G, packed)
    o = torch.empty(Tt, HQ, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(Tt, HQ, dtype=torch.float32, device=q.device)
    meta, nsub = _slc_meta(plan, block_size, Dk, Dv, q.dtype)
    NT = plan.tiles.shape[0]
    if NT and HKV:
        _slc_fwd_kernel[(NT, HKV)](
            q, k, v, o, lse, plan.idx, plan.union, plan.count, plan.tiles, cu,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), lse.stride(0), plan.idx.stride(0), plan.idx.stride(1),
            plan.union.stride(0), plan.union.stride(1),
            G, plan.n, block_size, Dk, Dv, scale * LOG2E, NSUB=nsub, **meta,
        )
    return o, lse, plan


def selected_bwd(q, k, v, o, lse, cu, do, plan, block_size, scale, dlse=None):
    """Gradients (dq, dk, dv) of `selected_fwd`; `plan` is the forward's (its reverse index is built here); dlse,
    the gradient of lse (None: zero), enters through delta = rowsum(dO * O) - dlse."""
    plan = plan.build_reverse()
    Tt, HQ, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[2]
    G = HQ // HKV
    meta, nsub = _slc_meta(plan, block_size, Dk, Dv, q.dtype)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse.float())
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1), lse.stride(0), plan.idx.stride(0), plan.idx.stride(1))
    NT = plan.tiles.shape[0]
    if NT and HKV:
        _slc_bwd_dq_kernel[(NT, HKV)](
            q, k, v, do, lse, delta, dq, plan.idx, plan.union, plan.count, plan.tiles, cu,
            *strides, plan.union.stride(0), plan.union.stride(1),
            G, plan.n, block_size, Dk, Dv, scale * LOG2E, scale, NSUB=nsub, **meta,
        )
    else:
        dq.zero_()
    if plan.nb_total and HKV:
        lp_pad = nsub * meta["BLOCK_N"]
        part_dk = next_pow2(Dk)  # partial rows hold the whole (padded) head dim; the reduce reads one tile
        part_k = torch.empty(plan.num_slots * lp_pad, part_dk, dtype=torch.float32, device=q.device)
        part_v = torch.empty(plan.num_slots * lp_pad, meta["BLOCK_DV"], dtype=torch.float32, device=q.device)
        _slc_bwd_dkv_kernel[(plan.segments.shape[0] * nsub,)](
            q, k, v, do, lse, delta, dk, dv, part_k, part_v, plan.idx, plan.rev, plan.segments, plan.kv_blocks,
            plan.tiles, cu, *strides, G, plan.n, block_size, nsub, plan.nb_total, Dk, Dv, scale * LOG2E, scale,
            LP_PAD=lp_pad, PART_DK=part_dk, **meta,
        )
        if plan.splits.shape[0]:
            _slc_dkv_reduce_kernel[(plan.splits.shape[0] * nsub,)](
                dk, dv, part_k, part_v, plan.splits, plan.kv_blocks, cu, k.stride(0), k.stride(1), v.stride(0),
                v.stride(1), block_size, nsub, plan.nb_total, Dk, Dv, BLOCK_N=meta["BLOCK_N"],
                BLOCK_DK=part_dk, BLOCK_DV=meta["BLOCK_DV"], LP_PAD=lp_pad, num_warps=REDUCE_WARPS,
            )
    else:
        dk.zero_()
        dv.zero_()
    return dq, dk, dv
