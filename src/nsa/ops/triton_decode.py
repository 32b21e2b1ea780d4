"""Triton decode: one query position per sequence, all G query heads of a KV group per program (paper §3.4's
group-centric loading), split over the KV length flash-decoding style so that batch 1 at 64k still fills the GPU.

Same contract as `nsa.ops.decode.torch_decode` with Tq = 1. Six launches, all statistics in fp32:
  1. `_attn_partial` (MODE 0) over compressed tokens, split over Tc: online-softmax partials         (Eq. 7)
     (it also keeps the scaled scores, G x Tc fp32, so the compressed keys are read once)
  2. `_cmp_probs`    lse from those partials, then p = exp(s - lse) summed over the G heads, per tile  (Eq. 8, 10)
  3. `_topn`         Eq. 9 overlap remap + forced blocks + top-n (ties -> lower block), one program per (b, kv head)
  4. `_attn_partial` (MODE 1) over the n selected blocks, one block per program                    (Eq. 12)
  5. `_attn_partial` (MODE 2) over the window in chunks of l' tokens                               (§3.3.3)
  6. `_merge_gate`   merges every branch's partials and applies the gates                          (Eq. 5)
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..config import NSAConfig, num_compressed_tokens


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(x))))


def triton_decode_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """One query per sequence, CUDA (or the interpreter), fp16/bf16/fp32, head dims <= 256."""
    kinds = (torch.float16, torch.bfloat16, torch.float32)
    return (q.shape[1] == 1 and (q.is_cuda or (_interpreting() and q.device.type == "cpu"))
            and q.dtype in kinds and k.dtype in kinds and q.shape[-1] <= 256
            and (v is None or v.shape[-1] <= 256))


@triton.jit
def _attn_partial(
    Q, K, V, LENS, WSTART, IDX, PO, PM, PL, SC,
    sqb, sqh, skb, skt, skh, svb, svt, svh,
    HKV, G, Dk, Dv, NU, scale, CHUNK, S_SC,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SLC: tl.constexpr, WIN: tl.constexpr, NSEL: tl.constexpr,
    MODE: tl.constexpr, PREC: tl.constexpr,
    BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
):
    """Online-softmax partial of one unit of keys for the G heads of one (b, kv head).

    MODE 0: compressed tokens [u*CHUNK, (u+1)*CHUNK) ∩ [0, Tc(L)); MODE 1: selected block IDX[b, h, u] ∩ [0, t];
    MODE 2: window positions [max(0, t-WIN+1) + u*CHUNK, ... + CHUNK) ∩ [.., t], read at slot pos - WSTART[b].
    Writes acc [BG, BDV], running max m and sum l (fp32) to PO/PM/PL[(b*HKV + h)*NU + u]; MODE 0 also keeps the
    scaled scores in SC[b*HKV + h, g, i] (fp32) for the selection, so the compressed keys are read only once.
    """
    bh = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1).to(tl.int64)
    b = bh // HKV
    h = bh % HKV
    L = tl.load(LENS + b).to(tl.int64)
    t = L - 1
    off = tl.load(WSTART + b).to(tl.int64)  # window slot offset (zeros for the other modes)
    if MODE == 0:
        tc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
        lo = u * CHUNK
        hi = tl.minimum(lo + CHUNK, tc)
    elif MODE == 1:
        blk = tl.load(IDX + bh * NSEL + u).to(tl.int64)
        lo = tl.where(blk >= 0, blk * SLC, 0)
        hi = tl.where(blk >= 0, tl.minimum(lo + SLC, t + 1), 0)
    else:
        lo = tl.maximum(t - WIN + 1, 0) + u * CHUNK
        hi = tl.minimum(lo + CHUNK, t + 1)
    g = tl.arange(0, BG)
    dk = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    gm = g < G
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + dk[None, :], mask=gm[:, None] & (dk < Dk)[None, :],
                other=0.0)
    q = q.to(K.dtype.element_ty)
    m = tl.full([BG], float("-inf"), tl.float32)
    lsum = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    for k0 in range(lo, hi, BK):
        pos = k0 + tl.arange(0, BK)
        km = pos < hi
        slot = (pos - off).to(tl.int64)
        k = tl.load(K + b * skb + slot[:, None] * skt + h * skh + dk[None, :], mask=km[:, None] & (dk < Dk)[None, :],
                    other=0.0)
        v = tl.load(V + b * svb + slot[:, None] * svt + h * svh + dv[None, :], mask=km[:, None] & (dv < Dv)[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(km[None, :], s, float("-inf"))
        if MODE == 0:
            tl.store(SC + (bh * BG + g)[:, None] * S_SC + pos[None, :], s, mask=gm[:, None] & km[None, :])
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    row = bh * NU + u
    tl.store(PM + row * BG + g, m)
    tl.store(PL + row * BG + g, lsum)
    tl.store(PO + (row * BG + g)[:, None] * BDV + dv[None, :], acc)


@triton.jit
def _cmp_probs(
    SC, LENS, PM, PL, PC, HKV, G, S_SC, NSPLIT,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
):
    """PC[b, h, i] = sum over the G heads of p_i = exp(s_i - lse) for a tile of compressed tokens, from the scores
    SC kept by the compressed-attention pass; lse comes from its NSPLIT partials (running max PM, sum PL)."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    b = bh // HKV
    L = tl.load(LENS + b).to(tl.int64)
    tc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
    g = tl.arange(0, BG)
    gm = g < G
    i = tile * BK + tl.arange(0, BK)
    im = i < tc
    M = tl.full([BG], float("-inf"), tl.float32)
    lsum = tl.zeros([BG], tl.float32)
    for u in range(NSPLIT):
        m_u = tl.load(PM + (bh * NSPLIT + u) * BG + g)
        l_u = tl.load(PL + (bh * NSPLIT + u) * BG + g)
        M_new = tl.maximum(M, m_u)
        M_safe = tl.where(M_new == float("-inf"), 0.0, M_new)
        lsum = lsum * tl.exp(M - M_safe) + l_u * tl.exp(m_u - M_safe)
        M = M_new
    lse = M + tl.log(tl.where(lsum > 0, lsum, 1.0))  # unused where no compressed token is visible (p masked)
    s = tl.load(SC + (bh * BG + g)[:, None] * S_SC + i[None, :], mask=gm[:, None] & im[None, :], other=0.0)
    p = tl.where(gm[:, None] & im[None, :], tl.exp(s - lse[:, None]), 0.0)
    tl.store(PC + bh * S_SC + i, tl.sum(p, 0), mask=i < S_SC)


