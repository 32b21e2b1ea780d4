"""NSA attention for queries that are the LAST Tq positions of sequences whose earlier K/V are cached.

Used by decoding (Tq = 1) and chunked prefill (Tq > 1). Two implementations with one signature:
`reference_decode` (per sequence, per query, explicit key lists: written to be read) and `torch_decode`
(vectorised over batch, queries and heads, gathers only the keys a query reads; on the CPU, float32, bfloat16
and float16 caches run as one compiled call, `cpu_kernels.decode_fwd`, that reads them in place). Both follow
docs/spec.md exactly.

Inputs (B sequences; sequence b has `lengths[b]` tokens *including* the Tq new ones, so its queries sit at
positions lengths[b] - Tq + j, j < Tq):
  q       [B, Tq, HQ, Dk]            rotated queries
  k_cmp   [B, Sc, HKV, Dk], v_cmp    compressed tokens 0..Sc-1 (only Tc(lengths[b]) are meaningful; the Eq. 7
                                     visibility rule i*d + l - 1 <= t never reads the others)
  k_slc   [B, S, HKV, Dk],  v_slc    selection K/V, slot p = position p, S >= max(lengths)
  k_win   [B, W, HKV, Dk],  v_win    window K/V, slot s = position win_start[b] + s (win_start may be negative;
                                     None means 0, i.e. the window tensor is indexed by position like k_slc)
  gates   [B, Tq, HQ, 3]             (cmp, slc, win), already in [0, 1]
Returns o [B, Tq, HQ, Dv] in q's dtype. Cached tensors may have another dtype than q: the reference and torch
decodes compute in float32 (float64 when q is float64); the Triton decode accumulates in float32 but runs its dot
products in the caches' dtype (q and the probabilities are cast to it).
"""
from __future__ import annotations

import math

import torch

from ..config import NSAConfig, bounded_window, check_int, num_compressed_tokens
from .reference import cmp_to_slc_weights

_NEG_INF = float("-inf")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_positions(lengths: torch.Tensor, tq: int) -> torch.Tensor:
    """[B, Tq] int64 positions of the last Tq tokens of each sequence."""
    return lengths.to(torch.long)[:, None] - tq + torch.arange(tq, device=lengths.device)


# ------------------------------------------------------------------------------------------------ reference
def _attend(q, k, v, scale):
    """q [HQ, D] against one key list k [S, HKV, D] (GQA); returns o [HQ, Dv] (0 when S = 0) and p [HQ, S]."""
    group = q.shape[0] // k.shape[1]
    if k.shape[0] == 0:
        return q.new_zeros(q.shape[0], v.shape[-1]), q.new_zeros(q.shape[0], 0)
    kk = k.repeat_interleave(group, dim=1)  # [S, HQ, D]
    vv = v.repeat_interleave(group, dim=1)
    p = torch.softmax(torch.einsum("hd,shd->hs", q, kk) * scale, dim=-1)
    return torch.einsum("hs,shd->hd", p, vv), p


def _reference_topn(scores: torch.Tensor, t: int, config: NSAConfig) -> list[int]:
    """Eq. 11 for one query at position t and one KV head: scores [nb] over blocks 0..t//l'."""
    own = t // config.slc_block_size
    forced = [j for j in range(own + 1) if j < config.num_init_blocks or j > own - config.num_local_blocks]
    others = [j for j in range(own + 1) if j not in forced]
    scores = scores.detach().tolist()
    others.sort(key=lambda j: (-scores[j], j))  # highest score first, ties -> lower block index
    return sorted(forced + others[: max(0, config.num_selected - len(forced))])[: config.num_selected]


