"""Sliding-window attention (§3.3.3) on the Triton flash kernels (MODE 0): our own kernel, no flash-attn."""
from __future__ import annotations

from .flash import default_scale, dense_masked_attention
from .utils import pack, seq_offsets


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None):
    """Query t attends to keys [t - window + 1, t] of its own sequence. q [B,T,HQ,Dk] -> o [B,T,HQ,Dv]."""
    B, T, HQ, _ = q.shape
    cu = seq_offsets(B, T, cu_seqlens, q.device)
    o, _ = dense_masked_attention(pack(q), pack(k), pack(v), cu, cu, mode=0, scale=default_scale(q, scale),
                                  window=window)
    return o.reshape(B, T, HQ, v.shape[-1])
