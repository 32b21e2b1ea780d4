"""Pure-PyTorch reference of every NSA branch (Yuan et al. 2025, arXiv 2502.11089).

Written to be read, not to be fast: each sequence is processed on its own with dense, explicitly masked score
matrices. Device-agnostic, float64-capable, no Triton. Every other backend is tested against this file.

Shapes: q [B, T, HQ, Dk]; k, v [B, T, HKV, Dk|Dv]; compressed k_cmp, v_cmp [B, Tc, HKV, Dk|Dv]. With `cu_seqlens`
(int [N+1], B = 1) the time axis packs N sequences, and k_cmp/v_cmp pack each sequence's compressed tokens in order.
Positions t are 0-based inside each sequence. Inputs are assumed valid: `nsa.ops.dispatch` checks them.
"""
from __future__ import annotations

import math

import torch

from ..config import NSAConfig, num_compressed_tokens
from .varlen import compressed_cu_seqlens, host_offsets, sequence_spans


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_attention(q, k, v, mask, scale):
    """Softmax attention of one sequence under an explicit mask (Eq. 1-2).

    q [T, HQ, Dk], k [S, HKV, Dk], v [S, HKV, Dv], mask bool broadcastable to [HQ, T, S].
    Returns o [T, HQ, Dv] (zero where a query sees no key) and lse [T, HQ] (-inf there).
    """
    acc = _acc_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    k = k.to(acc).repeat_interleave(group, dim=1)
    v = v.to(acc).repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.to(acc), k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a fully masked row
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    o = torch.einsum("hts,shd->thd", probs, v)
    return o, lse.transpose(0, 1)


def _connected(o, *inputs):
    """o, also part of the autograd graph of inputs that no sequence read (B = 0 or T = 0: every sum is an exact
    0), so gradients of an empty batch are zeros rather than missing."""
    if o.numel() == 0:
        o = o + sum(x.sum() for x in inputs if x.requires_grad) * 0
    return o


def _cmp_visible(seqlen: int, num_cmp: int, block_size: int, stride: int, device) -> torch.Tensor:
    """[T, Tc] bool: query t sees compressed token i iff i*d + l - 1 <= t (Eq. 7, 0-based)."""
    t = torch.arange(seqlen, device=device)[:, None]
    last_token = torch.arange(num_cmp, device=device)[None, :] * stride + block_size - 1
    return last_token <= t


