"""Triton decode: one query position per row, all G query heads of a KV group per program (paper §3.4's
group-centric loading), split over the KV length flash-decoding style so that batch 1 at 64k still fills the GPU.

Same contract as `nsa.ops.decode.torch_decode`: Tq = 1 decode, Tq > 1 chunked prefill (one row per query). Four
launches (eager decode pays each one's host overhead), all statistics in fp32:
  1. `_attn_partial` (MODE 0) over compressed tokens, split over Tc: online-softmax partials         (Eq. 7)
     (it also keeps the scaled scores, G x Tc fp32, so the compressed keys are read once)
  2. `_select`       one program per (b, kv head): lse from those partials, p = exp(s - lse) summed over the G
                     heads (Eq. 8, 10), the Eq. 9 overlap remap, forced blocks, a bitonic top-n per chunk of
                     blocks merged into a running top-n (ties -> lower block)
  3. `_attn_partial` (MODE 1) over the n selected blocks, one block per program (Eq. 12), and the window in
                     chunks of l' tokens (§3.3.3), in the same grid
  4. `_merge_gate`   merges every branch's partials and applies the gates                          (Eq. 5)
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..config import NSAConfig, num_compressed_tokens
from .triton.topk import _block_key, _block_of_key
from .triton.utils import device_jit


MERGE_STEP = 2  # partials merged per step by `_merge_gate` ([2, G, Dv] fp32 tiles; 4 spills registers on sm_90)
PARTIAL_STAGES = (3, 2)  # num_stages of `_attn_partial` by MODE: the compressed pass loops over many key tiles per
# program at batch 16 (26 at 64k), and only >= 3 stages keep the next tile's load in flight during the math with
# Triton 3.6 (`inflight` in benchmarks/triton_aot_check.py); a selected block / window chunk is one tile.
SCORES_BUDGET = 256 << 20  # bytes of fp32 scores per pass: a long chunked prefill runs in passes of queries
SELECT_TILE = 512  # compressed tokens per step of `_select`'s probability pass: few, wide steps (one program per
# (b, kv head) walks all Tc, so its latency is the number of steps)
SELECT_BLOCKS = 512  # selection blocks per top-n chunk of `_select` (32k tokens at l' = 64); 1024 spills on sm_90


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(x))))


def partial_tiles(BD: int, lp: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(warps, keys per step over compressed tokens, keys per step over a selected block / window chunk) of
    `_attn_partial`: fp32 takes 8 warps and 32 keys, the largest that build without register spills on sm_90
    (benchmarks/triton_aot_check.py); fp16/bf16 build without at 4 warps and 64 keys (32 over compressed tokens for
    Dk > 128)."""
    if dtype == torch.float32:
        return 8, 32, min(32, _pow2(lp))
    return 4, (32 if BD > 128 else 64), min(64, _pow2(lp))


def triton_decode_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """CUDA (or the interpreter), fp16/bf16/fp32, head dims <= 256 (any number of queries per sequence)."""
    kinds = (torch.float16, torch.bfloat16, torch.float32)
    return ((q.is_cuda or (_interpreting() and q.device.type == "cpu"))
            and q.dtype in kinds and k.dtype in kinds and q.shape[-1] <= 256
            and (v is None or v.shape[-1] <= 256))