@triton.jit
def _topn(
    PC, LENS, IDX, HKV, S_PC,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SLC: tl.constexpr, NSEL: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, BNB: tl.constexpr, BN: tl.constexpr,
):
    """Eq. 9-11 for one (b, kv head): block scores from the group-summed probabilities, forced blocks, top-n with
    ties to the lower index; writes the chosen blocks ascending into IDX, then -1 padding."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    L = tl.load(LENS + b).to(tl.int64)
    t = L - 1
    tc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
    own = t // SLC
    j = tl.arange(0, BNB).to(tl.int64)
    valid = j <= own
    score = tl.zeros([BNB], tl.float32)
    # the l'/d + l/d - 1 compressed blocks that can overlap selection block j
    for r in tl.static_range(SLC // CMP_D + CMP_L // CMP_D - 1):
        i = j * (SLC // CMP_D) - (CMP_L // CMP_D - 1) + r
        lo = tl.maximum(i * CMP_D, j * SLC)
        hi = tl.minimum(i * CMP_D + CMP_L, (j + 1) * SLC)
        w = tl.maximum(hi - lo, 0).to(tl.float32) / CMP_D
        pc = tl.load(PC + bh * S_PC + i, mask=valid & (i >= 0) & (i < tc), other=0.0)
        score += pc * w
    forced = (j < INIT) | (j > own - LOCAL)
    ranked = tl.where(valid, tl.where(forced, float("inf"), score), float("-inf"))
    chosen = j < 0
    for _ in tl.static_range(NSEL):
        mx = tl.max(ranked, 0)
        jm = tl.min(tl.where(ranked == mx, j, BNB), 0)
        hit = (j == jm) & (ranked > float("-inf"))  # ranked[jm] == mx
        chosen = chosen | hit
        ranked = tl.where(j == jm, float("-inf"), ranked)
    rank = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(IDX + bh * NSEL + rank, j, mask=chosen)
    pad = tl.arange(0, BN)
    count = tl.sum(chosen.to(tl.int32), 0)
    tl.store(IDX + bh * NSEL + pad, tl.full([BN], -1, tl.int64), mask=(pad >= count) & (pad < NSEL))


@triton.jit
def _merge_branch(PO, PM, PL, bh, NU, g, dv, BG: tl.constexpr, BDV: tl.constexpr):
    """Normalised output [BG, BDV] of one branch from its NU partials (zero when the branch saw no key)."""
    M = tl.full([BG], float("-inf"), tl.float32)
    lsum = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    for u in range(NU):
        row = bh * NU + u
        m_u = tl.load(PM + row * BG + g)
        l_u = tl.load(PL + row * BG + g)
        a_u = tl.load(PO + (row * BG + g)[:, None] * BDV + dv[None, :])
        M_new = tl.maximum(M, m_u)
        M_safe = tl.where(M_new == float("-inf"), 0.0, M_new)
        alpha = tl.exp(M - M_safe)
        beta = tl.exp(m_u - M_safe)
        lsum = lsum * alpha + l_u * beta
        acc = acc * alpha[:, None] + a_u * beta[:, None]
        M = M_new
    return acc / tl.where(lsum > 0, lsum, 1.0)[:, None]


@triton.jit
def _merge_gate(
    PO_C, PM_C, PL_C, NU_C, PO_S, PM_S, PL_S, NU_S, PO_W, PM_W, PL_W, NU_W, GATES, O,
    sgb, sgh, sob, soh, HKV, G, Dv, BG: tl.constexpr, BDV: tl.constexpr,
):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (Eq. 5) for the G heads of one (b, kv head)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, BG)
    dv = tl.arange(0, BDV)
    gm = g < G
    gate = GATES + b * sgb + (h * G + g) * sgh
    g_c = tl.load(gate, mask=gm, other=0.0).to(tl.float32)
    g_s = tl.load(gate + 1, mask=gm, other=0.0).to(tl.float32)
    g_w = tl.load(gate + 2, mask=gm, other=0.0).to(tl.float32)
    o = g_c[:, None] * _merge_branch(PO_C, PM_C, PL_C, bh, NU_C, g, dv, BG, BDV)
    o += g_s[:, None] * _merge_branch(PO_S, PM_S, PL_S, bh, NU_S, g, dv, BG, BDV)
    o += g_w[:, None] * _merge_branch(PO_W, PM_W, PL_W, bh, NU_W, g, dv, BG, BDV)
    tl.store(O + b * sob + (h * G + g)[:, None] * soh + dv[None, :], o.to(O.dtype.element_ty),
             mask=gm[:, None] & (dv < Dv)[None, :])


def triton_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, lengths, config: NSAConfig, scale=None,
                  win_start=None, return_indices=False, max_len=None, target_programs: int = 264):
    """NSA output [B, 1, HQ, Dv] for the last position of each cached sequence (see `nsa.ops.decode`).

    `max_len` (host int, optional) is max(lengths); passing it avoids a device synchronisation.
    """
    B, _, HQ, Dk = q.shape
    HKV, Dv = k_slc.shape[2], v_slc.shape[-1]
    G = HQ // HKV
    BH = B * HKV
    dev = q.device
    scale = Dk ** -0.5 if scale is None else float(scale)
    l, d, lp, w, n = (config.cmp_block_size, config.cmp_stride, config.slc_block_size, config.window_size,
                      config.num_selected)
    prec = "ieee" if k_slc.dtype == torch.float32 else "tf32"  # dots run in the cache dtype (q is cast to it)
    BG, BD, BDV = _pow2(G), _pow2(Dk), _pow2(Dv)
    lens = lengths.to(dev, torch.int64).contiguous()
    zeros = torch.zeros(B, dtype=torch.int64, device=dev)
    wst = zeros if win_start is None else win_start.to(dev, torch.int64).contiguous()

    def last_dim_contig(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = map(
        last_dim_contig, (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates))
    qs = (q.stride(0), q.stride(2))
    L_max = int(lens.max()) if max_len is None else int(max_len)
    tc_max = num_compressed_tokens(L_max, l, d)
    f32 = dict(device=dev, dtype=torch.float32)
    stages = 1 if _interpreting() else 2

    s_pc = max(tc_max, 1)

    def partial(mode, k, v, nu, chunk, bk, idx=None, sc=None):
        parts = (torch.empty(BH, nu, BG, BDV, **f32), torch.empty(BH, nu, BG, **f32), torch.empty(BH, nu, BG, **f32))
        _attn_partial[(BH, nu)](
            q, k, v, lens, wst if mode == 2 else zeros, lens if idx is None else idx, *parts,
            parts[1] if sc is None else sc, *qs, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2), HKV, G, Dk, Dv, nu, scale, chunk, s_pc,
            CMP_L=l, CMP_D=d, SLC=lp, WIN=w, NSEL=n, MODE=mode, PREC=prec, BG=BG, BD=BD, BDV=BDV, BK=bk,
            num_warps=4, num_stages=stages,
        )
        return parts + (nu,)

    # 1. compressed attention, split over the compressed tokens
    bk_c = 64 if BD <= 128 else 32
    nsplit = max(1, min(triton.cdiv(max(tc_max, 1), bk_c), triton.cdiv(target_programs, BH)))
    chunk = triton.cdiv(triton.cdiv(max(tc_max, 1), nsplit), bk_c) * bk_c
    scores = torch.empty(BH, BG, s_pc, **f32)  # scaled q.k_cmp of every head, kept for the selection
    cmp_parts = partial(0, k_cmp, v_cmp, nsplit, chunk, bk_c, sc=scores)

    # 2-3. selection: group-summed probabilities, then block scores + top-n per (b, kv head)
    pc = torch.empty(BH, s_pc, **f32)
    _cmp_probs[(BH, triton.cdiv(s_pc, 128))](
        scores, lens, cmp_parts[1], cmp_parts[2], pc, HKV, G, s_pc, nsplit, CMP_L=l, CMP_D=d, BG=BG, BK=128,
        num_warps=4,
    )
    idx = torch.empty(BH, n, dtype=torch.int64, device=dev)
    _topn[(BH,)](pc, lens, idx, HKV, s_pc, CMP_L=l, CMP_D=d, SLC=lp, NSEL=n, INIT=config.num_init_blocks,
                 LOCAL=config.num_local_blocks, BNB=_pow2(math.ceil(L_max / lp), 2), BN=_pow2(n, 2), num_warps=4)

    # 4-5. selected blocks (one per program) and the window (in chunks of l' tokens)
    bk_s = min(64, _pow2(lp))
    slc_parts = partial(1, k_slc, v_slc, n, lp, bk_s, idx)
    win_parts = partial(2, k_win, v_win, triton.cdiv(min(w, L_max), lp), lp, bk_s)

    # 6. merge + gates
    o = torch.empty(B, 1, HQ, Dv, device=dev, dtype=q.dtype)
    _merge_gate[(BH,)](*cmp_parts, *slc_parts, *win_parts, gates, o, gates.stride(0), gates.stride(2),
                       o.stride(0), o.stride(2), HKV, G, Dv, BG=BG, BDV=BDV, num_warps=4)
    if return_indices:
        return o, idx.view(B, 1, HKV, n)
    return o
