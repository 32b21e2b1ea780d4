"""Triton backend: the functions of `nsa.ops.reference` with the same signatures, on Triton kernels.

Importing raises ImportError where Triton is missing. CUDA tensors run compiled kernels; CPU tensors run in the
Triton interpreter, which must be enabled (TRITON_INTERPRET=1) before Triton is first imported. float64 inputs
are delegated to the reference (the kernels accumulate in fp32).
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .. import reference as _reference
from .combine import combine_gates
from .compression import compressed_attention as _compressed_attention
from .flash import default_scale, dense_masked_attention
from .selection import selected_attention as _selected_attention
from .selection import selected_attention_packed
from .topk import select_blocks as _select_blocks
from .topk import topn_from_lse
from .utils import cmp_offsets, interpreting, pack, seq_offsets
from .window import sliding_window_attention as _sliding_window_attention

__all__ = [
    "compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention",
    "native_sparse_attention",
]


def _use_reference(q) -> bool:
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported; got q on "
            f"{q.device}"
        )
    return q.dtype == _reference.torch.float64


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None, cu_seqlens=None):
    """(o [B,T,HQ,Dv], lse [B,T,HQ]) of attention over compressed tokens (Eq. 7)."""
    fn = _reference.compressed_attention if _use_reference(q) else _compressed_attention
    return fn(q, k_cmp, v_cmp, block_size=block_size, stride=stride, scale=scale, cu_seqlens=cu_seqlens)


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None):
    """int64 [B,T,HKV,n] selected blocks (Eq. 8-11), ascending, -1 padded (online top-n kernel)."""
    fn = _reference.select_blocks if _use_reference(q) else _select_blocks
    return fn(q, k_cmp, config=config, scale=scale, cu_seqlens=cu_seqlens)


def selected_attention(q, k, v, indices, *, block_size, scale=None, cu_seqlens=None):
    """o [B,T,HQ,Dv] over the raw tokens of the selected blocks (Eq. 12)."""
    fn = _reference.selected_attention if _use_reference(q) else _selected_attention
    return fn(q, k, v, indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens)


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None):
    """o [B,T,HQ,Dv] over keys [t - window + 1, t] (§3.3.3)."""
    fn = _reference.sliding_window_attention if _use_reference(q) else _sliding_window_attention
    return fn(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens)


def native_sparse_attention(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None
):
    """o [B,T,HQ,Dv] = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win (Eq. 5).

    The selection reuses the cmp branch's lse (no second pass over the compressed keys); the gate combination
    and its backward are one fused kernel each. No gradient flows through the choice of blocks.
    """
    if _use_reference(q):
        return _reference.native_sparse_attention(
            q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config=config, scale=scale, cu_seqlens=cu_seqlens,
            block_indices=block_indices,
        )
    B, T, HQ, _ = q.shape
    Dv = v_slc.shape[-1]
    sc = default_scale(q, scale)
    l, d = config.cmp_block_size, config.cmp_stride
    cu = seq_offsets(B, T, cu_seqlens, q.device)
    ccu = cmp_offsets(B, k_cmp.shape[1], cu_seqlens, l, d, q.device)
    qp, kcp = pack(q), pack(k_cmp)
    o_cmp, lse = dense_masked_attention(qp, kcp, pack(v_cmp), cu, ccu, mode=1, scale=sc, cmp_l=l, cmp_d=d)
    if block_indices is None:
        with _reference.torch.no_grad():
            idx = topn_from_lse(qp.detach(), kcp.detach(), lse.detach(), cu, ccu, config=config, scale=sc)
    else:
        idx = block_indices.reshape(B * T, *block_indices.shape[2:])
    o_slc = selected_attention_packed(qp, pack(k_slc), pack(v_slc), idx, cu, block_size=config.slc_block_size,
                                      scale=sc)
    o_win, _ = dense_masked_attention(qp, pack(k_win), pack(v_win), cu, cu, mode=0, scale=sc,
                                      window=config.window_size)
    o = combine_gates(o_cmp, o_slc, o_win, gates.reshape(B * T, HQ, 3))
    return o.reshape(B, T, HQ, Dv)
