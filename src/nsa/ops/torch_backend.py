"""Fast NSA backend ("torch"): chunked, vectorised over heads and queries, CPU-friendly.

Same functions and contract as `nsa.ops.reference` (see docs/spec.md). For CPU tensors computed in float32
(float32, bfloat16, float16) each op's per-chunk branch work (forward and backward) runs in the compiled kernels of
`cpu_kernels` when they build (C++, BLAS products with fused mask/exp/statistics in cache-sized tiles, top-n inside
the cmp pass); the chunk loop, threads and autograd stay here. The per-chunk functions below are the pure-PyTorch
path, used otherwise (float64, other devices, no compiler, USE_FUSED_CPU = False). Design:
- Queries are processed per sequence in chunks of `CHUNK_SIZE`; inside a chunk every score tile is kept below
  `WORK_ELEMS` elements, so peak memory is O(chunk * (n*l' + w + T/d)) per head, never O(T^2).
- cmp branch (Eq. 7): dense over the visible compressed prefix of a sub-chunk; its probabilities also give the
  selection scores (Eq. 8-10) through the periodic Eq. 9 overlap weights, so no [T, T/d] matrix ever exists.
- top-n (Eq. 11) per chunk with `topk`; rows with a tie at the threshold fall back to a stable sort (ties -> lower j).
- slc branch (Eq. 12): the chunk's (query, KV head, block) pairs are grouped by (KV head, block) into segments of
  P pairs, so one gather of a key block serves P queries and their G heads.
- softmax: when Cauchy-Schwarz bounds every score (scale*|q|*max|k| <= 60 in fp32), exp needs no max
  subtraction, so a query's selected blocks are summed straight into per-query accumulators; otherwise each
  (query, block) pair keeps its own max and the partials are merged with the log-sum-exp rule.
- win branch: banded tiles of `WIN_TILE` queries against the (w + tile) keys before them.
- backward: custom autograd.Functions save only the inputs, indices, branch outputs and log-sum-exps, and recompute
  the score tiles chunk by chunk.
- packed batches (cu_seqlens): equal-length sequences run together, side by side along the head axis (`_grouped`;
  with the compiled kernels only for many short sequences, see `_use_groups`).
- a query tail (decoding) reads the compressed K/V through head-major views and uses the max-shifted softmax.
- threads: torch ops run single-threaded while the chunks are spread over `NUM_WORKERS` Python threads (torch's
  thread count by default; k/v gradients use per-thread buffers). Thousands of mid-sized ops each paying an
  OpenMP barrier were several times slower on a busy 2-core machine. The calling thread's count is restored after.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from ..config import num_compressed_tokens
from . import torch_dense
from .varlen import compressed_cu_seqlens, host_offsets, sequence_spans

CHUNK_SIZE = 1024  # queries per chunk (tests shrink it to exercise chunk boundaries)
CHUNK_TOKENS = 1 << 24  # long sequences use smaller chunks: at most max(128, CHUNK_TOKENS / L) queries
WORK_ELEMS = 1 << 18  # max elements of one score tile (keeps allocations small and cache/allocator friendly)
# the cmp branch's tiles may be 4x larger: fewer, larger ops over the visible compressed prefix, ~5-10 % off the
# composed op at 16k-32k, and the forward's peak memory at 64k did not grow (382 vs 390 MiB; larger slc or window
# tiles would push it past 1.5x SDPA's)
CMP_WORK_ELEMS = 1 << 20
WIN_TILE = 64  # queries per sliding-window tile

SMALL_NUMEL = 1 << 15  # q with at most this many elements runs single-threaded (tiny ops pay more in
# thread wake-ups than they gain, badly so on an oversubscribed machine)

SLC_SEGMENT_SIZES = (8, 16, 32, 64)  # pairs per selected-branch segment (one gathered key block each)
NUM_WORKERS = None  # worker threads per op; None: torch.get_num_threads()
USE_FUSED_CPU = True  # float32 CPU chunks use the compiled kernels of `cpu_kernels` when they build
GROUP_MAX_MEAN_LEN = 128  # with the compiled kernels, packed sequences are grouped only below this mean length
TAIL_DECODE_MAX = 8  # query tails up to this long run the per-query gather decode (`decode.torch_decode`)

_NEG = float("-inf")


class _threads_for:
    """Context manager: run the op's torch calls single-threaded and spread its query chunks over Python worker
    threads instead (one per intra-op thread; just one for a small q). Many mid-sized ops each paying an OpenMP
    barrier cost far more than one independent stream of ops per core, above all on a busy machine.
    Yields the number of workers: the thread count read when no op was running, kept while any runs. (ATen's
    OpenMP backend partly shares the setting between threads, so an op started while another runs may read the 1
    that one set; taking that 1 as its count gave it one worker, another grouping of the chunks and so results not
    bitwise equal to a serial call, and left its thread at 1.) On exit each op restores its own thread's count,
    taking a 1 read while another op ran for the shared count."""

    def __init__(self, q):
        self.small = q.numel() <= SMALL_NUMEL

    def __enter__(self):
        with _THREADS_LOCK:
            self.own = torch.get_num_threads()
            if _THREADS_STATE["active"] == 0:
                _THREADS_STATE["count"] = self.own
            elif self.own == 1:  # most likely the 1 a running op set
                self.own = _THREADS_STATE["count"]
            _THREADS_STATE["active"] += 1
            n = _THREADS_STATE["count"]
            torch.set_num_threads(1)
        return 1 if self.small else (NUM_WORKERS or n)

    def __exit__(self, *exc):
        with _THREADS_LOCK:
            _THREADS_STATE["active"] -= 1
            torch.set_num_threads(self.own)


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"active": 0, "count": 1}  # ops running, and the thread count read when the first one started


_POOL = None


def _run_chunks(fn, items, workers):
    """[fn(group) for group in round-robin groups of items], the groups on worker threads when workers > 1."""
    global _POOL
    workers = max(1, min(workers, len(items)))
    groups = [items[i::workers] for i in range(workers)]
    if workers == 1:
        return [fn(g) for g in groups]
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsa-torch")
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(g):  # the caller's autograd modes (inference tensors may only be written under inference mode)
        # A worker's OpenMP/MKL thread count is set (to the op's 1) lazily, by its first threaded torch call; the
        # compiled kernels' BLAS calls must not come first, or they run multi-threaded (other rounding, and
        # oversubscribed cores). get_num_threads() sets it.
        torch.get_num_threads()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(g)

    return list(_POOL.map(run, groups))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cmp_spans(B, T, cu_seqlens, l, d):
    """(b, start, end, cmp_start, cmp_end) of every sequence."""
    ccu = None if cu_seqlens is None else host_offsets(compressed_cu_seqlens(cu_seqlens, l, d))
    for n, (b, s, e) in enumerate(sequence_spans(B, T, cu_seqlens)):
        if ccu is None:
            yield b, s, e, 0, num_compressed_tokens(e - s, l, d)
        else:
            yield b, s, e, ccu[n], ccu[n + 1]


def _chunks(L, q0=0):
    """Chunk boundaries of the query range [q0, L)."""
    c = max(1, min(int(CHUNK_SIZE), max(128, CHUNK_TOKENS // max(L, 1))))
    return [(a, min(L, a + c)) for a in range(q0, L, c)]


def _scaled_q(q_s, a, b, HKV, scale, acc):
    """Scaled queries of rows [a, b): a [C*HKV + 1, G*Dk] buffer whose last row is zero (a dummy for padding)."""
    C, HQ, Dk = b - a, q_s.shape[1], q_s.shape[2]
    buf = torch.empty(C * HKV + 1, (HQ // HKV) * Dk, dtype=acc, device=q_s.device)
    rows = q_s[a:b].reshape(C * HKV, -1)
    if rows.dtype == acc:
        torch.mul(rows, scale, out=buf[:-1])
    else:  # bf16/fp16: scale in acc (torch.mul with out= would multiply, and round, in the input dtype)
        buf[:-1].copy_(rows).mul_(scale)
    buf[-1].zero_()
    return buf


def _exp_limit(dtype):
    """|score| bound under which exp(score) needs no max subtraction: no overflow of exp, of the row sums (up to
    ~1e5 terms) or of exp @ V for |v| up to ~1e6, and no underflow to zero (exp(-60) ~ 1e-26 is a normal fp32)."""
    return 600.0 if dtype == torch.float64 else 60.0


def _qnorm(qflat, HKV, Dk):
    """Largest scaled-query norm per KV head, [HKV], of qflat [C*HKV(+1), G*Dk] (the dummy row is zero)."""
    n = torch.linalg.vector_norm(qflat[:-1].view(-1, HKV, qflat.shape[1] // Dk, Dk), dim=-1)
    return n.amax(dim=(0, 2)) if n.numel() else n.new_zeros(HKV)


def _shift_free(qn, kmax):
    """True when every score is provably small enough for exp without max subtraction (Cauchy-Schwarz):
    max_h |q|_h * max|k|_h <= _exp_limit. qn, kmax [HKV]."""
    return bool((qn * kmax).max() <= _exp_limit(qn.dtype)) if qn.numel() else True


def _softmax_stats_(s, lo_fix, shift_free=False):
    """In place: s <- exp(s - m). Returns (m, sum) with keepdim; rows that are all -inf get m = 0, sum = 0.

    With shift_free (scores known to be small, see _shift_free) m is 0 and the max pass is skipped."""
    if shift_free:
        s.exp_()
        return 0.0, s.sum(-1, keepdim=True)
    m = s.amax(-1, keepdim=True)
    if lo_fix:
        m = m.masked_fill(m == _NEG, 0.0)
    s.sub_(m).exp_()
    return m, s.sum(-1, keepdim=True)


def _safe_inv(x):
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _finite_lse(lse):
    """lse with -inf replaced by 0 (such rows have every score -inf, so exp(s - 0) = 0)."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