@device_jit
def _partial(q, K, V, skt, svt, lo, hi, off, scale, SC_ROW, gm, dk, dv, km_d, vm_d,
             STORE: tl.constexpr, PREC: tl.constexpr, BG: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr):
    """Online softmax of the q tile [BG, BD] over keys at positions [lo, hi) (slot = position - off) of one
    (sequence, KV head) whose K/V rows start at K/V: running max m, sum l and acc [BG, BDV], all fp32. STORE keeps
    the scaled scores at SC_ROW[:, position] (compressed tokens, for the selection)."""
    m = tl.full([BG], float("-inf"), tl.float32)
    lsum = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    for k0 in range(lo, hi, BK):
        pos = k0 + tl.arange(0, BK)
        km = pos < hi
        slot = (pos - off).to(tl.int64)
        k = tl.load(K + slot[:, None] * skt + dk[None, :], mask=km[:, None] & km_d[None, :], other=0.0)
        v = tl.load(V + slot[:, None] * svt + dv[None, :], mask=km[:, None] & vm_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(km[None, :], s, float("-inf"))
        if STORE:
            tl.store(SC_ROW + pos[None, :], s, mask=gm[:, None] & km[None, :])
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    return m, lsum, acc


@triton.jit
def _attn_partial(
    Q, K, V, K2, V2, LENS, WSTART, IDX, PO, PM, PL, SC,
    sqb, sqh, skb, skt, skh, svb, svt, svh, s2kb, s2kt, s2kh, s2vb, s2vt, s2vh,
    HKV, G, Dk, Dv, NU, scale, CHUNK, S_SC, TQ,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SLC: tl.constexpr, WIN: tl.constexpr, NSEL: tl.constexpr,
    MODE: tl.constexpr, HAS_WST: tl.constexpr, PREC: tl.constexpr,
    BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
):
    """Online-softmax partial of one unit u of keys for the G heads of one (b, kv head). Query row b reads the
    cache row b // TQ (TQ queries per cached sequence: chunked prefill; 1 for decode).

    MODE 0: the u-th of NU equal shares (whole BK tiles) of the row's compressed tokens [0, Tc(L)) of K/V, so
    every program has work whatever the grid was sized for (a CUDA graph sized by the capacity, ragged rows); also
    keeps the scaled scores in SC[b*HKV + h, g, i] (fp32) for the selection, so the compressed keys are read only
    once.
    MODE 1, u < NSEL: selected block IDX[b, h, u] ∩ [0, t] of K/V; u >= NSEL: window positions
    [max(0, t-WIN+1) + (u-NSEL)*CHUNK, ... + CHUNK) ∩ [.., t] of K2/V2, read at slot pos - WSTART[b].
    Writes acc [BG, BDV], running max m and sum l to PO/PM/PL[(b*HKV + h)*NU + u].
    """
    bh = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1).to(tl.int64)
    b = bh // HKV
    h = bh % HKV
    L = tl.load(LENS + b).to(tl.int64)
    t = L - 1
    g = tl.arange(0, BG)
    dk = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    gm = g < G
    km_d = dk < Dk
    vm_d = dv < Dv
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + dk[None, :], mask=gm[:, None] & km_d[None, :], other=0.0)
    q = q.to(K.dtype.element_ty)
    kb = b // TQ  # the cached sequence this query row belongs to
    Kb = K + kb * skb + h * skh
    Vb = V + kb * svb + h * svh
    if MODE == 0:
        tc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
        chunk = (tc + NU - 1) // NU  # the row's own compressed tokens over the NU programs, in whole key tiles
        chunk = (chunk + BK - 1) // BK * BK
        lo = u * chunk
        hi = tl.minimum(lo + chunk, tc)
        m, lsum, acc = _partial(q, Kb, Vb, skt, svt, lo, hi, 0, scale, SC + (bh * BG + g)[:, None] * S_SC, gm,
                                dk, dv, km_d, vm_d, True, PREC, BG, BDV, BK)
    elif u < NSEL:
        blk = tl.load(IDX + bh * NSEL + u).to(tl.int64)
        lo = tl.where(blk >= 0, blk * SLC, 0)
        hi = tl.where(blk >= 0, tl.minimum(lo + SLC, t + 1), 0)
        m, lsum, acc = _partial(q, Kb, Vb, skt, svt, lo, hi, 0, scale, SC, gm, dk, dv, km_d, vm_d,
                                False, PREC, BG, BDV, BK)
    else:
        off = tl.load(WSTART + kb).to(tl.int64) if HAS_WST else 0
        lo = tl.maximum(t - WIN + 1, 0) + (u - NSEL) * CHUNK
        hi = tl.minimum(lo + CHUNK, t + 1)
        m, lsum, acc = _partial(q, K2 + kb * s2kb + h * s2kh, V2 + kb * s2vb + h * s2vh, s2kt, s2vt, lo, hi, off,
                                scale, SC, gm, dk, dv, km_d, vm_d, False, PREC, BG, BDV, BK)
    row = bh * NU + u
    tl.store(PM + row * BG + g, m)
    tl.store(PL + row * BG + g, lsum)
    tl.store(PO + (row * BG + g)[:, None] * BDV + dv[None, :], acc)