def _cmp_spans(q, cu_seqlens, block_size, stride):
    """(b, start, end, cmp_start, cmp_end) for every sequence."""
    ccu = None if cu_seqlens is None else host_offsets(compressed_cu_seqlens(cu_seqlens, block_size, stride))
    for n, (b, start, end) in enumerate(sequence_spans(q.shape[0], q.shape[1], cu_seqlens)):
        if ccu is None:
            yield b, start, end, 0, num_compressed_tokens(end - start, block_size, stride)
        else:
            yield b, start, end, ccu[n], ccu[n + 1]


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None, cu_seqlens=None):
    """Attention over compressed tokens (Eq. 7 visibility). Returns (o [B,T,HQ,Dv], lse [B,T,HQ]).

    A query that sees no compressed token (t < l - 1) gets o = 0 and lse = -inf.
    lse is float32 (float64 for float64 inputs) and uses the natural log.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, HQ, _ = q.shape
    o = q.new_zeros(B, T, HQ, v_cmp.shape[-1])
    lse = torch.full((B, T, HQ), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
    for b, start, end, cs, ce in _cmp_spans(q, cu_seqlens, block_size, stride):
        mask = _cmp_visible(end - start, ce - cs, block_size, stride, q.device)
        o_s, lse_s = _masked_attention(q[b, start:end], k_cmp[b, cs:ce], v_cmp[b, cs:ce], mask, scale)
        o[b, start:end] = o_s.to(o.dtype)
        lse[b, start:end] = lse_s
    return _connected(o, q, k_cmp, v_cmp), lse


def cmp_to_slc_weights(num_cmp: int, num_slc: int, config: NSAConfig, device=None, dtype=torch.float32):
    """[Tc, Nslc] overlap matrix of Eq. 9: |cmp block i ∩ slc block j| / d.

    Compressed block i covers [i*d, i*d + l - 1], selection block j covers [j*l', (j+1)*l' - 1].
    For l=32, d=16, l'=64, selection block j gets weights 1,2,2,2,1 from compressed blocks 4j-1 .. 4j+3.
    """
    l, d, lp = config.cmp_block_size, config.cmp_stride, config.slc_block_size
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_slc, device=device)[None, :]
    lo = torch.maximum(i * d, j * lp)
    hi = torch.minimum(i * d + l, (j + 1) * lp)
    return ((hi - lo).clamp(min=0) / d).to(dtype)


def block_scores(q, k_cmp, *, config, scale=None, cu_seqlens=None):
    """Group-summed selection-block importance, [B, T, HKV, ceil(T/l')] (Eq. 8-10), before forcing/masking.

    Eq. 8: p = softmax(scale * q K_cmp^T) over the visible compressed tokens, per query head, in >= fp32.
    Eq. 9: remap to selection blocks with the overlap weights. Eq. 10: sum over the G heads of a KV group.
    With cu_seqlens, block j of a sequence is relative to that sequence's start; blocks past its end score 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, HQ, _ = q.shape
    HKV = k_cmp.shape[2]
    acc = _acc_dtype(q.dtype)
    num_slc = config.num_slc_blocks(T)
    out = torch.zeros(B, T, HKV, num_slc, dtype=acc, device=q.device)
    l, d = config.cmp_block_size, config.cmp_stride
    for b, start, end, cs, ce in _cmp_spans(q, cu_seqlens, l, d):
        L, Tc = end - start, ce - cs
        mask = _cmp_visible(L, Tc, l, d, q.device)
        kk = k_cmp[b, cs:ce].to(acc).repeat_interleave(HQ // HKV, dim=1)
        logits = torch.einsum("thd,shd->hts", q[b, start:end].to(acc), kk) * scale
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no visible token -> 0
        nb = config.num_slc_blocks(L)
        slc = probs @ cmp_to_slc_weights(Tc, nb, config, q.device, acc)  # [HQ, L, nb]      (Eq. 9)
        slc = slc.view(HKV, HQ // HKV, L, nb).sum(1)  # [HKV, L, nb]                          (Eq. 10)
        out[b, start:end, :, :nb] = slc.permute(1, 0, 2)
    return out


def topn_blocks(scores, *, config, cu_seqlens=None):
    """Top-n selection (Eq. 11) with forced blocks, from group-summed scores [B, T, HKV, Nb].

    Forced: blocks 0..init-1 and the local blocks floor(t/l') - k, k < num_local (when >= 0).
    Blocks after floor(t/l') are never chosen. Ties go to the lower block index.
    Returns int64 [B, T, HKV, n]: chosen blocks ascending, then -1 padding when fewer than n are valid.
    """
    from .varlen import token_positions

    B, T, HKV, Nb = scores.shape
    n = config.num_selected
    t = token_positions(T, cu_seqlens, scores.device)[None, :, None, None]
    j = torch.arange(Nb, device=scores.device)
    own = t // config.slc_block_size
    valid = j <= own
    forced = (j < config.num_init_blocks) | (j > own - config.num_local_blocks)
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    if Nb < n:
        ranked = torch.nn.functional.pad(ranked, (0, n - Nb), value=float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n]  # stable: ties -> lower j
    chosen = torch.gather(ranked, -1, order) > float("-inf")
    big = torch.iinfo(torch.long).max
    idx = torch.where(chosen, order, big).sort(dim=-1).values
    return idx.masked_fill(idx == big, -1)


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None):
    """Indices [B, T, HKV, n] of the selected blocks of every query (Eq. 8-11); see `topn_blocks`."""
    with torch.no_grad():
        scores = block_scores(q, k_cmp, config=config, scale=scale, cu_seqlens=cu_seqlens)
        return topn_blocks(scores, config=config, cu_seqlens=cu_seqlens)


def selected_attention(q, k, v, indices, *, block_size, scale=None, cu_seqlens=None, return_lse=False):
    """Attention over the raw tokens of the selected blocks (Eq. 11-12). Returns o [B, T, HQ, Dv] (and lse
    [B, T, HQ] in >= fp32 with `return_lse`; -inf where a query sees no key).

    indices [B, T, HKV, n]: block j covers positions [j*l', (j+1)*l' - 1] of the query's sequence; -1 is ignored,
    a repeated index counts once, and keys after t are masked (token-level causality inside a block).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, HQ, _ = q.shape
    HKV = k.shape[2]
    o = q.new_zeros(B, T, HQ, v.shape[-1])
    lse = torch.full((B, T, HQ), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
    for b, start, end in sequence_spans(B, T, cu_seqlens):
        L = end - start
        nb = math.ceil(L / block_size)
        idx = indices[b, start:end].permute(1, 0, 2).long()  # [HKV, L, n]
        idx = torch.where((idx < 0) | (idx >= nb), nb, idx)  # ignored -> dummy block nb
        chosen = torch.zeros(HKV, L, nb + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, idx, True)
        key_block = torch.arange(L, device=q.device) // block_size
        pos = torch.arange(L, device=q.device)
        mask = chosen[:, :, key_block] & (pos[None, :] <= pos[:, None])  # [HKV, L, L]
        mask = mask.repeat_interleave(HQ // HKV, dim=0)
        o_s, lse_s = _masked_attention(q[b, start:end], k[b, start:end], v[b, start:end], mask, scale)
        o[b, start:end] = o_s.to(o.dtype)
        lse[b, start:end] = lse_s
    o = _connected(o, q, k, v)
    return (o, lse) if return_lse else o


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, return_lse=False):
    """Attention over keys in [t - w + 1, t] of the query's own sequence (§3.3.3). Returns o [B, T, HQ, Dv] (and
    lse [B, T, HQ] with `return_lse`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, HQ, _ = q.shape
    o = q.new_zeros(B, T, HQ, v.shape[-1])
    lse = torch.full((B, T, HQ), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
    for b, start, end in sequence_spans(B, T, cu_seqlens):
        pos = torch.arange(end - start, device=q.device)
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta < window)
        o_s, lse_s = _masked_attention(q[b, start:end], k[b, start:end], v[b, start:end], mask, scale)
        o[b, start:end] = o_s.to(o.dtype)
        lse[b, start:end] = lse_s
    o = _connected(o, q, k, v)
    return (o, lse) if return_lse else o


def native_sparse_attention(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None
):
    """NSA output o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win (Eq. 5), each branch normalised on its own.

    gates [B, T, HQ, 3] in (cmp, slc, win) order, already in [0, 1]. `block_indices` overrides the selection.
    No gradient flows through the choice of blocks.
    """
    o_cmp, _ = compressed_attention(
        q, k_cmp, v_cmp, block_size=config.cmp_block_size, stride=config.cmp_stride, scale=scale, cu_seqlens=cu_seqlens
    )
    if block_indices is None:
        block_indices = select_blocks(q.detach(), k_cmp.detach(), config=config, scale=scale, cu_seqlens=cu_seqlens)
    o_slc = selected_attention(
        q, k_slc, v_slc, block_indices, block_size=config.slc_block_size, scale=scale, cu_seqlens=cu_seqlens
    )
    o_win = sliding_window_attention(q, k_win, v_win, window=config.window_size, scale=scale, cu_seqlens=cu_seqlens)
    g = gates.to(o_cmp.dtype).unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