def reference_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, lengths, config, scale=None,
                     win_start=None, return_indices=False, max_len=None):
    """Readable decode: every query of every sequence on its own, with explicit key lists (Eq. 5, 7-12)."""
    B, Tq, HQ, Dk = q.shape
    HKV, group = k_slc.shape[2], HQ // k_slc.shape[2]
    acc = _acc(q.dtype)
    scale = Dk ** -0.5 if scale is None else scale
    l, d, lp, w = config.cmp_block_size, config.cmp_stride, config.slc_block_size, config.window_size
    o = q.new_zeros(B, Tq, HQ, v_slc.shape[-1])
    chosen_all = torch.full((B, Tq, HKV, config.num_selected), -1, dtype=torch.long, device=q.device)
    for b in range(B):
        L = int(lengths[b])
        ws = 0 if win_start is None else int(win_start[b])
        for j in range(Tq):
            t = L - Tq + j
            qt = q[b, j].to(acc)
            # compression branch: compressed tokens whose block ends at or before t (Eq. 7)
            nc = num_compressed_tokens(t + 1, l, d)
            o_cmp, p = _attend(qt, k_cmp[b, :nc].to(acc), v_cmp[b, :nc].to(acc), scale)
            # selection scores: Eq. 9 overlap remap, Eq. 10 sum over the group's heads
            nb = t // lp + 1
            slc = p @ cmp_to_slc_weights(nc, nb, config, q.device, acc)  # [HQ, nb]
            slc = slc.view(HKV, group, nb).sum(1)
            o_slc = torch.zeros(HQ, v_slc.shape[-1], dtype=acc, device=q.device)
            for h in range(HKV):
                blocks = _reference_topn(slc[h], t, config)
                chosen_all[b, j, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
                keys = [s for blk in blocks for s in range(blk * lp, min((blk + 1) * lp, t + 1))]  # Eq. 12, causal
                heads = slice(h * group, (h + 1) * group)
                o_slc[heads], _ = _attend(qt[heads], k_slc[b, keys, h : h + 1].to(acc),
                                          v_slc[b, keys, h : h + 1].to(acc), scale)
            # sliding window: positions t-w+1 .. t
            slots = [s - ws for s in range(max(0, t - w + 1), t + 1)]
            o_win, _ = _attend(qt, k_win[b, slots].to(acc), v_win[b, slots].to(acc), scale)
            g = gates[b, j].to(acc)
            out = g[:, 0:1] * o_cmp + g[:, 1:2] * o_slc + g[:, 2:3] * o_win
            o[b, j] = out.to(o.dtype)
    return (o, chosen_all) if return_indices else o


def _gather_rows(x, b, t, h):
    """x[b, t, h] for index tensors b, t, h (broadcast together) -> [*shape, D].

    When each (b, t, h) row of x is a contiguous run of D elements on a regular grid (any contiguous x, or a
    slice of a preallocated cache along dim 1), the rows are read with one index_select over a [rows, D] view of
    x's memory: a row copy each, several times faster on CPU than the element-wise advanced-indexing kernel."""
    B, S, H, D = x.shape
    sb, st, sh, sd = x.stride()
    if sd == 1 and sh == D and st == H * D and sb % D == 0 and x.numel() > 0:
        nrows = (B - 1) * (sb // D) + S * H
        flat = x.as_strided((nrows, D), (D, 1))
        rows = (b * (sb // D) + t * H + h)
        return flat.index_select(0, rows.reshape(-1)).view(*rows.shape, D)
    return x[b, t, h]


# ------------------------------------------------------------------------------------------------ fast torch
def overlap_scatter(num_cmp: int, config: NSAConfig, device=None, dtype=torch.float32):
    """Eq. 9 as a scatter: compressed block i overlaps selection blocks j0(i) and j1(i) (j1 = j0 or j0 + 1, since
    l <= l' and d | l') with weights |block_i ∩ block_j| / d. Returns (j0, w0, j1, w1), each [num_cmp]."""
    l, d, lp = config.cmp_block_size, config.cmp_stride, config.slc_block_size
    start = torch.arange(num_cmp, device=device) * d
    j0 = start // lp
    j1 = (start + l - 1) // lp
    w0 = (torch.minimum(start + l, (j0 + 1) * lp) - start).to(dtype) / d
    w1 = torch.where(j1 > j0, (start + l - j1 * lp).to(dtype) / d, torch.zeros((), dtype=dtype, device=device))
    return j0, w0, j1, w1


def _masked_softmax(s, mask):
    """softmax over the last axis of scores s under mask (rows with no key -> 0)."""
    if s.shape[-1] == 0:
        return s
    s = s.masked_fill(~mask, _NEG_INF)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _masked_softmax_av(s, mask, v, contract):
    """softmax over the last axis of scores s under mask (rows with no key -> 0), then probabilities @ v."""
    p = _masked_softmax(s, mask)
    return torch.einsum(contract, p, v), p


def topn_from_scores(scores, pos, config, *, valid_blocks=None):
    """Eq. 11 with forced blocks: scores [..., Nb] for queries at positions pos [...] -> indices [..., n]
    (ascending, -1 padded), exactly `reference.topn_blocks` for one query per row."""
    n, lp = config.num_selected, config.slc_block_size
    Nb = scores.shape[-1]
    j = torch.arange(Nb, device=scores.device)
    own = (pos // lp)[..., None]
    valid = j <= own
    forced = (j < config.num_init_blocks) | (j > own - config.num_local_blocks)
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~valid, _NEG_INF)
    if Nb < n:
        ranked = torch.nn.functional.pad(ranked, (0, n - Nb), value=_NEG_INF)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n]  # ties -> lower j
    chosen = torch.gather(ranked, -1, order) > _NEG_INF
    big = torch.iinfo(torch.long).max
    idx = torch.where(chosen, order, big).sort(dim=-1).values
    return idx.masked_fill(idx == big, -1)


def _torch_decode_chunk(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, pos, win_start, config, scale,
                       max_len, min_pos=-1):
    """One chunk of queries at positions pos [B, Tq] (host bounds: max_len > every position >= min_pos); see module
    docstring. Returns (o, indices)."""
    B, Tq, HQ, Dk = q.shape
    HKV = k_slc.shape[2]
    G = HQ // HKV
    acc = _acc(q.dtype)
    dev = q.device
    l, d, lp, w = config.cmp_block_size, config.cmp_stride, config.slc_block_size, config.window_size
    qg = q.to(acc).view(B, Tq, HKV, G, Dk) * scale
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    hidx = torch.arange(HKV, device=dev)[None, None, :, None]

    # compression branch over the compressed tokens of the longest row, masked by Eq. 7 visibility. Slots a query
    # does not see may hold anything (a caller's cache past the row's length, a later query's NaN), and 0 * NaN
    # would leak into its o: past the tokens every query of the chunk sees (c0), each query reads its own masked
    # copy of the values (at most (Tq - 1)/d + 1 tokens per row, plus the longest row's excess).
    Sc = min(k_cmp.shape[1], num_compressed_tokens(max_len, l, d))
    k_c, v_c = k_cmp[:, :Sc].to(acc), v_cmp[:, :Sc].to(acc)
    vis = (torch.arange(Sc, device=dev) * d + l - 1)[None, None, :] <= pos[:, :, None]  # [B, Tq, Sc]
    c0 = min(Sc, num_compressed_tokens(min_pos + 1, l, d))
    s = torch.einsum("btkgd,bskd->btkgs", qg, k_c)
    p = _masked_softmax(s, vis[:, :, None, None, :])
    o_cmp = torch.einsum("btkgs,bskd->btkgd", p[..., :c0], v_c[:, :c0])
    if c0 < Sc:
        v_own = torch.where(vis[:, :, c0:, None, None], v_c[:, None, c0:], 0.0)  # [B, Tq, Sc - c0, HKV, Dv]
        o_cmp = o_cmp + torch.einsum("btkgs,btskd->btkgd", p[..., c0:], v_own)

    # selection scores (Eq. 8-10): group-sum p, then scatter onto selection blocks with the overlap weights
    Nb = max(1, math.ceil(max_len / lp))  # blocks of the longest sequence
    pk = p.sum(3)  # [B, Tq, HKV, Sc]
    j0, w0, j1, w1 = overlap_scatter(Sc, config, dev, acc)
    scores = torch.zeros(B, Tq, HKV, Nb + 1, dtype=acc, device=dev)  # +1: blocks past the last query's block
    shape = pk.shape
    scores.scatter_add_(-1, j0.clamp(max=Nb).expand(shape), pk * w0)
    scores.scatter_add_(-1, j1.clamp(max=Nb).expand(shape), pk * w1)
    idx = topn_from_scores(scores[..., :Nb], pos[:, :, None], config)  # [B, Tq, HKV, n]

    # selected attention (Eq. 12): gather the raw tokens of the chosen blocks, causal inside a block
    tok = idx[..., None] * lp + torch.arange(lp, device=dev)  # [B, Tq, HKV, n, l']
    ok = (idx[..., None] >= 0) & (tok <= pos[:, :, None, None, None])
    tok = torch.where(ok, tok, pos[:, :, None, None, None]).flatten(-2)  # masked keys read the query's own row
    ks = _gather_rows(k_slc, bidx, tok, hidx).to(acc)  # [B, Tq, HKV, N, Dk]
    vs = _gather_rows(v_slc, bidx, tok, hidx).to(acc)
    s = torch.einsum("btkgd,btknd->btkgn", qg, ks)
    o_slc, _ = _masked_softmax_av(s, ok.flatten(-2)[:, :, :, None, :], vs, "btkgn,btknd->btkgd")

    # sliding window: positions t-w+1 .. t, read at slot position - win_start
    wpos = pos[:, :, None] - w + 1 + torch.arange(w, device=dev)  # [B, Tq, w]
    slot = wpos - (0 if win_start is None else win_start.to(dev, torch.long)[:, None, None])
    okw = (wpos >= 0) & (slot >= 0) & (slot < k_win.shape[1])
    slot = torch.where(okw, slot, slot[..., -1:])[:, :, None, :].expand(B, Tq, HKV, w)  # masked: the own slot
    kw = _gather_rows(k_win, bidx, slot, hidx).to(acc)  # [B, Tq, HKV, w, Dk]
    vw = _gather_rows(v_win, bidx, slot, hidx).to(acc)
    s = torch.einsum("btkgd,btknd->btkgn", qg, kw)
    o_win, _ = _masked_softmax_av(s, okw[:, :, None, None, :], vw, "btkgn,btknd->btkgd")

    g = gates.to(acc).view(B, Tq, HKV, G, 3, 1)
    o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
    return o.reshape(B, Tq, HQ, -1).to(q.dtype), idx


USE_FUSED_DECODE = True  # CPU decode through the compiled kernel (`cpu_kernels.decode_fwd`) when it builds
_FUSED_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_INT_MAX = 2**31 - 1  # BLAS sizes and leading dimensions are C ints


def _cache_rows(x):
    """x as the compiled decode reads it: last dim contiguous, position stride >= head dim (else a fresh copy with
    the standard strides; `.contiguous()` keeps odd strides that torch calls contiguous, e.g. on size-1 dims)."""
    ok = (x.shape[-1] <= 1 or x.stride(-1) == 1) and (x.shape[1] <= 1 or x.stride(1) >= x.shape[-1])
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def _needs_grad(xs) -> bool:
    """Some input needs a gradient: only the differentiable torch path may run (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


_OVERLAP_W: dict = {}


def _cpu_overlap_weights(config):
    """The Eq. 9 weights `decode_fwd` takes ([l'/d, 2] float32 on the CPU), built once per geometry: a decode step
    is short, and rebuilding them took about a tenth of a small layer's step."""
    from .torch_backend import _overlap_weights

    key = (config.cmp_block_size, config.cmp_stride, config.slc_block_size)
    if key not in _OVERLAP_W:
        if len(_OVERLAP_W) >= 64:
            _OVERLAP_W.clear()
        with torch.inference_mode(False), torch.no_grad():
            _OVERLAP_W[key] = _overlap_weights(config, torch.float32, "cpu")
    return _OVERLAP_W[key]


def _fused_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, pos, win_start, config, scale):
    """The compiled CPU decode: every branch of every query row in one call, the caches read in place (no gathers)
    and converted to float32 on the way when they are bfloat16 / float16; float32 arithmetic, as the vectorised
    path. (o [B, Tq, HQ, Dv] in q's dtype, idx [B, Tq, HKV, n]), or None where it does not apply (another device,
    float64, caches of mixed dtypes, kernels disabled or not built): the vectorised torch path then runs."""
    xs = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if (not USE_FUSED_DECODE or q.device.type != "cpu" or q.dtype == torch.float64 or gates.dtype == torch.float64
            or k_slc.dtype not in _FUSED_CACHE_DTYPES or any(x.dtype != k_slc.dtype for x in xs[1:7])
            or _needs_grad(xs)):  # the kernel has no backward: the vectorised path is differentiable
        return None
    from . import cpu_kernels

    mod = cpu_kernels.load()
    caches = [_cache_rows(x) for x in xs[1:7]]
    if mod is None or any(max(x.shape[1], x.shape[3], x.stride(1) if x.shape[1] > 1 else 0) > _INT_MAX
                          for x in caches):
        return None
    B, Tq, HQ, Dk = q.shape
    HKV = k_slc.shape[2]
    G = HQ // HKV
    qs = (q.float() * scale).reshape(B * Tq, HKV, G, Dk).contiguous()
    gs = gates.float().reshape(B * Tq, HKV, G, 3).contiguous()
    rb = torch.arange(B) if Tq == 1 else torch.arange(B).repeat_interleave(Tq)
    ws = torch.zeros(B, dtype=torch.long) if win_start is None else win_start.to("cpu", torch.long).contiguous()
    o, idx = mod.decode_fwd(qs, gs, *caches, pos.reshape(-1).contiguous(), rb, ws,
                            _cpu_overlap_weights(config), config.cmp_block_size,
                            config.cmp_stride, config.num_selected, config.num_init_blocks, config.num_local_blocks,
                            config.window_size)
    return o.reshape(B, Tq, HQ, -1).to(q.dtype), idx.reshape(B, Tq, HKV, -1)


def torch_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, lengths, config, scale=None,
                 win_start=None, return_indices=False, max_len=None, min_len=None, query_chunk=32):
    """Vectorised decode (same contract as `reference_decode`); queries are processed `query_chunk` at a time so
    chunked prefill gathers at most query_chunk * (n*l' + w) keys per KV head at once. `max_len` / `min_len` (host
    ints, optional) are max(lengths) / min(lengths); passing max_len avoids a device synchronisation, min_len
    spares masking compressed slots every row's queries see."""
    B, Tq = q.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    max_len = int(lengths.max()) if max_len is None else int(max_len)
    if min_len is None and lengths.device.type == "cpu":  # free here (no device to wait for)
        min_len = int(lengths.min()) if lengths.numel() else 0
    pos = query_positions(lengths.to(q.device), Tq)
    fused = _fused_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, pos, win_start, config, scale)
    if fused is not None:
        return fused if return_indices else fused[0]
    outs, idxs = [], []
    for c in range(0, Tq, query_chunk):
        sl = slice(c, min(Tq, c + query_chunk))
        o, idx = _torch_decode_chunk(q[:, sl], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates[:, sl], pos[:, sl],
                                     win_start, config, scale, max_len,
                                     -1 if min_len is None else int(min_len) - Tq + sl.start)
        outs.append(o)
        idxs.append(idx)
    o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    if return_indices:
        n = config.num_selected
        idx = torch.cat([torch.nn.functional.pad(i, (0, n - i.shape[-1]), value=-1) for i in idxs], 1)
        return o, idx
    return o


IMPLS = {"reference": reference_decode, "torch": torch_decode}


def _check_window_cover(Tq, W, host_lengths, win_start, window):
    """The window tensor must hold every position the queries' windows read (slot = position - win_start[b]):
    a missing one would be read out of bounds by the kernels, or wrap around as a negative index."""
    L = host_lengths.long()
    ws = torch.zeros_like(L) if win_start is None else win_start.detach().cpu().long()
    first = (L - Tq - window + 1).clamp(min=0)  # the earliest position a window reads
    bad = (first - ws < 0) | (L - 1 - ws >= W)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"k_win/v_win ({W} slots from position win_start = {int(ws[b])}) must hold positions "
                         f"{int(first[b])}..{int(L[b]) - 1}, which row {b}'s window reads")


def decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, lengths, config, scale=None,
                     win_start=None, impl="torch", host_lengths=None, check_window=False, max_length=None):
    """Checked entry point: NSA output [B, Tq, HQ, Dv] for the last Tq positions of each cached sequence.

    impl: "reference" | "torch" | "triton" (the Triton decode kernels, any Tq; torch where they do not apply).
    Differentiable: when an input requires a gradient (grad mode on), the pure-PyTorch torch decode runs in place of
    the kernels (Triton, compiled CPU), which have no backward. The selected blocks get no gradient (Eq. 11).
    `host_lengths` (optional CPU copy of `lengths`) spares a device synchronisation. `check_window` also checks
    that the window tensors hold every position the windows read (reads win_start on the host).
    `max_length` (host int): see `_bounded_rows`; the values of lengths and win_start are then never read on the host
    (the reference implementation excepted: it loops over rows in Python), and the window cover is checked on the
    device instead of by `check_window`.
    """
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
    named = (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc), ("k_win", k_win),
             ("v_win", v_win), ("gates", gates))
    for name, x in named:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size {x.shape[0]} does not match q's {q.shape[0]}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    B, Tq, HQ, Dk = q.shape
    HKV = k_slc.shape[2]
    if HQ == 0 or HKV == 0 or HQ % HKV:
        raise ValueError(f"k_slc heads ({HKV}) must divide q heads ({HQ}), both positive")
    if Dk == 0 or v_slc.shape[3] == 0:
        raise ValueError(f"q and v_slc head dims must be positive, got {Dk} and {v_slc.shape[3]}")
    for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp), ("v_slc", v_slc), ("k_win", k_win), ("v_win", v_win)):
        if x.shape[2] != HKV:
            raise ValueError(f"{name} heads ({x.shape[2]}) must equal k_slc heads ({HKV})")
    for name, x in (("k_cmp", k_cmp), ("k_slc", k_slc), ("k_win", k_win)):
        if x.shape[3] != Dk:
            raise ValueError(f"{name} head dim ({x.shape[3]}) must equal q's ({Dk})")
    for name, x in (("v_cmp", v_cmp), ("v_win", v_win)):
        if x.shape[3] != v_slc.shape[3]:
            raise ValueError(f"{name} head dim ({x.shape[3]}) must equal v_slc's ({v_slc.shape[3]})")
    for kname, vname, k, v in (("k_cmp", "v_cmp", k_cmp, v_cmp), ("k_slc", "v_slc", k_slc, v_slc),
                               ("k_win", "v_win", k_win, v_win)):
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"{vname} length {v.shape[1]} does not match {kname}'s {k.shape[1]}")
    if win_start is not None and (not isinstance(win_start, torch.Tensor) or win_start.shape != (B,)
                                  or win_start.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"win_start must be None or a [B] = [{B}] int32/int64 tensor")
    if tuple(gates.shape) != (B, Tq, HQ, 3):
        raise ValueError(f"gates must be [B, Tq, HQ, 3] = {(B, Tq, HQ, 3)}, got {tuple(gates.shape)}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype not in (torch.int32,
                                                                                                torch.int64):
        raise ValueError(f"lengths must be a [B] = [{B}] int32/int64 tensor (narrower types wrap)")
    if host_lengths is not None:  # shape, dtype and device cost no synchronisation; values only on the CPU
        if not isinstance(host_lengths, torch.Tensor) or host_lengths.shape != (B,) or \
                host_lengths.dtype not in (torch.int32, torch.int64) or host_lengths.device.type != "cpu":
            raise ValueError(f"host_lengths must be None or a CPU [B] = [{B}] int32/int64 tensor (a copy of lengths)")
        if lengths.device.type == "cpu" and not torch.equal(host_lengths.long(), lengths.long()):
            raise ValueError(f"host_lengths {host_lengths.tolist()} must equal lengths {lengths.tolist()}")
    config = bounded_window(config, k_slc.shape[1])  # no row reads further back than k_slc holds
    valid = None
    if max_length is not None:
        hi = check_int("max_length", max_length, max(Tq, 1))
        lo = None
        W_need = Tq if win_start is not None else hi
        if hi > k_slc.shape[1] or k_win.shape[1] < W_need:
            raise ValueError(f"max_length {hi} needs k_slc to hold {hi} slots (got {k_slc.shape[1]}) and k_win "
                             f"{W_need} (got {k_win.shape[1]})")
        if host_lengths is not None:
            raise ValueError("host_lengths cannot be combined with max_length (which reads no lengths)")
    if B == 0 or Tq == 0:
        return q.new_zeros(B, Tq, HQ, v_slc.shape[3])
    if max_length is not None:
        lengths, win_start, valid = _bounded_rows(lengths, win_start, Tq, hi, k_win.shape[1], config.window_size)
    else:
        host = lengths.detach().cpu() if host_lengths is None else host_lengths
        lo, hi = int(host.min()), int(host.max())
        if lo < Tq or hi > k_slc.shape[1]:
            raise ValueError(f"lengths must lie in [Tq={Tq}, k_slc length {k_slc.shape[1]}], got [{lo}, {hi}]")
        if check_window:
            _check_window_cover(Tq, k_win.shape[1], host, win_start, config.window_size)
    need_c = num_compressed_tokens(hi, config.cmp_block_size, config.cmp_stride)
    if k_cmp.shape[1] < need_c or v_cmp.shape[1] < need_c:
        raise ValueError(f"k_cmp/v_cmp must hold at least {need_c} compressed tokens, got {k_cmp.shape[1]}")
    kw = dict(lengths=lengths, config=config, scale=scale, win_start=win_start, max_len=hi)
    if impl == "triton":
        try:
            from .triton_decode import triton_decode, triton_decode_supported
        except ImportError:  # Triton not installed: the torch decode
            impl = "torch"
        else:
            if triton_decode_supported(q, k_slc, v_slc) and not _needs_grad([x for _, x in named]):
                return _poison(triton_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, **kw), valid)
            impl = "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS) + ['triton']}, got {impl!r}")
    if impl == "torch":
        kw["min_len"] = lo
    return _poison(IMPLS[impl](q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, **kw), valid)