@triton.jit
def _select(
    SC, LENS, PM, PL, PC, IDX, HKV, G, S_SC, NSPLIT,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SLC: tl.constexpr, NSEL: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, UB: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, BNB: tl.constexpr,
    BN: tl.constexpr,
):
    """Selection for one (b, kv head). First PC[i] = sum over the G heads of p_i = exp(s_i - lse) (Eq. 8, 10)
    from the scores SC kept by the compressed-attention pass, lse from its NSPLIT partials (running max PM, sum
    PL). Then Eq. 9-11: block scores with the overlap weights, forced blocks, top-n with ties to the lower index;
    writes the chosen blocks ascending into IDX, then -1 padding."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    L = tl.load(LENS + b).to(tl.int64)
    t = L - 1
    tc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
    g = tl.arange(0, BG)
    gm = g < G
    M, lsum, _ = _merge_partials(PM, PM, PL, bh * NSPLIT, NSPLIT, g, g, False, UB, BG, 16)
    lse = M + tl.log(tl.where(lsum > 0, lsum, 1.0))  # unused where no compressed token is visible (p masked)
    for i0 in range(0, tc, BK):
        i = i0 + tl.arange(0, BK)
        im = i < tc
        s = tl.load(SC + (bh * BG + g)[:, None] * S_SC + i[None, :], mask=gm[:, None] & im[None, :], other=0.0)
        p = tl.where(gm[:, None] & im[None, :], tl.exp(s - lse[:, None]), 0.0)
        tl.store(PC + bh * S_SC + i, tl.sum(p, 0), mask=im)
    tl.debug_barrier()  # PC written by every thread of the program before it is gathered below

    own = t // SLC
    # Eq. 11 over the row's own blocks in chunks of BNB: a bitonic top-BN of each chunk's int64 keys (score desc,
    # then block index asc: ties -> lower block), merged into the running top-BN. The work follows the row's
    # length, not the grid's (a CUDA graph sized for a capacity), and no chunk outgrows the registers at 1M tokens.
    best = tl.full([BN], -1, tl.int64)
    for j0 in range(0, own + 1, BNB):
        j = j0 + tl.arange(0, BNB).to(tl.int64)
        valid = j <= own
        score = tl.zeros([BNB], tl.float32)
        # the l'/d + l/d - 1 compressed blocks that can overlap selection block j
        for r in tl.static_range(SLC // CMP_D + CMP_L // CMP_D - 1):
            i = j * (SLC // CMP_D) - (CMP_L // CMP_D - 1) + r
            lo = tl.maximum(i * CMP_D, j * SLC)
            hi = tl.minimum(i * CMP_D + CMP_L, (j + 1) * SLC)
            w = tl.maximum(hi - lo, 0).to(tl.float32) / CMP_D
            pc = tl.load(PC + bh * S_SC + i, mask=valid & (i >= 0) & (i < tc), other=0.0)
            score += pc * w
        forced = (j < INIT) | (j > own - LOCAL)
        key = tl.where(valid, _block_key(tl.where(forced, float("inf"), score), j), -1)
        best = tl.topk(tl.reshape(tl.join(best, tl.topk(key, BN)), [2 * BN]), BN)
    top = _block_of_key(best)  # [BN] chosen blocks by rank, -1 where fewer are valid
    r = tl.arange(0, BN)
    top = tl.where((r < NSEL) & (top >= 0), top, own + 1)  # own + 1 sorts after every block the row can choose
    top = tl.sort(top, 0)
    tl.store(IDX + bh * NSEL + r, tl.where(top <= own, top, -1), mask=r < NSEL)


@device_jit
def _merge_partials(PO, PM, PL, row0, NU, g, dv, WITH_ACC: tl.constexpr, UB: tl.constexpr, BG: tl.constexpr,
                    BDV: tl.constexpr):
    """Merge the NU online-softmax partials at rows row0 .. row0 + NU - 1 (running max PM [., BG], sum PL [., BG]
    and, WITH_ACC, accumulator PO [., BG, BDV]): the overall max M, sum l and accumulator [BG, BDV]. UB partials per
    step, so the number of dependent load steps is NU / UB, not NU."""
    M = tl.full([BG], float("-inf"), tl.float32)
    lsum = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    for u0 in range(0, NU, UB):
        uu = u0 + tl.arange(0, UB)
        um = uu < NU
        rows = row0 + uu
        m_u = tl.load(PM + rows[:, None] * BG + g[None, :], mask=um[:, None], other=float("-inf"))  # [UB, BG]
        l_u = tl.load(PL + rows[:, None] * BG + g[None, :], mask=um[:, None], other=0.0)
        M_new = tl.maximum(M, tl.max(m_u, 0))
        M_safe = tl.where(M_new == float("-inf"), 0.0, M_new)
        alpha = tl.exp(M - M_safe)
        beta = tl.exp(m_u - M_safe[None, :])  # 0 for empty partials (m = -inf)
        lsum = lsum * alpha + tl.sum(l_u * beta, 0)
        if WITH_ACC:
            a_u = tl.load(PO + (rows[:, None, None] * BG + g[None, :, None]) * BDV + dv[None, None, :],
                          mask=um[:, None, None], other=0.0)
            acc = acc * alpha[:, None] + tl.sum(a_u * beta[:, :, None], 0)
        M = M_new
    return M, lsum, acc


@device_jit
def _merge_branch(PO, PM, PL, row0, NU, g, dv, UB: tl.constexpr, BG: tl.constexpr, BDV: tl.constexpr):
    """Normalised output [BG, BDV] of one branch from its NU partials (zero when the branch saw no key)."""
    _, lsum, acc = _merge_partials(PO, PM, PL, row0, NU, g, dv, True, UB, BG, BDV)
    return acc / tl.where(lsum > 0, lsum, 1.0)[:, None]


@triton.jit
def _merge_gate(
    PO_C, PM_C, PL_C, NU_C, PO_SW, PM_SW, PL_SW, NU_S, NU_W, GATES, O,
    sgb, sgh, sob, soh, HKV, G, Dv, UB: tl.constexpr, BG: tl.constexpr, BDV: tl.constexpr,
):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (Eq. 5) for the G heads of one (b, kv head); the selected
    and window partials share one buffer (NU_S selected rows, then NU_W window rows per (b, kv head))."""
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
    o = g_c[:, None] * _merge_branch(PO_C, PM_C, PL_C, bh * NU_C, NU_C, g, dv, UB, BG, BDV)
    o += g_s[:, None] * _merge_branch(PO_SW, PM_SW, PL_SW, bh * (NU_S + NU_W), NU_S, g, dv, UB, BG, BDV)
    o += g_w[:, None] * _merge_branch(PO_SW, PM_SW, PL_SW, bh * (NU_S + NU_W) + NU_S, NU_W, g, dv, UB, BG, BDV)
    tl.store(O + b * sob + (h * G + g)[:, None] * soh + dv[None, :], o.to(O.dtype.element_ty),
             mask=gm[:, None] & (dv < Dv)[None, :])


