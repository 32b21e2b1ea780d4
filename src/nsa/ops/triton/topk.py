"""Online top-n block selection (Eq. 8-11) in Triton, without a [T, Tc] or [T, Nb] score matrix.

One program per (query position, KV head) walks its valid selection blocks in chunks of BLOCK_J. For a chunk it
recomputes the Eq. 8 probabilities of the overlapping compressed tokens from the cmp branch's lse
(p = exp(scale q.k - lse), all G heads of the group in one tile), remaps them with the Eq. 9 overlap weights
|cmp_i ∩ slc_j| / d, sums over the heads (Eq. 10), forces init/local blocks (+inf), and merges the chunk into a
running top-n kept in registers by rank counting (ties go to the lower block index, Eq. 11).
Extra memory: the [T, HKV, n] output only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import LOG2E, default_scale, dense_masked_attention
from .utils import (autotune_configs, cmp_offsets, device_jit, dot_precision, interpreting, next_pow2, pack,
                    seq_offsets)

_BIG = 2**62


@device_jit
def _beats(xs, xj, ys, yj):
    """[X, Y]: x ranks above y (higher score; ties go to the lower block index)."""
    return (xs[:, None] > ys[None, :]) | ((xs[:, None] == ys[None, :]) & (xj[:, None] < yj[None, :]))


@device_jit
def _merge(best_s, best_j, cand_s, cand_j, slot_ok, N):
    """Top-N of (kept slots ∪ candidates) by rank counting; new winners fill the freed slots in order."""
    rank_b = tl.sum(_beats(best_s, best_j, best_s, best_j).to(tl.int32), 0) + \
        tl.sum(_beats(cand_s, cand_j, best_s, best_j).to(tl.int32), 0)
    rank_c = tl.sum(_beats(best_s, best_j, cand_s, cand_j).to(tl.int32), 0) + \
        tl.sum(_beats(cand_s, cand_j, cand_s, cand_j).to(tl.int32), 0)
    keep_b = slot_ok & (best_s > float("-inf")) & (rank_b < N)
    keep_c = (cand_s > float("-inf")) & (rank_c < N)
    free = slot_ok & (keep_b == 0)
    fr = tl.cumsum(free.to(tl.int32), 0) - 1
    cr = tl.cumsum(keep_c.to(tl.int32), 0) - 1
    assign = keep_c[:, None] & free[None, :] & (cr[:, None] == fr[None, :])
    got = tl.sum(assign.to(tl.int32), 0) > 0
    new_s = tl.sum(tl.where(assign, cand_s[:, None], 0.0), 0)
    new_j = tl.sum(tl.where(assign, cand_j[:, None], 0), 0)
    best_s = tl.where(keep_b, best_s, tl.where(got, new_s, float("-inf")))
    best_j = tl.where(keep_b, best_j, tl.where(got, new_j, -1))
    return best_s, best_j

@triton.autotune(configs=autotune_configs(), key=["GP", "BLOCK_DK", "BLOCK_J", "CI", "NPAD", "PREC"])
@triton.jit
def _topn_kernel(
    Q, KC, LSE, OUT, SEQ_OF, CU, CCU,
    s_qt, s_qh, s_kt, s_kh, s_lt, s_ot, s_oh,
    G, DK, N, qk_scale, CMP_L, CMP_D, LP, N_INIT, N_LOCAL,
    PREC: tl.constexpr, GP: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_J: tl.constexpr, CI: tl.constexpr,
    NPAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    seq = tl.load(SEQ_OF + t)
    qs = tl.load(CU + seq).to(tl.int64)
    cs = tl.load(CCU + seq).to(tl.int64)
    tc = tl.load(CCU + seq + 1).to(tl.int64) - cs
    pos = t - qs
    own = pos // LP
    # compressed tokens visible to this position (Eq. 7)
    nvis = tl.where(pos >= CMP_L - 1, (tl.maximum(pos - CMP_L + 1, 0)) // CMP_D + 1, 0)
    nvis = tl.minimum(nvis, tc)

    g = tl.arange(0, GP)
    g_ok = g < G
    hq = hk * G + g
    offs_d = tl.arange(0, BLOCK_DK)
    q = tl.load(Q + t * s_qt + hq[:, None] * s_qh + offs_d[None, :],
                mask=g_ok[:, None] & (offs_d[None, :] < DK), other=0.0)
    lse = tl.load(LSE + t * s_lt + hq, mask=g_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)

    slot = tl.arange(0, NPAD)
    slot_ok = slot < N
    best_s = tl.full([NPAD], float("-inf"), tl.float32)
    best_j = tl.full([NPAD], -1, tl.int64)
    jj = tl.arange(0, BLOCK_J)
    ci = tl.arange(0, CI)
    for j0 in range(0, own + 1, BLOCK_J):
        # compressed tokens that overlap blocks [j0, j0 + BLOCK_J)
        i_lo = tl.maximum(j0 * LP - CMP_L + CMP_D, 0) // CMP_D
        i = i_lo + ci
        i_ok = i < nvis
        kc = tl.load(KC + (cs + i)[:, None] * s_kt + hk * s_kh + offs_d[None, :],
                     mask=i_ok[:, None] & (offs_d[None, :] < DK), other=0.0)
        s = tl.dot(q, tl.trans(kc), input_precision=PREC) * qk_scale
        p = tl.where(g_ok[:, None] & i_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)  # Eq. 8
        psum = tl.sum(p, 0)  # Eq. 10 (the sum over heads commutes with Eq. 9)
        j = j0 + jj
        lo = tl.maximum(i[:, None] * CMP_D, j[None, :] * LP)
        hi = tl.minimum(i[:, None] * CMP_D + CMP_L, (j[None, :] + 1) * LP)
        w = tl.maximum(hi - lo, 0).to(tl.float32) / CMP_D  # Eq. 9 overlap weights [CI, BLOCK_J]
        score = tl.sum(psum[:, None] * w, 0)
        forced = (j < N_INIT) | (j > own - N_LOCAL)
        score = tl.where(forced, float("inf"), score)
        score = tl.where(j <= own, score, float("-inf"))
        best_s, best_j = _merge(best_s, best_j, score, j.to(tl.int64), slot_ok, N)
    tl.store(OUT + t * s_ot + hk * s_oh + slot, best_j, mask=slot_ok)


def _chunk(lp: int, l: int, d: int, dk: int = 128, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(BLOCK_J, CI): blocks per chunk and the compressed-token tile that covers them."""
    bj = 8 if interpreting() or (dk > 128 and dtype == torch.float32) else 16
    return bj, next_pow2(bj * lp // d + l // d)


def topn_from_lse(q, k_cmp, lse, cu, ccu, *, config, scale):
    """Packed q [Tt,HQ,Dk], k_cmp [Tc,HKV,Dk], cmp-branch lse [Tt,HQ] -> int64 [Tt,HKV,n] (ascending, -1 pad)."""
    Tt, HQ, Dk = q.shape
    HKV = k_cmp.shape[1]
    n = config.num_selected
    out = torch.empty(Tt, HKV, n, dtype=torch.int64, device=q.device)
    if Tt == 0 or HKV == 0:
        return out
    q, k_cmp, lse = q.contiguous(), k_cmp.contiguous(), lse.contiguous().float()
    lengths = cu[1:] - cu[:-1]
    seq_of = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths, output_size=Tt)
    bj, ci = _chunk(config.slc_block_size, config.cmp_block_size, config.cmp_stride, Dk, q.dtype)
    G = HQ // HKV
    _topn_kernel[(Tt, HKV)](
        q, k_cmp, lse, out, seq_of.to(torch.int32), cu, ccu,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        G, Dk, n, scale * LOG2E, config.cmp_block_size, config.cmp_stride, config.slc_block_size,
        config.num_init_blocks, config.num_local_blocks,
        PREC=dot_precision(q.dtype), GP=next_pow2(G), BLOCK_DK=next_pow2(Dk), BLOCK_J=bj, CI=ci,
        NPAD=next_pow2(n, lo=2),
    )
    # ascending order with -1 padding last (O(T n) work)
    out = torch.where(out < 0, _BIG, out).sort(-1).values
    return out.masked_fill(out == _BIG, -1)


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None):
    """Indices [B,T,HKV,n] of the selected blocks (Eq. 8-11), same contract as the reference."""
    with torch.no_grad():
        B, T, HQ, _ = q.shape
        sc = default_scale(q, scale)
        cu = seq_offsets(B, T, cu_seqlens, q.device)
        ccu = cmp_offsets(B, k_cmp.shape[1], cu_seqlens, config.cmp_block_size, config.cmp_stride, q.device)
        qp, kp = pack(q), pack(k_cmp)
        _, lse = dense_masked_attention(qp, kp, kp, cu, ccu, mode=1, scale=sc, cmp_l=config.cmp_block_size,
                                        cmp_d=config.cmp_stride)
        idx = topn_from_lse(qp, kp, lse, cu, ccu, config=config, scale=sc)
        return idx.reshape(B, T, *idx.shape[1:])
