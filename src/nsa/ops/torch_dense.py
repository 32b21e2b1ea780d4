"""Short-sequence path of the "torch" backend: the composed NSA op as three masked SDPA calls per length bucket.

For short sequences (the training demo's 64-512 tokens) the chunked kernels of `torch_backend` spend most of their
time in Python and small-op overhead, once per sequence length of a packed batch. Here every sequence of a packed
batch is padded to a bucket length Lb (a multiple of BUCKET), sequences of one bucket run as one batch, and each
branch is masked `scaled_dot_product_attention` with an additive 0/-inf bias (ATen's fused CPU kernel, forward and
backward, with plain autograd): cmp in one call, slc in SLC_TILES causal query tiles, the window in one call over
unfolded WIN_TILE-query tiles. The masks are exactly the reference's:
- cmp (Eq. 7): query t sees compressed token i iff i*d + l - 1 <= t;
- slc (Eq. 11-12): key s is seen iff its block s // l' is among the query's selected blocks and s <= t;
- win: 0 <= t - s < w.
Padding sits at the end of a sequence, so causality alone hides it from every real query. Selection (Eq. 8-11) is
computed under no_grad from the explicit cmp probabilities of the bucket, as in the reference.

Memory is O(Lb^2) per (sequence, KV head): the path is taken only for sequences of at most `max_len(config)` tokens
(then Lb = O(n*l' + w), the chunked path's keys per query), and a bucket runs in sub-batches of at most
DENSE_MAX_ELEMS mask elements.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import cmp_to_slc_weights
from .varlen import compressed_cu_seqlens, host_offsets

DENSE_MAX_LEN = 1024  # longest sequence taken by this path (0 disables it)
DENSE_MAX_ELEMS = 1 << 25  # mask elements (sequences x query heads x Lb^2) per SDPA call
BUCKET = 32  # bucket lengths are multiples of this
SLC_TILES = 4  # query tiles of the slc branch (causal: tile i needs keys up to its end only)
WIN_TILE = 64  # queries per window tile


def max_len(config) -> int:
    """Longest sequence this path takes: DENSE_MAX_LEN, and at most 2 (n*l' + w) so that a query's mask row (Lb
    entries) stays within a constant factor of the keys the chunked path touches per query (n*l' + w + T/d)."""
    return min(DENSE_MAX_LEN, 2 * (config.num_selected * config.slc_block_size + config.window_size))


def applicable(T: int, cu_seqlens, config) -> bool:
    """True when every sequence is at most `max_len(config)` tokens long (T: the time axis)."""
    limit = max_len(config)
    if T <= limit or cu_seqlens is None:
        return 0 < T <= limit
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) <= limit


def _layout(cu_seqlens, l, d):
    """Padded layout of a packed batch: its non-empty sequences grouped into buckets of equal padded length Lb.

    Returns (buckets [(Lb, m)], tok [R], cmp [Rc], inv [N]): the packed row of every padded token row (bucket by
    bucket, sequence-major; padding repeats a clamped row), likewise for the compressed rows (Tcb per sequence),
    and the padded row of every packed token."""
    dev = cu_seqlens.device
    cu = host_offsets(cu_seqlens)
    ccu = host_offsets(compressed_cu_seqlens(cu_seqlens, l, d))
    groups: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b > a:
            groups.setdefault(-(-(b - a) // BUCKET) * BUCKET, []).append(i)
    buckets, tok, cmp, src, dst = [], [], [], [], []
    off = 0
    for Lb, ids in sorted(groups.items()):
        m, Tcb = len(ids), max(0, (Lb - l) // d + 1)
        starts = torch.tensor([cu[i] for i in ids], device=dev)[:, None]
        lens = torch.tensor([cu[i + 1] - cu[i] for i in ids], device=dev)[:, None]
        ar = torch.arange(Lb, device=dev)
        rows = starts + ar
        real = ar < lens
        tok.append(rows.clamp(max=cu[-1] - 1).view(-1))
        src.append(rows[real])
        dst.append((off + torch.arange(m * Lb, device=dev)).view(m, Lb)[real])
        cstart = torch.tensor([ccu[i] for i in ids], device=dev)[:, None]
        cmp.append((cstart + torch.arange(Tcb, device=dev)).clamp(max=max(ccu[-1] - 1, 0)).view(-1))
        buckets.append((Lb, m))
        off += m * Lb
    inv = torch.empty(cu[-1], dtype=torch.long, device=dev)
    inv[torch.cat(src)] = torch.cat(dst)
    return buckets, torch.cat(tok), torch.cat(cmp), inv


def _bias(mask, dtype):
    """Additive attention bias of a bool mask: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _sdpa(q, k, v, bias, seen, scale, tiles):
    """Masked attention of q [m, HQ, L, Dk] over k/v [m, HKV, S, D] -> [m, HQ, L, Dv].

    bias: additive float mask [m, HKV, L, S] (shared by the G query heads of a KV head) or [L, S]; every row must
    have a finite entry. The G heads of a KV head run as the head axis of one batch entry, so the bias broadcasts
    over them. tiles [(a, b, ka, kb)]: query rows [a, b) attend to keys [ka, kb), which must hold all their visible
    keys (causal tiles skip the masked upper triangle). seen: bool [m, HKV, L, 1] | [L, 1] | None (all True):
    rows marked False are multiplied by 0 (queries that see no key; their bias is opened on one key)."""
    m, HQ, L, Dk = q.shape
    HKV, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    if S == 0:
        return q.new_zeros(m, HQ, L, Dv)
    if bias.dim() == 4:  # fold the G heads into the head axis of their KV head's batch entry
        bias = bias.view(m * HKV, 1, L, S)
        q, k, v = q.reshape(m * HKV, G, L, Dk), k.reshape(m * HKV, 1, S, Dk), v.reshape(m * HKV, 1, S, Dv)
    outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb],
                                           attn_mask=bias[..., a:b, ka:kb], scale=scale, enable_gqa=G > 1)
            for a, b, ka, kb in tiles]
    o = (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).view(m, HQ, L, Dv)
    if seen is None:
        return o
    if seen.dim() == 4:
        seen = seen[:, :, None].expand(m, HKV, G, L, 1).reshape(m, HQ, L, 1)
    return o * seen.to(o.dtype)


def _causal_tiles(L, parts):
    """`parts` query tiles of a causal mask, each against the keys up to its last query."""
    step = max(1, -(-L // parts))
    return [(a, min(L, a + step), 0, min(L, a + step)) for a in range(0, L, step)]


def _window_sdpa(q, k, v, w, scale):
    """Sliding-window attention of q [m, HQ, L, Dk] over k/v [m, HKV, L, D] in one SDPA call: query tiles of
    WIN_TILE rows, each against the WIN_TILE + w - 1 keys its windows cover (unfolded, zero-padded in front)."""
    m, HQ, L, Dk = q.shape
    HKV, Dv = k.shape[1], v.shape[-1]
    G, Wq = HQ // HKV, min(WIN_TILE, L)
    nt = -(-L // Wq)
    K = Wq + w - 1
    if nt * Wq * K >= L * L:  # tiles would score more pairs than one pass over all keys
        causal = torch.arange(L, device=q.device)
        mask = (causal[None, :] <= causal[:, None]) & (causal[:, None] - causal[None, :] < w)
        return _sdpa(q, k, v, _bias(mask, q.dtype), None, scale, [(0, L, 0, L)])
    mh = m * HKV

    def tiles(x):  # [m, HKV, L, D] -> [mh * nt, 1, K, D]
        x = F.pad(x.reshape(mh, L, x.shape[-1]), (0, 0, w - 1, nt * Wq - L))
        return x.unfold(1, K, Wq).transpose(-1, -2).reshape(mh * nt, 1, K, x.shape[-1])

    qt = F.pad(q.reshape(mh, G, L, Dk), (0, 0, 0, nt * Wq - L)).view(mh, G, nt, Wq, Dk).transpose(1, 2)
    r = torch.arange(Wq, device=q.device)[:, None]
    j = torch.arange(K, device=q.device)[None, :]
    i = torch.arange(nt, device=q.device)[:, None, None]
    # query i*Wq + r sees key i*Wq - (w-1) + j iff 0 <= (w-1) + r - j < w and the key position is >= 0
    mask = (j <= r + (w - 1)) & (j >= r) & (i * Wq - (w - 1) + j >= 0)
    bias = _bias(mask, q.dtype)[None].expand(mh, nt, Wq, K).reshape(mh * nt, 1, Wq, K)
    o = F.scaled_dot_product_attention(qt.reshape(mh * nt, G, Wq, Dk), tiles(k), tiles(v), attn_mask=bias,
                                       scale=scale, enable_gqa=G > 1)
    return o.view(mh, nt, G, Wq, Dv).transpose(1, 2).reshape(m, HQ, nt * Wq, Dv)[:, :, :L]


def _select(q, kc, cmask, cfg, scale, Lb):
    """Selected blocks [m, HKV, Lb, n] of every query of a bucket (Eq. 8-11), without gradient."""
    from .torch_backend import _topn

    m, HQ, _, _ = q.shape
    HKV, Tcb = kc.shape[1], kc.shape[2]
    G = HQ // HKV
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nb = -(-Lb // cfg.slc_block_size)
    if Tcb:
        logits = torch.matmul(q.to(acc).reshape(m, HKV, G * Lb, -1), kc.to(acc).transpose(-1, -2)) * scale
        logits = logits.view(m, HKV, G, Lb, Tcb).masked_fill(~cmask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # Eq. 8; rows with no visible token -> 0
        w = cmp_to_slc_weights(Tcb, nb, cfg, q.device, acc)
        blk = (probs @ w).sum(2)  # Eq. 9, then Eq. 10 over the G heads: [m, HKV, Lb, nb]
    else:
        blk = torch.zeros(m, HKV, Lb, nb, dtype=acc, device=q.device)
    idx = _topn(blk.reshape(m * HKV, Lb, nb), 0, cfg)  # [Lb, m*HKV, n]
    return idx.view(Lb, m, HKV, -1).permute(1, 2, 0, 3)


def _bucket_forward(q, kc, vc, ks, vs, kw, vw, g, idx, cfg, scale):
    """One bucket, [m, Lb, H, D] inputs (kc/vc [m, Tcb, HKV, D]; idx [m, Lb, HKV, n] or None) -> o [m, Lb, HQ, Dv]."""
    m, Lb, HQ, _ = q.shape
    HKV = ks.shape[2]
    G = HQ // HKV
    dev = q.device
    l, d, lp = cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size
    qh, kch, vch, ksh, vsh, kwh, vwh = (x.transpose(1, 2) for x in (q, kc, vc, ks, vs, kw, vw))
    pos = torch.arange(Lb, device=dev)
    Tcb = kc.shape[1]
    with torch.no_grad():
        cmask = (torch.arange(Tcb, device=dev) * d + (l - 1))[None, :] <= pos[:, None]  # Eq. 7, [Lb, Tcb]
        cseen = (pos >= l - 1)[:, None]
        cbias = _bias(cmask | ((pos < l - 1)[:, None] & (torch.arange(Tcb, device=dev) == 0)), q.dtype)
        if idx is None:
            idx = _select(qh.detach(), kch.detach(), cmask, cfg, scale, Lb)
        else:
            idx = idx.transpose(1, 2).long()
        nb = -(-Lb // lp)
        idx = torch.where((idx < 0) | (idx >= nb), nb, idx)  # ignored -> a dummy block
        chosen = torch.zeros(m, HKV, Lb, nb + 1, dtype=torch.bool, device=dev).scatter_(-1, idx, True)
        own = (pos // lp)[:, None]
        sseen = (chosen & (torch.arange(nb + 1, device=dev) <= own)).any(-1, keepdim=True)  # a block at or before t
        chosen[..., :1] |= ~sseen  # rows seeing nothing: open key 0, output zeroed below
        causal = pos[None, :] <= pos[:, None]
        sbias = _bias(chosen[..., :nb], q.dtype)[..., None].expand(m, HKV, Lb, nb, lp).reshape(m, HKV, Lb, nb * lp)
        sbias = sbias[..., :Lb].add(_bias(causal, q.dtype))  # [m, HKV, Lb, Lb]
    o_cmp = _sdpa(qh, kch, vch, cbias, None if bool(cseen.all()) else cseen, scale, [(0, Lb, 0, Tcb)])
    o_slc = _sdpa(qh, ksh, vsh, sbias, None if bool(sseen.all()) else sseen, scale, _causal_tiles(Lb, SLC_TILES))
    o_win = _window_sdpa(qh, kwh, vwh, cfg.window_size, scale)
    gt = g.transpose(1, 2).to(o_cmp.dtype).unsqueeze(-1)  # [m, HQ, Lb, 3, 1]
    o = gt[..., 0, :] * o_cmp + gt[..., 1, :] * o_slc + gt[..., 2, :] * o_win  # Eq. 5
    return o.transpose(1, 2)


def _run_bucket(xs, cxs, idx, cfg, scale):
    """_bucket_forward in sub-batches of at most DENSE_MAX_ELEMS mask elements."""
    m, Lb, HQ = xs[0].shape[:3]
    step = max(1, DENSE_MAX_ELEMS // max(1, HQ * Lb * Lb))
    outs = []
    for a in range(0, m, step):
        sl = slice(a, a + step)
        q, ks, vs, kw, vw, g = (x[sl] for x in xs)
        kc, vc = (x[sl] for x in cxs)
        outs.append(_bucket_forward(q, kc, vc, ks, vs, kw, vw, g, None if idx is None else idx[sl], cfg, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale, cu_seqlens=None,
                            block_indices=None):
    """Same contract as `torch_backend.native_sparse_attention`; call only when `applicable`."""
    with torch.autocast(q.device.type, enabled=False):
        if cu_seqlens is None:
            return _run_bucket((q, k_slc, v_slc, k_win, v_win, gates), (k_cmp, v_cmp), block_indices, config,
                               scale)
        l, d = config.cmp_block_size, config.cmp_stride
        buckets, tok, cmp, inv = _layout(cu_seqlens, l, d)
        xs = [x[0].index_select(0, tok) for x in (q, k_slc, v_slc, k_win, v_win, gates)]
        cxs = [x[0].index_select(0, cmp) if x.shape[1] else x.new_zeros(cmp.numel(), *x.shape[2:])
               for x in (k_cmp, v_cmp)]
        idx = None if block_indices is None else block_indices[0].index_select(0, tok)
        outs, r, rc = [], 0, 0
        for Lb, m in buckets:
            Tcb = max(0, (Lb - l) // d + 1)
            part = [x[r:r + m * Lb].view(m, Lb, *x.shape[1:]) for x in xs]
            cpart = [x[rc:rc + m * Tcb].view(m, Tcb, *x.shape[1:]) for x in cxs]
            ipart = None if idx is None else idx[r:r + m * Lb].view(m, Lb, *idx.shape[1:])
            outs.append(_run_bucket(part, cpart, ipart, config, scale).reshape(m * Lb, *q.shape[2:3], -1))
            r, rc = r + m * Lb, rc + m * Tcb
        return torch.cat(outs).index_select(0, inv).unsqueeze(0)