def _bounded_rows(lengths, win_start, Tq, max_length, W, window):
    """Decode sized by a host bound instead of the lengths' values, so nothing is read back from the device (a CUDA
    graph captured once with max_length = the cache capacity replays every later step while the lengths grow on
    the device). The kernels' work is sized by max_length; each row still attends over its own length. A row whose
    length lies outside [Tq, max_length], or whose window reads a slot outside k_win (win_start given), cannot be
    reported without a synchronisation: it is computed over safe stand-in lengths (nothing is read out of bounds) and
    comes out NaN. Returns (lengths, win_start, valid [B] bool) for the kernels."""
    lengths = lengths.long()  # int64: int32 arithmetic below could wrap (a far-off win_start) and pass a bad row
    valid = (lengths >= Tq) & (lengths <= max_length)
    if win_start is not None:
        win_start = win_start.to(lengths.device, torch.long)
        first = (lengths - Tq - window + 1).clamp(min=0)  # the earliest position a window reads
        valid &= (first >= win_start) & (lengths - 1 - win_start < W)
        win_start = torch.where(valid, win_start, 0)
    return torch.where(valid, lengths, Tq), win_start, valid


def _poison(o, valid):
    """NaN in the rows `_bounded_rows` found invalid (valid None: every row was checked on the host)."""
    return o if valid is None else o.masked_fill(~valid.to(o.device)[:, None, None, None], float("nan"))
