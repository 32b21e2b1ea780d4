"""Online top-n block selection (Eq. 8-11) in Triton, without a [T, Tc] or [T, Nb] score matrix.

One program per (tile of BT query positions of one sequence, KV head): its BT*G query rows (all G heads of the
group, group-centric) walk the tile's valid selection blocks in chunks of BJ. A chunk loads the compressed keys
that start inside its blocks once for the whole tile (the tokens reaching into the next chunk's first block
carry that part over), recomputes the Eq. 8 probabilities from the cmp branch's lse
(p = exp(scale q.k - lse)), sums them over the G heads (Eq. 10; the sum commutes with Eq. 9), remaps them to block
scores with the Eq. 9 overlap weights |cmp_i ∩ slc_j| / d (chunk-invariant because d divides l and l'), forces the
init/local blocks (+inf), and merges the chunk into a running top-BJ per position (sort the chunk, one bitonic
half-cleaner step against the sorted running list, one bitonic merge) over packed int64 keys (score bits << 32 |
~block index), so ties go to the lower block index (Eq. 11).
Extra memory: the [T, HKV, n] output only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import LOG2E, _tile_seq, default_scale, masked_attention_fwd, split_head_dim
from .utils import (autotune_configs, cmp_offsets, device_jit, dot_precision, load_cols, next_pow2, pack,
                    seq_offsets, tile_table)

_BIG = 2**62
SMEM_BUDGET = 180 * 1024  # bytes for the q tile + one compressed-key tile; larger tiles use the torch backend


@device_jit
def _block_key(score, j):
    """int64 keys ordering (score desc, block index asc); score >= 0 or +inf. (hi + 1) << 32 - 1 - j is
    hi * 2^32 + (2^32 - 1 - j) written without constants wider than int32."""
    hi = (score.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    return ((hi + 1) << 32) - 1 - j


@device_jit
def _block_of_key(key):
    """The block index of a key from _block_key; -1 for an empty slot (negative key)."""
    hi = key >> 32
    return tl.where(key >= 0, ((hi + 1) << 32) - 1 - key, -1)


def _split_configs():
    """The autotune list twice: SPLIT = 0 loads the head dim as one padded tile (192 -> 256), SPLIT = 1 as two
    power-of-two tiles (128 + 64). Split builds to ~6 % more loop instructions and more registers on sm_90, but its
    q and key tiles take a quarter less shared memory, so a 3-stage (pipelined) build fits two programs per SM
    instead of one: the GPU's autotuner decides. One config (SPLIT = 0) where autotune_configs gives one (the
    interpreter, NSA_TRITON_AUTOTUNE=0)."""
    cfgs = autotune_configs()
    return [triton.Config({"SPLIT": sp}, num_warps=c.num_warps, num_stages=c.num_stages)
            for sp in ((0, 1) if len(cfgs) > 1 else (0,)) for c in cfgs]


def _prune_split(configs, named_args, **kwargs):
    """SPLIT = 1 only where the head dim has a second tile."""
    return [c for c in configs if kwargs.get("DK_B", 0) > 0 or c.kwargs["SPLIT"] == 0]


@triton.autotune(configs=_split_configs(), key=["GP", "BT", "DK_PAD", "DK_A", "BJ", "CI", "PREC"],
                 prune_configs_by=dict(early_config_prune=_prune_split))
@triton.jit
def _topn_kernel(
    Q, KC, LSE, OUT, TILES, CU, CCU,
    s_qt, s_qh, s_kt, s_kh, s_lt, s_ot, s_oh,
    G, DK, N, qk_scale, CMP_L, CMP_D, LP, N_INIT, N_LOCAL,
    PREC: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, DK_PAD: tl.constexpr, DK_A: tl.constexpr,
    DK_B: tl.constexpr, BJ: tl.constexpr, CI: tl.constexpr, SPLIT: tl.constexpr,
):
    hk = tl.program_id(1).to(tl.int64)
    row0, qs, qe, cs, tc = _tile_seq(TILES, CU, CCU)

    # query rows: BT positions x GP heads (position-major)
    r = tl.arange(0, BT * GP)
    t = row0 + r // GP
    g = r % GP
    row_ok = (t < qe) & (g < G)
    pos = t - qs
    nvis = tl.where(pos >= CMP_L - 1, tl.maximum(pos - CMP_L + 1, 0) // CMP_D + 1, 0)  # Eq. 7
    nvis = tl.minimum(nvis, tc)
    hq = hk * G + g
    q_rows = Q + t * s_qt + hq * s_qh
    if SPLIT and DK_B > 0:  # the head dim as DK_A + DK_B columns
        q = load_cols(q_rows, row_ok, DK, 0, DK_A)
        q2 = load_cols(q_rows, row_ok, DK, DK_A, DK_B)
    else:  # one tile of DK_PAD columns
        q = load_cols(q_rows, row_ok, DK, 0, DK_PAD)
        q2 = q
    lse = tl.load(LSE + t * s_lt + hq, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)

    # per position
    tb = row0 + tl.arange(0, BT)
    b_ok = tb < qe
    own = (tb - qs) // LP
    own_max = (tl.minimum(row0 + BT, qe) - 1 - qs) // LP

    # Eq. 9 weights of the chunk's compressed tokens i = j0*S + ci (S = l'/d, ci < BJ*S) on its blocks j = j0 + jj:
    # i*d - j*l' = ci*d - jj*l', the same for every chunk. The chunk's last l/d - 1 tokens also reach block
    # j0 + BJ (weights w_next): that part is carried into the next chunk, so no token is loaded or scored twice.
    ci = tl.arange(0, CI)
    jj = tl.arange(0, BJ)
    ci_ok = ci < BJ * (LP // CMP_D)
    start = ci[:, None] * CMP_D - jj[None, :] * LP
    w = tl.maximum(tl.minimum(start + CMP_L, LP) - tl.maximum(start, 0), 0).to(tl.float32) / CMP_D  # [CI, BJ]
    w = tl.where(ci_ok[:, None], w, 0.0)
    start_next = ci * CMP_D - BJ * LP
    w_next = tl.maximum(tl.minimum(start_next + CMP_L, LP) - tl.maximum(start_next, 0), 0).to(tl.float32) / CMP_D
    w_next = tl.where(ci_ok, w_next, 0.0)

    # a chunk that every row sees whole (all rows real, every token visible to the tile's first position) needs no
    # Eq. 7 mask: the common case, so it gets its own path
    all_rows = tl.min(row_ok.to(tl.int32), 0) == 1
    nvis_min = tl.min(nvis, 0)
    best = tl.full([BT, BJ], -1, tl.int64)
    carry = tl.zeros([BT], tl.float32)  # the previous chunk's tail on block j0
    for j0 in range(0, own_max + 1, BJ):
        i = j0 * (LP // CMP_D) + ci
        kc_rows = KC + (cs + i) * s_kt + hk * s_kh
        kc_ok = ci_ok & (i < tc)
        if SPLIT and DK_B > 0:
            s = tl.dot(q, tl.trans(load_cols(kc_rows, kc_ok, DK, 0, DK_A)), input_precision=PREC)
            s += tl.dot(q2, tl.trans(load_cols(kc_rows, kc_ok, DK, DK_A, DK_B)), input_precision=PREC)
        else:
            s = tl.dot(q, tl.trans(load_cols(kc_rows, kc_ok, DK, 0, DK_PAD)), input_precision=PREC)
        s = s * qk_scale
        if all_rows & (CI == BJ * (LP // CMP_D)) & (j0 * (LP // CMP_D) + CI <= nvis_min):
            p = tl.exp2(s - lse2[:, None])  # Eq. 8
        else:
            seen = row_ok[:, None] & ci_ok[None, :] & (i[None, :] < nvis[:, None])
            p = tl.where(seen, tl.exp2(s - lse2[:, None]), 0.0)
        psum = tl.sum(tl.reshape(p, [BT, GP, CI]), 1)  # Eq. 10, [BT, CI]
        if BT >= 16:
            score = tl.dot(psum, w, input_precision="ieee")
        else:
            score = tl.sum(psum[:, :, None] * w[None, :, :], 1)  # [BT, BJ]
        score += tl.where(jj[None, :] == 0, carry[:, None], 0.0)
        carry = tl.sum(psum * w_next[None, :], 1)
        j = j0 + jj
        forced = (j[None, :] < N_INIT) | (j[None, :] > own[:, None] - N_LOCAL)
        score = tl.where(forced, float("inf"), score)
        key = tl.where(b_ok[:, None] & (j[None, :] <= own[:, None]), _block_key(score, j[None, :].to(tl.int64)), -1)
        # Eq. 11: merge only when some position has a key above its current BJ-th best (keys are unique, so a
        # key that is not above it cannot enter); the test is one scalar per program, so no divergence. The merge:
        # best is sorted descending, the chunk's keys sorted ascending; their elementwise max holds the BJ largest
        # of both as a bitonic sequence (a half-cleaner step), which one bitonic merge sorts descending again.
        if tl.max((tl.max(key, 1) > tl.min(best, 1)).to(tl.int32), 0) > 0:
            best = tl.bitonic_merge(tl.maximum(best, tl.sort(key, 1)), 1, descending=True)
    tl.store(OUT + tb[:, None] * s_ot + hk * s_oh + jj[None, :], _block_of_key(best),
             mask=b_ok[:, None] & (jj[None, :] < N))


def _tile(G: int, n: int, lp: int, l: int, d: int, dk: int = 128, dtype: torch.dtype = torch.bfloat16
          ) -> tuple[int, int, int, int]:
    """(GP, BT, BJ, CI): padded heads, positions per tile (BT*GP >= 16 rows for tl.dot: 64 rows, 32 for fp32,
    whose larger tiles spill registers on sm_90 or overflow shared memory; BT >= 16 remaps with a dot, smaller BT
    with a broadcast sum), blocks per chunk (>= n: the running top list has BJ slots), and the compressed-token
    tile of a chunk (its blocks' tokens; the l/d - 1 tokens a chunk shares with the previous one are carried over,
    not reloaded)."""
    rows = 32 if dtype == torch.float32 else 64
    gp = triton.next_power_of_2(G)
    bt = rows // gp if gp <= rows // 16 else max(1, min(4, rows // gp))
    gp = max(gp, 16 // bt)
    bj = next_pow2(n)
    return gp, bt, bj, next_pow2(bj * lp // d)


def topn_from_lse(q, k_cmp, lse, cu, ccu, *, config, scale):
    """Packed q [Tt,HQ,Dk], k_cmp [Tc,HKV,Dk], cmp-branch lse [Tt,HQ] -> int64 [Tt,HKV,n] (ascending, -1 pad)."""
    Tt, HQ, Dk = q.shape
    HKV = k_cmp.shape[1]
    n = config.num_selected
    out = torch.empty(Tt, HKV, n, dtype=torch.int64, device=q.device)
    if Tt == 0 or HKV == 0:
        return out
    q, k_cmp, lse = q.contiguous(), k_cmp.contiguous(), lse.contiguous().float()
    G = HQ // HKV
    gp, bt, bj, ci = _tile(G, n, config.slc_block_size, config.cmp_block_size, config.cmp_stride, Dk, q.dtype)
    if (gp * bt + ci) * next_pow2(Dk) * q.element_size() > SMEM_BUDGET:  # e.g. fp32, Dk = 256, G = 128
        from .. import torch_backend

        idx = torch_backend.select_blocks(q[None], k_cmp[None], config=config, scale=scale, cu_seqlens=cu)
        return idx[0]
    tiles = tile_table(cu, bt)
    _topn_kernel[(tiles.shape[0], HKV)](
        q, k_cmp, lse, out, tiles, cu, ccu,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        G, Dk, n, scale * LOG2E, config.cmp_block_size, config.cmp_stride, config.slc_block_size,
        config.num_init_blocks, config.num_local_blocks,
        PREC=dot_precision(q.dtype), GP=gp, BT=bt, DK_PAD=next_pow2(Dk), DK_A=split_head_dim(Dk)[0],
        DK_B=split_head_dim(Dk)[1], BJ=bj, CI=ci,
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
        _, lse = masked_attention_fwd(qp, kp, kp, cu, ccu, 1, sc, 1, config.cmp_block_size, config.cmp_stride)
        idx = topn_from_lse(qp, kp, lse, cu, ccu, config=config, scale=sc)
        return idx.reshape(B, T, *idx.shape[1:])