def triton_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, lengths, config: NSAConfig, scale=None,
                  win_start=None, return_indices=False, max_len=None, target_programs: int = 264):
    """NSA output [B, Tq, HQ, Dv] for the last Tq positions of each cached sequence (see `nsa.ops.decode`): Tq = 1
    is a decode step, Tq > 1 chunked prefill. Each of the B*Tq queries is a row of its own, over its own prefix
    (row b*Tq + t has length lengths[b] - Tq + 1 + t and reads cache row b: `TQ` in `_attn_partial`).

    `max_len` (host int, optional) is max(lengths); passing it avoids a device synchronisation.
    """
    B, Tq, HQ, Dk = q.shape
    HKV, Dv = k_slc.shape[2], v_slc.shape[-1]
    G = HQ // HKV
    dev = q.device
    lens = lengths if lengths.device == dev and lengths.dtype == torch.int64 else lengths.to(dev, torch.int64)
    L_max = int(lens.max()) if max_len is None else int(max_len)
    row_bytes = HKV * _pow2(G) * max(num_compressed_tokens(L_max, config.cmp_block_size, config.cmp_stride), 1) * 4
    tq = max(1, SCORES_BUDGET // (B * row_bytes))  # queries per pass: the fp32 scores buffer stays in budget
    if Tq > tq:  # a long chunk: passes over its queries, each the last positions of shorter sequences
        outs = [triton_decode(q[:, a:a + tq], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates[:, a:a + tq],
                              lengths=lens - (Tq - min(a + tq, Tq)), config=config, scale=scale, win_start=win_start,
                              return_indices=return_indices, max_len=L_max - (Tq - min(a + tq, Tq)),
                              target_programs=target_programs) for a in range(0, Tq, tq)]
        if return_indices:
            return torch.cat([o for o, _ in outs], 1), torch.cat([i for _, i in outs], 1)
        return torch.cat(outs, 1)
    if Tq > 1:
        lens = (lens[:, None] - (Tq - 1) + torch.arange(Tq, device=dev)).reshape(-1)
        q, gates = q.reshape(B * Tq, 1, HQ, Dk), gates.reshape(B * Tq, 1, HQ, 3)
    R = B * Tq  # query rows
    BH = R * HKV
    scale = Dk ** -0.5 if scale is None else float(scale)
    l, d, lp, w, n = (config.cmp_block_size, config.cmp_stride, config.slc_block_size, config.window_size,
                      config.num_selected)
    prec = "ieee" if k_slc.dtype == torch.float32 else "tf32"  # dots run in the cache dtype (q is cast to it)
    BG, BD, BDV = _pow2(G), _pow2(Dk), _pow2(Dv)
    lens = lens.contiguous()
    wst = lens if win_start is None else win_start.to(dev, torch.int64).contiguous()

    def last_dim_contig(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    # one dtype per kernel pass (its dots run in the keys' dtype): the values and a window cache kept in another
    # dtype than the selection cache are cast (a copy, only then)
    v_cmp = v_cmp.to(k_cmp.dtype)
    v_slc, k_win, v_win = (x.to(k_slc.dtype) for x in (v_slc, k_win, v_win))
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = map(
        last_dim_contig, (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates))
    tc_max = num_compressed_tokens(L_max, l, d)
    f32 = dict(device=dev, dtype=torch.float32)
    s_pc = max(tc_max, 1)

    def partial(mode, kv, kv2, nu, chunk, bk, idx=None, sc=None):
        parts = (torch.empty(BH, nu, BG, BDV, **f32), torch.empty(BH, nu, BG, **f32), torch.empty(BH, nu, BG, **f32))
        strides = [x.stride(i) for x in kv + kv2 for i in range(3)]
        _attn_partial[(BH, nu)](
            q, *kv, *kv2, lens, wst, lens if idx is None else idx, *parts, parts[1] if sc is None else sc,
            q.stride(0), q.stride(2), *strides, HKV, G, Dk, Dv, nu, scale, chunk, s_pc, Tq,
            CMP_L=l, CMP_D=d, SLC=lp, WIN=w, NSEL=n, MODE=mode, HAS_WST=win_start is not None, PREC=prec, BG=BG,
            BD=BD, BDV=BDV, BK=bk, num_warps=warps, num_stages=1 if _interpreting() else PARTIAL_STAGES[mode],
        )
        return parts

    # 1. compressed attention, split over the compressed tokens
    warps, bk_c, bk_s = partial_tiles(BD, lp, k_slc.dtype)
    nsplit = max(1, min(triton.cdiv(max(tc_max, 1), bk_c), triton.cdiv(target_programs, BH)))
    scores = torch.empty(BH, BG, s_pc, **f32)  # scaled q.k_cmp of every head, kept for the selection
    cmp_parts = partial(0, (k_cmp, v_cmp), (k_cmp, v_cmp), nsplit, 0, bk_c, sc=scores)  # shares sized per row

    # 2. selection: group-summed probabilities, block scores, top-n per (b, kv head)
    pc = torch.empty(BH, s_pc, **f32)
    idx = torch.empty(BH, n, dtype=torch.int64, device=dev)
    _select[(BH,)](scores, lens, cmp_parts[1], cmp_parts[2], pc, idx, HKV, G, s_pc, nsplit, CMP_L=l, CMP_D=d,
                   SLC=lp, NSEL=n, INIT=config.num_init_blocks, LOCAL=config.num_local_blocks, UB=16, BG=BG,
                   BK=SELECT_TILE, BNB=max(min(_pow2(math.ceil(L_max / lp), 2), SELECT_BLOCKS), _pow2(n, 2)),
                   BN=_pow2(n, 2), num_warps=8)

    # 3. selected blocks (one per program) and the window (in chunks of l' tokens) in one launch
    nw = triton.cdiv(min(w, L_max), lp)
    sw_parts = partial(1, (k_slc, v_slc), (k_win, v_win), n + nw, lp, bk_s, idx)

    # 4. merge + gates
    o = torch.empty(R, 1, HQ, Dv, device=dev, dtype=q.dtype)
    _merge_gate[(BH,)](*cmp_parts, nsplit, *sw_parts, n, nw, gates, o, gates.stride(0), gates.stride(2),
                       o.stride(0), o.stride(2), HKV, G, Dv, UB=MERGE_STEP, BG=BG, BDV=BDV, num_warps=8)
    o = o.view(B, Tq, HQ, Dv)
    if return_indices:
        return o, idx.view(B, Tq, HKV, n)
    return o