# ============================================================================================ compressed branch
def _n_visible(t, l, d, Tc):
    """Compressed tokens visible to query t: i*d + l - 1 <= t (Eq. 7)."""
    return 0 if t < l - 1 else min(Tc, (t - l + 1) // d + 1)


def _prep_cmp(k_cmp_s, v_cmp_s, r, acc):
    """[Tc, HKV, D] -> [HKV, Tcp, D] (zero padded to a multiple of r)."""
    Tc, HKV = k_cmp_s.shape[0], k_cmp_s.shape[1]
    Tcp = max(r, -(-Tc // r) * r)
    out = []
    for x in (k_cmp_s, v_cmp_s):
        if x is None:
            out.append(None)
            continue
        buf = torch.empty(HKV, Tcp, x.shape[2], dtype=acc, device=x.device)
        buf[:, :Tc] = x.permute(1, 0, 2)
        buf[:, Tc:] = 0
        out.append(buf)
    return out


def _overlap_weights(cfg, acc, device):
    """[r, 2] Eq. 9 weights of a compressed token with start offset s*d inside its selection block: (own, next)."""
    l, d, lp = cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size
    r = lp // d
    s = torch.arange(r, device=device)
    first = torch.clamp(lp - s * d, max=l)
    return torch.stack([first, l - first], -1).to(acc) / d


def _cmp_tiles(C, t0, l, d, Tc, per_query, r):
    """Sub-chunks (a, b, lo, hi) of a chunk: queries [a, b) see at least lo and at most hi compressed tokens."""
    hi_max = _n_visible(t0 + C - 1, l, d, Tc)
    if hi_max == 0:
        return []
    hi_pad = -(-hi_max // r) * r
    step = max(1, CMP_WORK_ELEMS // max(1, per_query * hi_pad))
    out = []
    for a in range(0, C, step):
        b = min(C, a + step)
        hi = _n_visible(t0 + b - 1, l, d, Tc)
        if hi:
            out.append((a, b, _n_visible(t0 + a, l, d, Tc), -(-hi // r) * r))
    return out


def _cmp_scores(qflat, kc, a, b, lo, hi, t0, l, d, HKV):
    """Masked scaled scores [HKV, G, M, hi] of queries [a, b) of the chunk against compressed tokens [0, hi)."""
    M = b - a
    G = qflat.shape[1] // kc.shape[2]
    qs = qflat[a * HKV:b * HKV].view(M, HKV, G, -1).permute(1, 2, 0, 3).reshape(HKV, G * M, -1)
    hk = min(hi, kc.shape[1])  # kc may be an unpadded view (a decoding tail): columns past it are masked below
    s = torch.bmm(qs, kc[:, :hk].transpose(1, 2))
    if hk < hi:
        s = torch.nn.functional.pad(s, (0, hi - hk), value=_NEG)
    s = s.view(HKV, G, M, hi)
    if lo < hi:
        tt = torch.arange(t0 + a, t0 + b, device=kc.device)
        ii = torch.arange(lo, hi, device=kc.device)
        s[..., lo:].masked_fill_(ii[None, :] * d + (l - 1) > tt[:, None], _NEG)
    return s, qs


def _cmp_forward_chunk(qflat, kc, vc, t0, C, l, d, Tc, sel=None, sf=False):
    """Compressed attention of one chunk (Eq. 7) and, with `sel`, its group-summed block scores (Eq. 8-10).

    qflat [C*HKV(+1), G*Dk] scaled queries at positions t0.., kc [HKV, Tcp, Dk], vc [HKV, Tcp, Dv] or None,
    sel = (W [r, 2], r, l', Nb) or None, sf: scores are small (see _shift_free). Returns o [C, HKV, G, Dv] | None, lse [C, HKV, G], blk [HKV, C, Nb] | None.
    """
    HKV, _, Dk = kc.shape
    G = qflat.shape[1] // Dk
    o = None if vc is None else kc.new_zeros(C, HKV, G, vc.shape[2])
    lse = kc.new_full((C, HKV, G), _NEG)
    blk = None
    r = 1
    if sel is not None:
        W, r, _, nb = sel
        blk = kc.new_zeros(HKV, C, nb)
    for a, b, lo, hi in _cmp_tiles(C, t0, l, d, Tc, HKV * G, r):
        M = b - a
        s, _ = _cmp_scores(qflat, kc, a, b, lo, hi, t0, l, d, HKV)
        m, ssum = _softmax_stats_(s, lo == 0, sf)
        lse[a:b] = (m + ssum.log()).squeeze(-1).permute(2, 0, 1)
        inv = _safe_inv(ssum)  # [HKV, G, M, 1]
        if vc is not None:
            hv = min(hi, vc.shape[1])
            ob = torch.bmm(s.view(HKV, G * M, hi)[..., :hv], vc[:, :hv]).view(HKV, G, M, -1) * inv
            o[a:b] = ob.permute(2, 0, 1, 3)
        if sel is not None:
            # normalise (Eq. 8) and sum the group (Eq. 10) in one pass, then apply the Eq. 9 overlap weights
            ps = s[:, 0] * inv[:, 0]  # [HKV, M, hi]
            for g in range(1, G):
                ps.addcmul_(s[:, g], inv[:, g])
            x = torch.matmul(ps.view(HKV, M, hi // r, r), W)  # [HKV, M, hi/r, 2]
            nbe = min(hi // r, nb)
            blk[:, a:b, :nbe] += x[:, :, :nbe, 0]
            if nb > 1:
                k1 = min(hi // r, nb - 1)
                blk[:, a:b, 1:k1 + 1] += x[:, :, :k1, 1]
    return o, lse, blk


def _cmp_backward_chunk(qflat, kc, vc, t0, C, l, d, Tc, dO, delta, lse, dkc, dvc):
    """Gradients of one chunk of the cmp branch; dk/dv accumulate into dkc/dvc [HKV, Tcp, D].

    dO [C, HKV, G, Dv] output gradient, delta [C, HKV, G] = rowsum(dO * o) - dlse, lse [C, HKV, G].
    Returns dq w.r.t. the scaled queries, [C, HKV, G, Dk].
    """
    HKV, _, Dk = kc.shape
    G = qflat.shape[1] // Dk
    dq = kc.new_zeros(C, HKV, G, Dk)
    lse = _finite_lse(lse)
    for a, b, lo, hi in _cmp_tiles(C, t0, l, d, Tc, 2 * HKV * G, 1):
        M = b - a
        s, qs = _cmp_scores(qflat, kc, a, b, lo, hi, t0, l, d, HKV)
        p = s.sub_(lse[a:b].permute(1, 2, 0).unsqueeze(-1)).exp_()  # [HKV, G, M, hi]
        dOs = dO[a:b].permute(1, 2, 0, 3).reshape(HKV, G * M, -1)
        pf = p.view(HKV, G * M, hi)
        dvc[:, :hi].baddbmm_(pf.transpose(1, 2), dOs)  # accumulate in place: no temporary, no extra pass
        ds = torch.bmm(dOs, vc[:, :hi].transpose(1, 2)).view(HKV, G, M, hi)
        ds.sub_(delta[a:b].permute(1, 2, 0).unsqueeze(-1)).mul_(p)
        dsf = ds.view(HKV, G * M, hi)
        dq[a:b] = torch.bmm(dsf, kc[:, :hi]).view(HKV, G, M, Dk).permute(2, 0, 1, 3)
        dkc[:, :hi].baddbmm_(dsf.transpose(1, 2), qs)
    return dq


# ============================================================================================ selection (Eq. 11)
def _topn(blk, t0, cfg):
    """Top-n with forced blocks from group-summed scores blk [HKV, C, Nb] of queries t0.. -> int64 [C, HKV, n]."""
    HKV, C, nb = blk.shape
    step = max(1, WORK_ELEMS // max(1, HKV * nb))
    if C > step:  # bound the temporaries
        return torch.cat([_topn(blk[:, a:a + step], t0 + a, cfg) for a in range(0, C, step)])
    n, lp = cfg.num_selected, cfg.slc_block_size
    t = torch.arange(t0, t0 + C, device=blk.device)
    own = (t // lp)[None, :, None]
    j = torch.arange(nb, device=blk.device)
    valid = j <= own
    forced = (j < cfg.num_init_blocks) | (j > own - cfg.num_local_blocks)
    ranked = blk.masked_fill(forced, float("inf")).masked_fill(~valid, _NEG)
    k = min(n, nb)
    vals, order = ranked.topk(k, dim=-1)
    thr = vals[..., -1:]
    # a tie at the threshold: the chosen set must prefer lower indices, so redo those rows with a stable sort
    ties = ((ranked == thr).sum(-1) > (vals == thr).sum(-1)) & (thr[..., 0] > _NEG)
    if bool(ties.any()):
        rows = ties.nonzero(as_tuple=True)
        sub = ranked[rows]
        o2 = torch.sort(sub, dim=-1, descending=True, stable=True).indices[..., :k]
        order[rows] = o2
        vals[rows] = torch.gather(sub, -1, o2)
    big = torch.iinfo(torch.long).max
    idx = torch.where(vals > _NEG, order, big).sort(dim=-1).values
    idx = idx.masked_fill(idx == big, -1)
    if k < n:
        idx = torch.nn.functional.pad(idx, (0, n - k), value=-1)
    return idx.permute(1, 0, 2).contiguous()


# ============================================================================================ selected branch
class _Batch(NamedTuple):
    """Segments [s0, s1) of one size P, whose lanes are [l0, l1)."""
    s0: int
    s1: int
    P: int
    l0: int
    l1: int


class _SlcPlan:
    """The chunk's valid (query, KV head, block) pairs grouped into segments that share one key block.

    A block's pairs fill segments of the chunk's size Pm, and the rest goes to one tail segment of the smallest size
    in SLC_SEGMENT_SIZES that holds it; segments of one size are contiguous (`groups`), so a batch of them is one
    bmm. Lanes are the padded pair positions; lane_slot is the pair's query-major slot ((c*HKV + h)*n + s) or the
    dummy slot C*HKV*n, lane_row its q row (c*HKV + h) or the dummy row C*HKV.
    """

    def __init__(self, idx, t0, lp, L):
        C, HKV, n = idx.shape
        dev = idx.device
        self.C, self.HKV, self.n, self.lp, self.L = C, HKV, n, lp, L
        NB = -(-L // lp)
        self.NB = NB
        t = torch.arange(t0, t0 + C, device=dev)
        idx = idx.long().sort(-1).values.contiguous()
        valid = (idx >= 0) & (idx <= (t // lp)[:, None, None])
        valid[..., 1:] &= idx[..., 1:] != idx[..., :-1]  # a repeated index counts once
        slots = valid.view(-1).nonzero().squeeze(1)
        N = slots.numel()
        key = ((slots // n) % HKV) * NB + idx.view(-1)[slots]
        skey, order = torch.sort(key, stable=True)
        counts = torch.bincount(skey, minlength=HKV * NB)
        sizes = torch.tensor(SLC_SEGMENT_SIZES, device=dev)

        def split(Pm):  # full Pm-segments and the tail size (0: none) of every block
            full, rem = counts // Pm, counts % Pm
            tail = torch.where(rem > 0, sizes[torch.searchsorted(sizes, rem.clamp(min=1))].clamp(max=Pm), 0)
            return full + (tail == Pm), torch.where(tail == Pm, 0, tail)

        # Pm: padded lanes plus ~16 lanes' worth of traffic per gathered key/value block
        best = None
        for Pm in SLC_SEGMENT_SIZES:
            full, tail = split(Pm)
            nseg = int(full.sum() + (tail > 0).sum())
            cost = int(full.sum()) * Pm + int(tail.sum()) + 16 * nseg
            if best is None or cost < best[0]:
                best = (cost, Pm)
        Pm = best[1]
        full, tail = split(Pm)
        # groups, Pm first: (P, first segment, end segment, first lane)
        self.groups, seg_keys, s_off, l_off = [], [], 0, 0
        tail_lane = torch.zeros_like(counts)  # first lane of a block's tail segment
        full_seg0 = torch.cumsum(full, 0) - full
        nfull = int(full.sum())
        if nfull:
            self.groups.append((Pm, 0, nfull, 0))
            seg_keys.append(torch.repeat_interleave(torch.arange(HKV * NB, device=dev), full, output_size=nfull))
            s_off, l_off = nfull, nfull * Pm
        for P in SLC_SEGMENT_SIZES:
            has = tail == P
            k = int(has.sum())
            if P >= Pm or not k:
                continue
            pos = torch.cumsum(has.long(), 0) - 1
            tail_lane = torch.where(has, l_off + pos * P, tail_lane)
            self.groups.append((P, s_off, s_off + k, l_off))
            seg_keys.append(has.nonzero().squeeze(1))
            s_off, l_off = s_off + k, l_off + k * P
        S, lanes = s_off, l_off
        self.S = S
        key_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(N, device=dev) - key_start[skey]
        in_full = rank < full[skey] * Pm
        lane = torch.where(in_full, full_seg0[skey] * Pm + rank, tail_lane[skey] + rank - full[skey] * Pm)
        dummy_slot = C * HKV * n
        self.lane_slot = torch.full((lanes,), dummy_slot, dtype=torch.long, device=dev)
        self.lane_slot[lane] = slots[order]
        is_pad = self.lane_slot == dummy_slot
        self.lane_row = torch.where(is_pad, C * HKV, self.lane_slot // n)
        seg_key = torch.cat(seg_keys) if seg_keys else counts.new_zeros(0)
        self.seg_key = seg_key
        self.seg_h = seg_key // NB
        self.seg_j = seg_key % NB
        lane_t = torch.where(is_pad, torch.iinfo(torch.long).max, t0 + self.lane_slot // (HKV * n))
        self.lane_t = lane_t
        # segments whose block reaches past one of its queries need the token-level causal mask (Eq. 12)
        first_t = [lane_t[l0:l0 + (s1 - s0) * P].view(s1 - s0, P).amin(1) for P, s0, s1, l0 in self.groups]
        first_t = torch.cat(first_t) if first_t else lane_t.new_zeros(0)
        self.seg_need = self.seg_j * lp + (lp - 1) > first_t
        self.ar = torch.arange(lp, device=dev)

    def batches(self, G):
        for P, g0, g1, l0 in self.groups:
            step = max(1, WORK_ELEMS // (P * G * self.lp))
            for s0 in range(g0, g1, step):
                s1 = min(g1, s0 + step)
                yield _Batch(s0, s1, P, l0 + (s0 - g0) * P, l0 + (s1 - g0) * P)

    def keys(self, kf, vf, s0, s1):
        """Gathered key/value blocks [SB, l', D] of segments [s0, s1) from kf/vf [L*HKV, D]."""
        pos = (self.seg_j[s0:s1, None] * self.lp + self.ar).clamp(max=self.L - 1)
        rows = (pos * self.HKV + self.seg_h[s0:s1, None]).view(-1)
        SB = s1 - s0
        return kf.index_select(0, rows).view(SB, self.lp, -1), vf.index_select(0, rows).view(SB, self.lp, -1)

    def scores(self, qflat, kb, b: _Batch, G):
        """Masked scores [SB, P, G, l'] and the gathered queries [SB, P*G, Dk] of batch b."""
        s0, s1, P = b.s0, b.s1, b.P
        SB = s1 - s0
        qb = qflat.index_select(0, self.lane_row[b.l0:b.l1]).view(SB, P * G, -1)
        s = torch.bmm(qb, kb.transpose(1, 2)).view(SB, P, G, self.lp)
        need = self.seg_need[s0:s1].nonzero().squeeze(1)
        if need.numel():
            kp = self.seg_j[s0:s1][need, None] * self.lp + self.ar  # [Sn, l']
            lt = self.lane_t[b.l0:b.l1].view(SB, P)[need]  # [Sn, P]
            s[need] = s[need].masked_fill(kp[:, None, None, :] > lt[:, :, None, None], _NEG)
        return s, qb


def _slc_forward_chunk(qflat, kf, vf, plan, G, Dv, sf=False):
    """Selected attention (Eq. 12) of one chunk. Returns o [C, HKV, G, Dv] and lse [C, HKV, G].

    With sf (scores provably small, see _shift_free) the unshifted exp-sums of all of a query's blocks are
    accumulated directly per query; otherwise each (query, block) pair keeps its own max and the partial results
    are merged with the log-sum-exp rule."""
    C, HKV, n = plan.C, plan.HKV, plan.n
    acc = qflat.dtype
    if sf:
        acc_o = torch.zeros(C * HKV + 1, G * Dv, dtype=acc, device=qflat.device)
        acc_l = torch.zeros(C * HKV + 1, G, dtype=acc, device=qflat.device)
        for b in plan.batches(G):
            SB, P = b.s1 - b.s0, b.P
            kb, vb = plan.keys(kf, vf, b.s0, b.s1)
            s, _ = plan.scores(qflat, kb, b, G)
            rows = plan.lane_row[b.l0:b.l1]
            s.exp_()
            acc_l.index_add_(0, rows, s.sum(-1).view(SB * P, G))
            acc_o.index_add_(0, rows, torch.bmm(s.view(SB, P * G, -1), vb).view(SB * P, G * Dv))
        lsum = acc_l[:-1].view(C, HKV, G)
        o = acc_o[:-1].view(C, HKV, G, Dv) * _safe_inv(lsum).unsqueeze(-1)
        return o, lsum.log()
    nslot = C * HKV * n
    buf_o = torch.zeros(nslot + 1, G * Dv, dtype=acc, device=qflat.device)
    buf_m = torch.full((nslot + 1, G), _NEG, dtype=acc, device=qflat.device)
    buf_l = torch.zeros(nslot + 1, G, dtype=acc, device=qflat.device)
    for b in plan.batches(G):
        SB, P = b.s1 - b.s0, b.P
        kb, vb = plan.keys(kf, vf, b.s0, b.s1)
        s, _ = plan.scores(qflat, kb, b, G)
        m, ssum = _softmax_stats_(s, False)
        ob = torch.bmm(s.view(SB, P * G, -1), vb).view(SB * P, G * Dv)
        ls = plan.lane_slot[b.l0:b.l1]
        buf_o.index_copy_(0, ls, ob)
        buf_m.index_copy_(0, ls, m.view(SB * P, G))
        buf_l.index_copy_(0, ls, ssum.view(SB * P, G))
    # merge the partial softmaxes of a query's blocks (log-sum-exp rule)
    bm = buf_m[:-1].view(C, HKV, n, G)
    M = bm.amax(2, keepdim=True)
    M = M.masked_fill(M == _NEG, 0.0)
    w = torch.exp(bm - M)  # [C, HKV, n, G]
    lsum = (w * buf_l[:-1].view(C, HKV, n, G)).sum(2)
    o = torch.einsum("chsg,chsgd->chgd", w, buf_o[:-1].view(C, HKV, n, G, Dv))
    o = o * _safe_inv(lsum).unsqueeze(-1)
    lse = M.squeeze(2) + lsum.log()
    return o, lse


def _slc_backward_chunk(qflat, kf, vf, plan, G, dO, delta, lse, dkb, dvb):
    """Gradients of one chunk of the slc branch; dk/dv accumulate into dkb/dvb [HKV*NB, l'*D] (block rows).

    Returns dq w.r.t. the scaled queries, [C, HKV, G, Dk].
    """
    C, HKV = plan.C, plan.HKV
    Dk, Dv = kf.shape[1], vf.shape[1]
    dev, acc = qflat.device, qflat.dtype
    lse_f = torch.cat([lse.reshape(C * HKV, G), torch.full((1, G), float("inf"), dtype=acc, device=dev)])
    delta_f = torch.cat([delta.reshape(C * HKV, G), torch.zeros(1, G, dtype=acc, device=dev)])
    dO_f = torch.cat([dO.reshape(C * HKV, G * Dv), torch.zeros(1, G * Dv, dtype=acc, device=dev)])
    dq = torch.zeros(C * HKV + 1, G * Dk, dtype=acc, device=dev)
    for b in plan.batches(G):
        SB, P = b.s1 - b.s0, b.P
        rows = plan.lane_row[b.l0:b.l1]
        kb, vb = plan.keys(kf, vf, b.s0, b.s1)
        s, qb = plan.scores(qflat, kb, b, G)
        p = s.sub_(lse_f.index_select(0, rows).view(SB, P, G, 1)).exp_()
        pf = p.view(SB, P * G, -1)
        dOl = dO_f.index_select(0, rows).view(SB, P * G, Dv)
        ds = torch.bmm(dOl, vb.transpose(1, 2)).view(SB, P, G, -1)
        ds.sub_(delta_f.index_select(0, rows).view(SB, P, G, 1)).mul_(p)
        dsf = ds.view(SB, P * G, -1)
        dq.index_add_(0, rows, torch.bmm(dsf, kb).view(SB * P, G * Dk))
        keys = plan.seg_key[b.s0:b.s1]
        dkb.index_add_(0, keys, torch.bmm(dsf.transpose(1, 2), qb).view(SB, -1))
        dvb.index_add_(0, keys, torch.bmm(pf.transpose(1, 2), dOl).view(SB, -1))
    return dq[:-1].view(C, HKV, G, Dk)


# ============================================================================================ window branch
class _WinPlan:
    """Banded tiles of Wt queries; tile keys span [tile_start - nw*Wt, tile_start + Wt) (Kp = (nw+1)*Wt keys)."""

    def __init__(self, window, L, C, device, acc):
        w = min(window, max(L, 1))
        Wt = max(1, min(int(WIN_TILE), C))
        nw = -(-(w - 1) // Wt)
        Kp = (nw + 1) * Wt
        self.w, self.Wt, self.nw, self.Kp = w, Wt, nw, Kp
        r = torch.arange(Wt, device=device)[:, None]
        c = torch.arange(Kp, device=device)[None, :]
        ok = (c <= r + nw * Wt) & (c > r + nw * Wt - w)  # kp <= t and t - kp < w
        self.bias = torch.zeros(Wt, Kp, dtype=acc, device=device).masked_fill_(~ok, _NEG)
        lo_end, hi_start = max(0, Kp - w), nw * Wt
        self.split = (lo_end, hi_start) if lo_end <= hi_start else None

    def tiles(self, C, HKV, G, extra=1):
        nt = -(-C // self.Wt)
        step = max(1, WORK_ELEMS // (extra * HKV * G * self.Wt * self.Kp))
        return nt, [(i, min(nt, i + step)) for i in range(0, nt, step)]

    def span(self, x_s, t0, nt):
        """[HKV, nt + nw, Wt, D] zero-padded keys of positions [t0 - nw*Wt, t0 + nt*Wt) from x_s [L, HKV, D]."""
        L, HKV, D = x_s.shape
        lo = t0 - self.nw * self.Wt
        n_all = (nt + self.nw) * self.Wt
        buf = x_s.new_zeros(HKV, n_all, D)
        a, b = max(lo, 0), min(lo + n_all, L)
        if b > a:
            buf[:, a - lo:b - lo] = x_s[a:b].permute(1, 0, 2)
        return buf

    def windows(self, buf, i0, i1):
        """[HKV, i1-i0, Kp, D] overlapping key windows of tiles [i0, i1) (a strided view of `buf`)."""
        HKV, _, D = buf.shape
        st = buf.stride()
        return buf.as_strided((HKV, i1 - i0, self.Kp, D), (st[0], self.Wt * st[1], st[1], st[2]),
                              buf.storage_offset() + i0 * self.Wt * st[1])

    def scores(self, qt, kw, t0, i0, i1, G):
        """Masked scores [HKV, tb, G, Wt, Kp] of tiles [i0, i1)."""
        HKV, tb = qt.shape[0], i1 - i0
        s = torch.matmul(qt[:, i0:i1], kw.transpose(-1, -2)).view(HKV, tb, G, self.Wt, self.Kp)
        if self.split is None:
            s.add_(self.bias)
        else:
            lo_end, hi_start = self.split
            if lo_end:
                s[..., :lo_end].add_(self.bias[:, :lo_end])
            s[..., hi_start:].add_(self.bias[:, hi_start:])
        first = t0 + i0 * self.Wt - self.nw * self.Wt  # position of column 0 of tile i0
        if first < 0:  # keys before the sequence start
            kp = first + torch.arange(tb, device=s.device)[:, None] * self.Wt + torch.arange(self.Kp, device=s.device)
            s.masked_fill_((kp < 0)[None, :, None, None, :], _NEG)
        return s


def _win_q_tiles(qflat, C, HKV, G, Wt):
    """Scaled queries as tiles [HKV, nt, G*Wt, Dk] (zero padded to nt*Wt queries)."""
    nt = -(-C // Wt)
    q = qflat[:C * HKV].view(C, HKV, G, -1)
    if nt * Wt != C:
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, 0, 0, nt * Wt - C))
    return q.view(nt, Wt, HKV, G, -1).permute(2, 0, 3, 1, 4).reshape(HKV, nt, G * Wt, -1)


def _from_tiles(x, C, HKV, G, Wt):
    """[HKV, nt, G*Wt, D] -> [C, HKV, G, D]."""
    nt = x.shape[1]
    return x.view(HKV, nt, G, Wt, -1).permute(1, 3, 0, 2, 4).reshape(nt * Wt, HKV, G, -1)[:C]


def _win_forward_chunk(qflat, k_s, v_s, t0, C, plan, G, sf=False):
    """Sliding-window attention of one chunk. Returns o [C, HKV, G, Dv], lse [C, HKV, G]."""
    HKV, Wt = k_s.shape[1], plan.Wt
    nt, batches = plan.tiles(C, HKV, G)
    qt = _win_q_tiles(qflat, C, HKV, G, Wt)
    kbuf, vbuf = plan.span(k_s, t0, nt), plan.span(v_s, t0, nt)
    o = qt.new_empty(HKV, nt, G * Wt, v_s.shape[2])
    lse = qt.new_empty(HKV, nt, G * Wt, 1)
    for i0, i1 in batches:
        tb = i1 - i0
        s = plan.scores(qt, plan.windows(kbuf, i0, i1), t0, i0, i1, G)
        m, ssum = _softmax_stats_(s, False, sf)
        ob = torch.matmul(s.view(HKV, tb, G * Wt, plan.Kp), plan.windows(vbuf, i0, i1))
        o[:, i0:i1] = ob / ssum.view(HKV, tb, G * Wt, 1)
        lse[:, i0:i1] = (m + ssum.log()).view(HKV, tb, G * Wt, 1)
    return _from_tiles(o, C, HKV, G, Wt), _from_tiles(lse, C, HKV, G, Wt).squeeze(-1)


def _win_backward_chunk(qflat, k_s, v_s, t0, C, plan, G, dO, delta, lse, dk_buf, dv_buf):
    """Gradients of one chunk of the window branch. dk_buf/dv_buf [HKV, L + nw*Wt + pad, D] hold position p at
    index p + nw*Wt. Returns dq w.r.t. the scaled queries, [C, HKV, G, Dk]."""
    HKV, Wt, Kp, nw = k_s.shape[1], plan.Wt, plan.Kp, plan.nw
    nt, batches = plan.tiles(C, HKV, G, extra=2)
    qt = _win_q_tiles(qflat, C, HKV, G, Wt)
    pad = (0, 0, 0, 0, 0, 0, 0, nt * Wt - C)
    dOt = _win_q_tiles(torch.nn.functional.pad(dO, pad).reshape(-1, dO.shape[2] * dO.shape[3]), nt * Wt, HKV, G, Wt)
    lse_t = _win_q_tiles(torch.nn.functional.pad(_finite_lse(lse)[..., None], pad).reshape(-1, G), nt * Wt, HKV, G, Wt)
    del_t = _win_q_tiles(torch.nn.functional.pad(delta[..., None], pad).reshape(-1, G), nt * Wt, HKV, G, Wt)
    kbuf, vbuf = plan.span(k_s, t0, nt), plan.span(v_s, t0, nt)
    dq = qt.new_empty(HKV, nt, G * Wt, qt.shape[-1])
    for i0, i1 in batches:
        tb = i1 - i0
        kw, vw = plan.windows(kbuf, i0, i1), plan.windows(vbuf, i0, i1)
        s = plan.scores(qt, kw, t0, i0, i1, G).view(HKV, tb, G * Wt, Kp)
        p = s.sub_(lse_t[:, i0:i1]).exp_()
        dOs = dOt[:, i0:i1]
        dvw = torch.matmul(p.transpose(-1, -2), dOs)  # [HKV, tb, Kp, Dv]
        ds = torch.matmul(dOs, vw.transpose(-1, -2))
        ds.sub_(del_t[:, i0:i1]).mul_(p)
        dq[:, i0:i1] = torch.matmul(ds, kw)
        dkw = torch.matmul(ds.transpose(-1, -2), qt[:, i0:i1])  # [HKV, tb, Kp, Dk]
        # tile i's key block q covers positions t0 + (i + q - nw)*Wt ..: buffer index t0 + (i + q)*Wt
        base = t0 + i0 * Wt
        for qb in range(nw + 1):
            sl = slice(base + qb * Wt, base + (qb + tb) * Wt)
            dk_buf[:, sl] += dkw[:, :, qb * Wt:(qb + 1) * Wt].reshape(HKV, tb * Wt, -1)
            dv_buf[:, sl] += dvw[:, :, qb * Wt:(qb + 1) * Wt].reshape(HKV, tb * Wt, -1)
    return _from_tiles(dq, C, HKV, G, Wt)


def _win_grad_buffers(L, HKV, Dk, Dv, plan, acc, device):
    n = L + (plan.nw + 2) * plan.Wt  # the last tile of a chunk ends before L + (nw + 1) * Wt
    return (torch.zeros(HKV, n, Dk, dtype=acc, device=device), torch.zeros(HKV, n, Dv, dtype=acc, device=device))


def _win_grad_out(buf, plan, L):
    off = plan.nw * plan.Wt
    return buf[:, off:off + L].permute(1, 0, 2)


# ============================================================================================ drivers
class _Geom:
    """Everything a driver needs besides the tensors."""

    def __init__(self, scale, cu_seqlens, l=None, d=None, cfg=None, window=None, slc_block=None, q_offset=0):
        self.scale, self.cu, self.l, self.d, self.cfg = scale, cu_seqlens, l, d, cfg
        self.window, self.lp, self.q_offset = window, slc_block, q_offset


def _spans(geom, B, T):
    if geom.l is not None:
        yield from _cmp_spans(B, T, geom.cu, geom.l, geom.d)
    else:
        for b, s, e in sequence_spans(B, T, geom.cu):
            yield b, s, e, 0, 0


def _no_autocast(x):
    """This backend picks its own precisions (fp32 accumulation); an enclosing autocast region would recast its
    matmuls, and only in the calling thread (autocast state is per thread, the chunk workers have none)."""
    return torch.autocast(x.device.type, enabled=False)


def _fused_kernels(q, acc):
    """The compiled float32 CPU kernels (`cpu_kernels`) when they apply to q, else None (pure-PyTorch path)."""
    if acc != torch.float32 or q.device.type != "cpu" or not USE_FUSED_CPU:
        return None
    from . import cpu_kernels
    return cpu_kernels.load()


def _forward(q, cmp, slc, win, gates, geom, save):
    with _threads_for(q) as workers, _no_autocast(q):
        return _forward_impl(q, cmp, slc, win, gates, geom, save, workers)


def _forward_impl(q, cmp, slc, win, gates, geom, save, workers=1):
    """Chunked forward of any subset of the branches (the composed op when `gates` is given).

    cmp = (k_cmp, v_cmp) | None, slc = (k, v, indices | None) | None, win = (k, v) | None; q [B, Tq, HQ, Dk] holds
    the queries of key positions q_offset .. q_offset + Tq - 1 (q_offset > 0 only without cu_seqlens).
    Returns (out [B, Tq, HQ, Dv], saved) where saved has per-branch o and lse (acc dtype) and the indices.
    """
    B, Tq, HQ, Dk = q.shape
    acc = _acc_dtype(q.dtype)
    ref_kv = (slc or win or cmp)
    T = Tq + geom.q_offset
    HKV, Dv = ref_kv[0].shape[2], ref_kv[1].shape[3]
    G = HQ // HKV
    q0 = geom.q_offset
    out = q.new_zeros(B, Tq, HQ, Dv)
    saved = {}
    if save or gates is None:
        for name, br in (("cmp", cmp), ("slc", slc), ("win", win)):
            if br is not None:
                saved["o_" + name] = torch.zeros(B, Tq, HQ, Dv, dtype=acc, device=q.device)
                saved["lse_" + name] = torch.full((B, Tq, HQ), _NEG, dtype=acc, device=q.device)
    need_sel = slc is not None and slc[2] is None
    if save and slc is not None:
        n = geom.cfg.num_selected if need_sel else slc[2].shape[3]
        saved["idx"] = torch.full((B, Tq, HKV, n), -1, dtype=torch.long, device=q.device)
    fused = _fused_kernels(q, acc)
    W = r = None
    if need_sel:
        W = _overlap_weights(geom.cfg, acc, q.device)
        r = geom.cfg.slc_block_size // geom.cfg.cmp_stride
    if fused is not None and q0 == 0:
        _forward_fused(fused, out, saved, q, cmp, slc, win, gates, geom, W, r, workers)
        if gates is None:
            name = "cmp" if cmp is not None else ("slc" if slc is not None else "win")
            out = saved["o_" + name].to(q.dtype)
        return out, saved
    for b, s, e, cs, ce in _spans(geom, B, T):
        L = e - s
        if L == 0 or L <= q0:
            continue
        q_s = q[b, s:e] if q0 == 0 else q[b]
        Tc = ce - cs
        if cmp is not None:
            if q0 == 0:
                kc, vc = _prep_cmp(cmp[0][b, cs:ce].to(acc), cmp[1][b, cs:ce].to(acc), r or 1, acc)
                km_c = torch.linalg.vector_norm(kc, dim=-1).amax(-1)
            else:  # a query tail (decoding): head-major views, no copy and no norm pass over every compressed key
                kc, vc = (x[b, cs:ce].to(acc).permute(1, 0, 2) for x in cmp[:2])
        # largest key norm per KV head, for the shift-free test; a query tail (decoding) only looks at the keys
        # it can reach, so that one step does not pay a pass over the whole context
        if slc is not None:
            kf, vf = (x[b, s:e].to(acc).reshape(L * HKV, -1) for x in slc[:2])
            km_s = None if q0 else torch.linalg.vector_norm(kf.view(L, HKV, Dk), dim=-1).amax(0)
        # a query tail takes the max-shifted softmax in every branch (a few rows: cheaper than the norm passes)
        if win is not None:
            kw_s, vw_s = (x[b, s:e].to(acc) for x in win)
            km_w = None if q0 else torch.linalg.vector_norm(kw_s, dim=-1).amax(0)
            wplan = None if fused is not None else _WinPlan(geom.window, L, min(int(CHUNK_SIZE), L - q0), q.device, acc)
        def one_chunk(a, c1, b=b, s=s, L=L, q_s=q_s, Tc=Tc):
            C = c1 - a
            rows = slice(s + a - q0, s + c1 - q0)  # rows of q / out
            qflat = _scaled_q(q_s, a - q0, c1 - q0, HKV, geom.scale, acc)
            qn = _qnorm(qflat, HKV, Dk)
            res = {}
            if cmp is not None and fused is not None and vc is not None and kc.is_contiguous():
                sf = q0 == 0 and _shift_free(qn, km_c)
                cfg = geom.cfg
                n_sel = cfg.num_selected if need_sel else 0
                Wf = W if need_sel else kc.new_zeros(1, 2)
                o_c, lse_c, idx_c = fused.cmp_fwd(qflat, kc, vc, Wf, C, a, geom.l, geom.d, Tc, n_sel,
                                                  cfg.num_init_blocks if need_sel else 0,
                                                  cfg.num_local_blocks if need_sel else 0, sf)
                res["cmp"] = (o_c, lse_c)
            elif cmp is not None:
                sf = q0 == 0 and _shift_free(qn, km_c)
                lp = geom.lp
                # selection scores only ever exist for groups of rows small enough for WORK_ELEMS
                gs = max(1, WORK_ELEMS // (HKV * ((c1 - 1) // lp + 1))) if need_sel else C
                parts = []
                for g0 in range(0, C, gs):
                    g1 = min(C, g0 + gs)
                    sel = (W, r, lp, (a + g1 - 1) // lp + 1) if need_sel else None
                    o_g, lse_g, blk = _cmp_forward_chunk(qflat[g0 * HKV:g1 * HKV], kc, vc, a + g0, g1 - g0, geom.l,
                                                         geom.d, Tc, sel, sf)
                    with torch.no_grad():
                        parts.append((o_g, lse_g, _topn(blk, a + g0, geom.cfg) if need_sel else None))
                if len(parts) == 1:
                    o_c, lse_c, idx_c = parts[0]
                else:
                    o_c, lse_c = torch.cat([p_[0] for p_ in parts]), torch.cat([p_[1] for p_ in parts])
                    idx_c = torch.cat([p_[2] for p_ in parts]) if need_sel else None
                res["cmp"] = (o_c, lse_c)
            if slc is not None:
                idx = idx_c if need_sel else slc[2][b, rows]
                if "idx" in saved:
                    saved["idx"][b, rows] = idx
                sf = q0 == 0 and _shift_free(qn, km_s)
                if fused is not None:
                    res["slc"] = fused.slc_fwd(qflat, kf, vf, idx.long().contiguous(), a, geom.lp, G, sf)
                else:
                    res["slc"] = _slc_forward_chunk(qflat, kf, vf, _SlcPlan(idx, a, geom.lp, L), G, Dv, sf)
            if win is not None:
                sf = q0 == 0 and _shift_free(qn, km_w)
                if fused is not None:
                    res["win"] = fused.win_fwd(qflat, kw_s.reshape(L * HKV, -1), vw_s.reshape(L * HKV, -1), C, HKV, a,
                                               geom.window, G, sf)
                else:
                    res["win"] = _win_forward_chunk(qflat, kw_s, vw_s, a, C, wplan, G, sf)
            for name, (o_b, lse_b) in res.items():
                if "o_" + name in saved:
                    saved["o_" + name][b, rows] = o_b.view(C, HQ, Dv)
                    saved["lse_" + name][b, rows] = lse_b.view(C, HQ)
            if gates is not None:
                g = gates[b, rows].to(acc).view(C, HKV, G, 3, 1)
                o = res["cmp"][0].mul_(g[..., 0, :])  # Eq. 5, in place: the branch outputs are no longer needed
                o.addcmul_(res["slc"][0], g[..., 1, :]).addcmul_(res["win"][0], g[..., 2, :])
                out[b, rows] = o.view(C, HQ, Dv)

        _run_chunks(lambda group: [one_chunk(a, c1) for a, c1 in group], _chunks(L, q0), workers)
    if gates is None:
        name = "cmp" if cmp is not None else ("slc" if slc is not None else "win")
        out = saved["o_" + name].to(q.dtype)
    return out, saved


def _forward_fused(fused, out, saved, q, cmp, slc, win, gates, geom, W, r, workers):
    """`_forward_impl` through the compiled float32 kernels, for full sequences (no query offset): fills `out` (with
    gates) and `saved`. Whole-batch work runs once (scaled queries, query and key norms for the shift-free tests,
    and, when the branch outputs are saved, the gate combination of Eq. 5); per chunk the kernels run on views and
    one host read takes the chunk's shift-free decisions."""
    B, T, HQ, Dk = q.shape
    acc = torch.float32
    ref_kv = (slc or win or cmp)
    HKV, Dv = ref_kv[0].shape[2], ref_kv[1].shape[3]
    G = HQ // HKV
    need_sel = slc is not None and slc[2] is None
    cfg = geom.cfg
    qs = torch.mul(q, geom.scale) if q.dtype == acc else q.to(acc).mul_(geom.scale)
    qs = qs.contiguous().view(B, T, HKV, G * Dk)
    qnorm = torch.linalg.vector_norm(qs.view(B, T, HKV, G, Dk), dim=-1)  # [B, T, HKV, G]
    knorm = {}  # largest key norm per KV head, for the shift-free test; one pass per distinct key tensor
    for name, br in (("cmp", cmp), ("slc", slc), ("win", win)):
        if br is not None:
            same = [n for n, k in knorm.items() if k[0] is br[0]]
            knorm[name] = knorm[same[0]] if same else (br[0], torch.linalg.vector_norm(br[0].to(acc), dim=-1))
    limit = _exp_limit(acc)
    gated = gates is not None and "o_cmp" in saved  # the gate combination then runs once, over the whole batch
    flat = {k: v.view(B * T, *v.shape[2:]) for k, v in saved.items()}  # rows b*T + t
    for b, s, e, cs, ce in _spans(geom, B, T):
        L = e - s
        if L == 0:
            continue
        Tc = ce - cs
        kmax = []  # [branches, HKV]
        for name, (_, norms) in knorm.items():
            lo, hi = (cs, ce) if name == "cmp" else (s, e)
            kmax.append(norms[b, lo:hi].amax(0) if hi > lo else norms.new_zeros(HKV))
        kmax = torch.stack(kmax)
        if cmp is not None:
            kc, vc = _prep_cmp(cmp[0][b, cs:ce].to(acc), cmp[1][b, cs:ce].to(acc), r or 1, acc)
        if slc is not None:
            kf, vf = (x[b, s:e].to(acc).reshape(L * HKV, -1) for x in slc[:2])
        if win is not None:
            kw, vw = (x[b, s:e].to(acc).reshape(L * HKV, -1) for x in win)

        def one_chunk(a, c1, b=b, s=s, L=L, Tc=Tc, kmax=kmax):
            C, rows = c1 - a, slice(s + a, s + c1)
            qflat = qs[b, rows].view(C * HKV, G * Dk)
            qn = qnorm[b, rows].amax(dim=(0, 2))  # [HKV]
            # Cauchy-Schwarz: every score of branch k is at most max_h |q|_h * max|k|_h (see _shift_free)
            shift_free = dict(zip(knorm, ((qn * kmax).amax(1) <= limit).tolist()))
            res = {}
            if cmp is not None:
                n_sel = cfg.num_selected if need_sel else 0
                o_c, lse_c, idx = fused.cmp_fwd(qflat, kc, vc, W if need_sel else kc.new_zeros(1, 2), C, a, geom.l,
                                                geom.d, Tc, n_sel, cfg.num_init_blocks if need_sel else 0,
                                                cfg.num_local_blocks if need_sel else 0, shift_free["cmp"])
                res["cmp"] = (o_c, lse_c)
            if slc is not None:
                if not need_sel:
                    idx = slc[2][b, rows]
                res["slc"] = fused.slc_fwd(qflat, kf, vf, idx.long().contiguous(), a, geom.lp, G, shift_free["slc"])
            if win is not None:
                res["win"] = fused.win_fwd(qflat, kw, vw, C, HKV, a, geom.window, G, shift_free["win"])
            r0 = b * T + s + a
            if "idx" in flat:
                flat["idx"][r0:r0 + C] = idx
            for name, (o_b, lse_b) in res.items():
                if "o_" + name in flat:
                    flat["o_" + name][r0:r0 + C] = o_b.view(C, HQ, Dv)
                    flat["lse_" + name][r0:r0 + C] = lse_b.view(C, HQ)
            if gates is not None and not gated:
                g = gates[b, rows].to(acc).view(C, HKV, G, 3, 1)
                o = res["cmp"][0].mul_(g[..., 0, :])  # Eq. 5, in place: the branch outputs are no longer needed
                o.addcmul_(res["slc"][0], g[..., 1, :]).addcmul_(res["win"][0], g[..., 2, :])
                out[b, rows] = o.view(C, HQ, Dv)

        _run_chunks(lambda group: [one_chunk(a, c1) for a, c1 in group], _chunks(L), workers)
    if gated:  # Eq. 5 over the whole batch
        g = gates.to(acc).reshape(B, T, HQ, 3, 1)
        o = saved["o_cmp"] * g[..., 0, :]
        out.copy_(o.addcmul_(saved["o_slc"], g[..., 1, :]).addcmul_(saved["o_win"], g[..., 2, :]))


def _backward(q, cmp, slc, win, gates, geom, saved, dout, dlse=None):
    with _threads_for(q) as workers, _no_autocast(q):
        return _backward_impl(q, cmp, slc, win, gates, geom, saved, dout, dlse, workers)


def _backward_impl(q, cmp, slc, win, gates, geom, saved, dout, dlse=None, workers=1):
    """Gradients of `_forward` (recomputing score tiles per chunk). Returns dq, (dk_cmp, dv_cmp), (dk, dv) slc,
    (dk, dv) win, dgates (None where a branch or the gates are absent)."""
    B, T, HQ, Dk = q.shape
    acc = _acc_dtype(q.dtype)
    fused = _fused_kernels(q, acc)
    if fused is not None:
        return _backward_fused(fused, q, cmp, slc, win, gates, geom, saved, dout, dlse, workers)
    ref_kv = (slc or win or cmp)
    HKV, Dv = ref_kv[0].shape[2], ref_kv[1].shape[3]
    G = HQ // HKV
    dq = torch.zeros(B, T, HQ, Dk, dtype=acc, device=q.device)
    dcmp = None if cmp is None else tuple(torch.zeros_like(x, dtype=acc) for x in cmp[:2])
    dslc = None if slc is None else tuple(torch.zeros_like(x, dtype=acc) for x in slc[:2])
    dwin = None if win is None else tuple(torch.zeros_like(x, dtype=acc) for x in win)
    dg = None if gates is None else torch.zeros(B, T, HQ, 3, dtype=acc, device=q.device)
    for b, s, e, cs, ce in _spans(geom, B, T):
        L = e - s
        if L == 0:
            continue
        q_s = q[b, s:e]
        Tc = ce - cs
        if cmp is not None:
            kc, vc = _prep_cmp(cmp[0][b, cs:ce].to(acc), cmp[1][b, cs:ce].to(acc), 1, acc)
        if slc is not None:
            kf, vf = (x[b, s:e].to(acc).reshape(L * HKV, -1) for x in slc[:2])
            NB = -(-L // geom.lp)
        if win is not None:
            kw_s, vw_s = (x[b, s:e].to(acc) for x in win)
            wplan = _WinPlan(geom.window, L, min(int(CHUNK_SIZE), L), q.device, acc)

        def group(chunks, b=b, s=s, L=L, q_s=q_s, Tc=Tc):
            """Gradients of some chunks of this sequence; k/v gradients go to buffers local to the group."""
            buf = {}
            if cmp is not None:
                buf["dkc"], buf["dvc"] = torch.zeros_like(kc), torch.zeros_like(vc)
            if slc is not None:
                buf["dkb"] = torch.zeros(HKV * NB, geom.lp * Dk, dtype=acc, device=q.device)
                buf["dvb"] = torch.zeros(HKV * NB, geom.lp * Dv, dtype=acc, device=q.device)
            if win is not None:
                buf["dkw"], buf["dvw"] = _win_grad_buffers(L, HKV, Dk, Dv, wplan, acc, q.device)
            for a, c1 in chunks:
                one_chunk(a, c1, b, s, L, q_s, Tc, **buf)
            return buf

        def one_chunk(a, c1, b, s, L, q_s, Tc, dkc=None, dvc=None, dkb=None, dvb=None, dkw=None, dvw=None):
            C = c1 - a
            rows = slice(s + a, s + c1)
            qflat = _scaled_q(q_s, a, c1, HKV, geom.scale, acc)
            dO = dout[b, rows].to(acc).view(C, HKV, G, Dv)
            if gates is not None:
                g = gates[b, rows].to(acc).view(C, HKV, G, 3)
            dqc = torch.zeros(C, HKV, G, Dk, dtype=acc, device=q.device)
            for k_, name in enumerate(("cmp", "slc", "win")):
                br = (cmp, slc, win)[k_]
                if br is None:
                    continue
                o_b = saved["o_" + name][b, rows].view(C, HKV, G, Dv)
                lse_b = saved["lse_" + name][b, rows].view(C, HKV, G)
                if gates is not None:  # Eq. 5: dL/dg = <dO, o_b>, and delta = <g dO, o_b> = g dL/dg
                    dgk = (dO * o_b).sum(-1)
                    dg[b, rows, :, k_] = dgk.view(C, HQ)
                    delta = dgk * g[..., k_]
                else:
                    delta = (dO * o_b).sum(-1)
                if dlse is not None:  # a branch op's lse gradient (the composed op has none)
                    delta = delta - dlse[b, rows].to(acc).view(C, HKV, G)
                dOb = dO if gates is None else dO * g[..., k_:k_ + 1]
                if name == "cmp":
                    dqc += _cmp_backward_chunk(qflat, kc, vc, a, C, geom.l, geom.d, Tc, dOb, delta, lse_b, dkc, dvc)
                elif name == "slc":
                    plan = _SlcPlan(saved["idx"][b, rows], a, geom.lp, L)
                    dqc += _slc_backward_chunk(qflat, kf, vf, plan, G, dOb, delta, lse_b, dkb, dvb)
                else:
                    dqc += _win_backward_chunk(qflat, kw_s, vw_s, a, C, wplan, G, dOb, delta, lse_b, dkw, dvw)
            dq[b, rows] = dqc.view(C, HQ, Dk) * geom.scale

        bufs = _run_chunks(group, _chunks(L), workers)
        tot = {k: sum(bb[k] for bb in bufs[1:]) + bufs[0][k] if len(bufs) > 1 else bufs[0][k] for k in bufs[0]}
        dkc, dvc, dkb, dvb, dkw, dvw = (tot.get(k) for k in ("dkc", "dvc", "dkb", "dvb", "dkw", "dvw"))
        if cmp is not None:
            dcmp[0][b, cs:ce] = dkc[:, :Tc].permute(1, 0, 2)
            dcmp[1][b, cs:ce] = dvc[:, :Tc].permute(1, 0, 2)
        if slc is not None:
            dslc[0][b, s:e] = dkb.view(HKV, NB * geom.lp, Dk)[:, :L].permute(1, 0, 2)
            dslc[1][b, s:e] = dvb.view(HKV, NB * geom.lp, Dv)[:, :L].permute(1, 0, 2)
        if win is not None:
            dwin[0][b, s:e] = _win_grad_out(dkw, wplan, L)
            dwin[1][b, s:e] = _win_grad_out(dvw, wplan, L)
    return dq, dcmp, dslc, dwin, dg


def _backward_fused(fused, q, cmp, slc, win, gates, geom, saved, dout, dlse, workers):
    """`_backward_impl` through the compiled float32 kernels. The elementwise work runs once over the whole batch
    (scaled queries, dL/dg of Eq. 5, the softmax deltas, dq's scale); per chunk only the kernels run, on views of
    whole-batch tensors. They accumulate dq, and the slc/win dK/dV in the keys' own layout, in place: straight into
    the returned gradients when a sequence's chunks run as one group, else into per-group buffers summed in a fixed
    order (bitwise repeatable either way)."""
    B, T, HQ, Dk = q.shape
    acc = torch.float32
    ref_kv = (slc or win or cmp)
    HKV, Dv = ref_kv[0].shape[2], ref_kv[1].shape[3]
    G = HQ // HKV
    qs = torch.mul(q, geom.scale) if q.dtype == acc else q.to(acc).mul_(geom.scale)
    qs = qs.contiguous().view(B, T, HKV, G * Dk)
    dO = dout.to(acc).contiguous().view(B, T, HKV, G, Dv)
    gk = None if gates is None else gates.to(acc).contiguous().view(B, T, HKV, G, 3)
    no_gates = dO.new_zeros(0)  # the kernels' gates argument when there are none
    dg = None if gates is None else torch.zeros(B, T, HQ, 3, dtype=acc, device=q.device)
    branches = [(k_, name) for k_, name in enumerate(("cmp", "slc", "win")) if (cmp, slc, win)[k_] is not None]
    delta, lse = {}, {}
    for k_, name in branches:
        dgk = (dO * saved["o_" + name].view(B, T, HKV, G, Dv)).sum(-1)
        if gates is not None:  # Eq. 5: dL/dg = <dO, o_b>, and delta = <g dO, o_b> = g dL/dg
            dg[..., k_] = dgk.view(B, T, HQ)
            dgk = dgk * gk[..., k_]
        if dlse is not None:  # a branch op's lse gradient (the composed op has none)
            dgk = dgk - dlse.to(acc).reshape(B, T, HKV, G)
        delta[name] = dgk.contiguous()
        lse[name] = saved["lse_" + name].view(B, T, HKV, G)
    dq = torch.zeros(B, T, HKV, G, Dk, dtype=acc, device=q.device)
    dcmp = None if cmp is None else tuple(torch.zeros_like(x, dtype=acc) for x in cmp[:2])
    dslc = None if slc is None else tuple(torch.zeros(x.shape, dtype=acc, device=q.device) for x in slc[:2])
    dwin = None if win is None else tuple(torch.zeros(x.shape, dtype=acc, device=q.device) for x in win)
    for b, s, e, cs, ce in _spans(geom, B, T):
        L = e - s
        if L == 0:
            continue
        Tc = ce - cs
        if cmp is not None:
            kc, vc = _prep_cmp(cmp[0][b, cs:ce].to(acc), cmp[1][b, cs:ce].to(acc), 1, acc)
        if slc is not None:
            kf, vf = (x[b, s:e].to(acc).reshape(L * HKV, -1) for x in slc[:2])
        if win is not None:
            kw, vw = (x[b, s:e].to(acc).reshape(L * HKV, -1) for x in win)
        chunks = _chunks(L)
        one_group = min(workers, len(chunks)) == 1

        def group(items, b=b, s=s, L=L, Tc=Tc):
            """Gradients of some chunks of this sequence, into the returned k/v gradients (one group) or into
            buffers of this group's own."""
            buf = {}
            if cmp is not None:
                buf["dkc"], buf["dvc"] = torch.zeros_like(kc), torch.zeros_like(vc)
            for key, grads in (("b", dslc), ("w", dwin)):
                if grads is None:
                    continue
                if one_group:
                    buf["dk" + key], buf["dv" + key] = (x[b, s:e].view(L * HKV, -1) for x in grads)
                else:
                    buf["dk" + key], buf["dv" + key] = (x.new_zeros(L * HKV, x.shape[-1]) for x in grads)
            for a, c1 in items:
                C, rows = c1 - a, slice(s + a, s + c1)
                qflat = qs[b, rows].view(C * HKV, G * Dk)
                args = (dO[b, rows], no_gates if gk is None else gk[b, rows])
                dqc = dq[b, rows]
                if cmp is not None:  # the kernels scale dO by the gate and accumulate into dqc themselves
                    fused.cmp_bwd(qflat, kc, vc, *args, delta["cmp"][b, rows], lse["cmp"][b, rows], buf["dkc"],
                                  buf["dvc"], dqc, C, a, geom.l, geom.d, Tc)
                if slc is not None:
                    fused.slc_bwd(qflat, kf, vf, saved["idx"][b, rows].contiguous(), *args, delta["slc"][b, rows],
                                  lse["slc"][b, rows], buf["dkb"], buf["dvb"], dqc, a, geom.lp, G)
                if win is not None:
                    fused.win_bwd(qflat, kw, vw, *args, delta["win"][b, rows], lse["win"][b, rows], buf["dkw"],
                                  buf["dvw"], dqc, C, HKV, a, geom.window, G)
            return buf

        bufs = _run_chunks(group, chunks, workers)
        tot = {k: sum(bb[k] for bb in bufs[1:]) + bufs[0][k] if len(bufs) > 1 else bufs[0][k] for k in bufs[0]}
        if cmp is not None:
            dcmp[0][b, cs:ce] = tot["dkc"][:, :Tc].permute(1, 0, 2)
            dcmp[1][b, cs:ce] = tot["dvc"][:, :Tc].permute(1, 0, 2)
        if not one_group:
            for key, grads in (("b", dslc), ("w", dwin)):
                if grads is not None:
                    grads[0][b, s:e], grads[1][b, s:e] = tot["dk" + key].view(L, HKV, Dk), tot["dv" + key].view(L, HKV, Dv)
    return dq.mul_(geom.scale).view(B, T, HQ, Dk), dcmp, dslc, dwin, dg


def _cast(x, like):
    return None if x is None else x.to(like.dtype)


class _BranchFn(torch.autograd.Function):
    """One branch op's autograd entry point over `branch_fwd` / `branch_bwd`; returns (o, lse)."""

    @staticmethod
    def forward(ctx, branch, q, k, v, indices, geometry, scale, cu_seqlens):
        o, lse = branch_fwd(branch, q, k, v, indices, geometry=geometry, scale=scale, cu_seqlens=cu_seqlens)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.cfg = (branch, dict(geometry=geometry, scale=scale, cu_seqlens=cu_seqlens))
        return o.to(q.dtype), lse

    @staticmethod
    def backward(ctx, do, dlse):
        branch, kw = ctx.cfg
        q, k, v, indices, o, lse = ctx.saved_tensors
        return (None, *branch_bwd(branch, do, dlse, q, k, v, o, lse, indices, **kw), None, None, None, None)


class _NSAFn(torch.autograd.Function):
    """The composed op's autograd entry point over `native_sparse_attention_fwd` / `_bwd`."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_indices, config, scale, cu_seqlens):
        args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
        out, residuals = native_sparse_attention_fwd(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                                     block_indices=block_indices)
        ctx.save_for_backward(*args, *residuals)
        ctx.cfg = dict(config=config, scale=scale, cu_seqlens=cu_seqlens)
        return out

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors
        return (*native_sparse_attention_bwd(do, *saved[:8], saved[8:], **ctx.cfg), None, None, None, None)


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _contig(*xs):
    return [None if x is None else x.contiguous() for x in xs]


# ============================================================================================ packed batches
def _length_groups(cu_seqlens, l=None, d=None):
    """Token (and compressed-token) indices of a packed batch's non-empty sequences grouped by length:
    [(tok [m, L], cmp [m, Tc] | None)], or None when no two sequences share a length (nothing to merge)."""
    cu = host_offsets(cu_seqlens)
    groups = {}
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b > a:
            groups.setdefault(b - a, []).append(i)
    if len(groups) == sum(len(v) for v in groups.values()):
        return None
    dev = cu_seqlens.device
    ccu = None if l is None else host_offsets(compressed_cu_seqlens(cu_seqlens, l, d))
    out = []
    for L, ids in groups.items():
        tok = torch.tensor([cu[i] for i in ids], device=dev)[:, None] + torch.arange(L, device=dev)
        cmp = None
        if ccu is not None:
            Tc = num_compressed_tokens(L, l, d)
            cmp = torch.tensor([ccu[i] for i in ids], device=dev)[:, None] + torch.arange(Tc, device=dev)
        out.append((tok, cmp))
    return out


def _to_group(x, idx):
    """[1, N, H, ...] -> [1, L, m*H, ...]: the m sequences at idx [m, L] side by side along the head axis."""
    m, L = idx.shape
    return x[0, idx].transpose(0, 1).reshape(1, L, m * x.shape[2], *x.shape[3:])


def _use_groups(q, cu_seqlens):
    """Whether a packed batch runs grouped by length (`_grouped`). With the compiled kernels a sequence costs
    little on its own, and the gathers of grouping cost more unless the sequences are many and short (measured on
    the 2-core VM: 32 x 256 and 64 x 128 tokens ran 15-20 % faster one by one, 128 x 64 10 % faster grouped)."""
    if _fused_kernels(q, _acc_dtype(q.dtype)) is None:
        return True
    return q.shape[1] < GROUP_MAX_MEAN_LEN * max(1, cu_seqlens.numel() - 1)


def _grouped(cu_seqlens, l, d, fn, tok, cmp, heads):
    """Runs fn once per group of equal-length sequences, the sequences of a group side by side along the head axis
    (exact: heads never interact, and a KV head's G query heads stay together), instead of once per sequence; then
    reassembles the packed outputs. tok / cmp: token-axis / compressed-axis tensors (None passes through);
    fn(*tok, *cmp) -> tensor | tuple; heads: head count of each output. None when nothing would be merged."""
    groups = _length_groups(cu_seqlens, l, d)
    if groups is None:
        return None
    parts = []
    for ti, ci in groups:
        res = fn(*[None if x is None else _to_group(x, ti) for x in tok],
                 *[None if x is None else _to_group(x, ci) for x in cmp])
        parts.append((res if isinstance(res, tuple) else (res,), ti))
    order = torch.argsort(torch.cat([ti.reshape(-1) for _, ti in parts]))
    outs = []
    for k, H in enumerate(heads):
        ys = []
        for res, ti in parts:
            y = res[k][0]
            m, L = ti.shape
            ys.append(y.reshape(L, m, H, *y.shape[2:]).transpose(0, 1).reshape(m * L, H, *y.shape[2:]))
        outs.append(torch.cat(ys)[order].unsqueeze(0))
    return outs[0] if len(outs) == 1 else tuple(outs)


# ============================================================================================ public functions
def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None, cu_seqlens=None):
    """Attention over compressed tokens (Eq. 7). Returns (o [B,T,HQ,Dv], lse [B,T,HQ] fp32/fp64)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None and _use_groups(q, cu_seqlens):
        res = _grouped(cu_seqlens, block_size, stride, lambda q_, kc, vc: compressed_attention(
            q_, kc, vc, block_size=block_size, stride=stride, scale=scale), (q,), (k_cmp, v_cmp), (q.shape[2],) * 2)
        if res is not None:
            return res
    if _needs_grad(q, k_cmp, v_cmp):
        return _BranchFn.apply("cmp", q, k_cmp, v_cmp, None, (block_size, stride), scale, cu_seqlens)
    q, k_cmp, v_cmp = _contig(q, k_cmp, v_cmp)
    o, saved = _forward(q, (k_cmp, v_cmp), None, None, None, _branch_geom("cmp", (block_size, stride), scale,
                                                                             cu_seqlens), False)
    return o, saved["lse_cmp"]


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None):
    """Indices [B, T, HKV, n] of the selected blocks of every query (Eq. 8-11), ascending, -1 padded."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None and _use_groups(q, cu_seqlens):
        res = _grouped(cu_seqlens, config.cmp_block_size, config.cmp_stride,
                       lambda q_, kc: select_blocks(q_, kc, config=config, scale=scale), (q,), (k_cmp,),
                       (k_cmp.shape[2],))
        if res is not None:
            return res
    q, k_cmp = _contig(q.detach(), k_cmp.detach())
    B, T, HQ, Dk = q.shape
    HKV = k_cmp.shape[2]
    acc = _acc_dtype(q.dtype)
    cfg = config
    l, d, lp = cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size
    out = torch.full((B, T, HKV, cfg.num_selected), -1, dtype=torch.long, device=q.device)
    W = _overlap_weights(cfg, acc, q.device)
    r = lp // d
    fused = _fused_kernels(q, acc)
    with torch.no_grad(), _threads_for(q) as workers, _no_autocast(q):
        for b, s, e, cs, ce in _cmp_spans(B, T, cu_seqlens, l, d):
            L = e - s
            if L == 0:
                continue
            kc, _ = _prep_cmp(k_cmp[b, cs:ce].to(acc), None, r, acc)
            km_c = torch.linalg.vector_norm(kc, dim=-1).amax(-1)

            def one_chunk(a, c1, b=b, s=s, e=e, Tc=ce - cs, kc=kc, km_c=km_c):
                qflat = _scaled_q(q[b, s:e], a, c1, HKV, scale, acc)
                sf = _shift_free(_qnorm(qflat, HKV, Dk), km_c)
                if fused is not None:  # the cmp kernel with no values (Dv = 0): scores and top-n only
                    out[b, s + a:s + c1] = fused.cmp_fwd(qflat, kc, kc.new_empty(HKV, kc.shape[1], 0), W, c1 - a, a, l,
                                                         d, Tc, cfg.num_selected, cfg.num_init_blocks,
                                                         cfg.num_local_blocks, sf)[2]
                    return
                _, _, blk = _cmp_forward_chunk(qflat, kc, None, a, c1 - a, l, d, Tc, (W, r, lp, (c1 - 1) // lp + 1),
                                               sf)
                out[b, s + a:s + c1] = _topn(blk, a, cfg)

            _run_chunks(lambda group: [one_chunk(a, c1) for a, c1 in group], _chunks(L), workers)
    return out


def selected_attention(q, k, v, indices, *, block_size, scale=None, cu_seqlens=None, return_lse=False):
    """Attention over the raw tokens of the selected blocks (Eq. 12). Returns o [B, T, HQ, Dv] (and lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None and _use_groups(q, cu_seqlens):
        res = _grouped(cu_seqlens, None, None, lambda q_, k_, v_, i_: selected_attention(
            q_, k_, v_, i_, block_size=block_size, scale=scale, return_lse=True), (q, k, v, indices), (),
            (q.shape[2],) * 2)
        if res is not None:
            return res if return_lse else res[0]
    return _single_branch("slc", q, k, v, indices, (block_size,), scale, cu_seqlens, return_lse)


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, return_lse=False):
    """Attention over keys in [t - w + 1, t] of the query's own sequence. Returns o [B, T, HQ, Dv] (and lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None and _use_groups(q, cu_seqlens):
        res = _grouped(cu_seqlens, None, None, lambda q_, k_, v_: sliding_window_attention(
            q_, k_, v_, window=window, scale=scale, return_lse=True), (q, k, v), (), (q.shape[2],) * 2)
        if res is not None:
            return res if return_lse else res[0]
    return _single_branch("win", q, k, v, None, (window,), scale, cu_seqlens, return_lse)


def _single_branch(branch, q, k, v, indices, geometry, scale, cu_seqlens, return_lse):
    """o (and lse) of the "slc" or "win" branch alone, through the autograd Function when a gradient is needed."""
    if _needs_grad(q, k, v):
        o, lse = _BranchFn.apply(branch, q, k, v, indices, geometry, scale, cu_seqlens)
    else:
        q, k, v = _contig(q, k, v)
        kv = (k, v, indices) if branch == "slc" else (k, v)
        o, saved = _forward(q, None, kv if branch == "slc" else None, kv if branch == "win" else None, None,
                            _branch_geom(branch, geometry, scale, cu_seqlens), False)
        lse = saved["lse_" + branch]
    return (o, lse) if return_lse else o


def native_sparse_attention(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None
):
    """NSA output o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win (Eq. 5), fused per query chunk.

    Selection runs under no_grad inside the chunk loop unless `block_indices` [B, T, HKV, n] is given.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # short sequences without the compiled kernels (float64, or no compiler): masked SDPA per length bucket (not
    # for an empty batch or one without compressed tokens: the chunked path gives those their empty gradients)
    if (torch_dense.applicable(q.shape[1], cu_seqlens, config) and _fused_kernels(q, _acc_dtype(q.dtype)) is None
            and q.shape[0] > 0 and k_cmp.shape[1] > 0):
        return torch_dense.native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config=config,
                                                   scale=scale, cu_seqlens=cu_seqlens, block_indices=block_indices)
    if cu_seqlens is not None and _use_groups(q, cu_seqlens):
        res = _grouped(cu_seqlens, config.cmp_block_size, config.cmp_stride,
                       lambda q_, ks, vs, kw, vw, g_, bi, kc, vc: native_sparse_attention(
                           q_, kc, vc, ks, vs, kw, vw, g_, config=config, scale=scale, block_indices=bi),
                       (q, k_slc, v_slc, k_win, v_win, gates, block_indices), (k_cmp, v_cmp), (q.shape[2],))
        if res is not None:
            return res
    xs = _contig(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if _needs_grad(*xs):
        return _NSAFn.apply(*xs, block_indices, config, scale, cu_seqlens)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = xs
    return _forward(q, (k_cmp, v_cmp), (k_slc, v_slc, block_indices), (k_win, v_win), gates,
                    _nsa_geom(config, scale, cu_seqlens), False)[0]


def native_sparse_attention_tail(q_tail, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates_tail, *, config, scale=None):
    """NSA forward (no grad) for the last Tq queries of a length-T context, e.g. one decoding step (Tq = 1).

    q_tail [B, Tq, HQ, Dk] and gates_tail [B, Tq, HQ, 3] belong to positions T - Tq .. T - 1; k_cmp/v_cmp
    [B, Tc(T), HKV, D] and k/v [B, T, HKV, D] cover the whole context. Returns o [B, Tq, HQ, Dv].
    """
    scale = q_tail.shape[-1] ** -0.5 if scale is None else scale
    T, Tq = k_slc.shape[1], q_tail.shape[1]
    if not 0 < Tq <= T:
        raise ValueError(f"q_tail length {Tq} must be in [1, T={T}]")
    if Tq <= TAIL_DECODE_MAX:  # a few queries: gathering each query's keys beats planning shared-block tiles
        from .decode import torch_decode
        lengths = torch.full((q_tail.shape[0],), T, dtype=torch.long, device=q_tail.device)
        with torch.no_grad():
            return torch_decode(q_tail, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates_tail, lengths=lengths,
                                config=config, scale=scale, max_len=T, min_len=T)
    geom = _Geom(scale, None, l=config.cmp_block_size, d=config.cmp_stride, cfg=config,
                 window=config.window_size, slc_block=config.slc_block_size, q_offset=T - Tq)
    xs = _contig(q_tail, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates_tail)
    with torch.no_grad():
        return _forward(xs[0], (xs[1], xs[2]), (xs[3], xs[4], None), (xs[5], xs[6]), xs[7], geom, False)[0]


# ============================================================================================ split forward/backward
RESIDUALS = ("o_cmp", "lse_cmp", "o_slc", "lse_slc", "o_win", "lse_win", "idx")


def residual_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """dtypes of the per-branch outputs and lse among `native_sparse_attention_fwd`'s residuals."""
    acc = _acc_dtype(dtype)
    return acc, acc


def _nsa_geom(config, scale, cu_seqlens):
    return _Geom(scale, cu_seqlens, l=config.cmp_block_size, d=config.cmp_stride, cfg=config,
                 window=config.window_size, slc_block=config.slc_block_size)


def native_sparse_attention_fwd(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None
):
    """`native_sparse_attention` as a forward that returns what its backward needs: (o [B,T,HQ,Dv], residuals)
    with residuals the per-branch o [B,T,HQ,Dv] and lse [B,T,HQ] (`residual_dtypes`) and the int64 indices
    [B,T,HKV,n] (`RESIDUALS` order). The torch.compile path (`nsa.ops.library`) runs the op as this pair; it always
    takes the chunked path (not the masked-SDPA or length-grouped shortcuts of the autograd entry point)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    xs = _contig(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = xs
    out, saved = _forward(q, (k_cmp, v_cmp), (k_slc, v_slc, block_indices), (k_win, v_win), gates,
                          _nsa_geom(config, scale, cu_seqlens), True)
    return out, tuple(saved[k] for k in RESIDUALS)


def native_sparse_attention_bwd(
    do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, *, config, scale=None, cu_seqlens=None
):
    """Gradients (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dgates) of `native_sparse_attention_fwd`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    xs = _contig(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = xs
    saved = dict(zip(RESIDUALS, residuals))
    dq, dcmp, dslc, dwin, dg = _backward(q, (k_cmp, v_cmp), (k_slc, v_slc, saved["idx"]), (k_win, v_win), gates,
                                         _nsa_geom(config, scale, cu_seqlens), saved, do.contiguous())
    return tuple(_cast(g, x) for g, x in zip((dq, *dcmp, *dslc, *dwin, dg), xs))


BRANCHES = ("cmp", "slc", "win")


def _branch_geom(branch, geometry, scale, cu_seqlens):
    if branch == "cmp":
        return _Geom(scale, cu_seqlens, l=geometry[0], d=geometry[1])
    if branch == "slc":
        return _Geom(scale, cu_seqlens, slc_block=geometry[0])
    return _Geom(scale, cu_seqlens, window=geometry[0])


def _branch_kv(branch, k, v, indices):
    """`_forward`'s (cmp, slc, win) arguments for one branch."""
    return (((k, v), None, None) if branch == "cmp" else (None, (k, v, indices), None) if branch == "slc"
            else (None, None, (k, v)))


def branch_fwd(branch, q, k, v, indices=None, *, geometry, scale=None, cu_seqlens=None):
    """One branch op ("cmp" | "slc" | "win") as a forward returning what its backward needs: (o [B,T,HQ,Dv],
    lse [B,T,HQ]), both in `residual_dtypes`. geometry: (l, d), (l',) or (w,); indices [B,T,HKV,n] for "slc"."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _contig(q, k, v)
    _, saved = _forward(q, *_branch_kv(branch, k, v, indices), None, _branch_geom(branch, geometry, scale, cu_seqlens),
                        True)
    return saved["o_" + branch], saved["lse_" + branch]


def branch_bwd(branch, do, dlse, q, k, v, o, lse, indices=None, *, geometry, scale=None, cu_seqlens=None):
    """(dq, dk, dv) of `branch_fwd` for the gradients of o (do) and of lse (dlse; None: zero)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _contig(q, k, v)
    saved = {"o_" + branch: o, "lse_" + branch: lse}
    if branch == "slc":
        saved["idx"] = indices.long()
    if dlse is not None:
        dlse = dlse.masked_fill(torch.isinf(lse), 0.0)
    dq, dcmp, dslc, dwin, _ = _backward(q, *_branch_kv(branch, k, v, saved.get("idx")), None,
                                        _branch_geom(branch, geometry, scale, cu_seqlens), saved, do, dlse)
    dk, dv = {"cmp": dcmp, "slc": dslc, "win": dwin}[branch]
    return _cast(dq, q), _cast(dk, k), _cast(dv, v)
