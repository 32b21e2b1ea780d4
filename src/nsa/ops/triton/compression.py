"""Compressed attention (Eq. 7 visibility) on the Triton flash kernels (MODE 1), returning o and lse."""
from __future__ import annotations

from .flash import default_scale, dense_masked_attention
from .utils import cmp_offsets, pack, seq_offsets


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None, cu_seqlens=None):
    """q [B,T,HQ,Dk] over k_cmp/v_cmp [B,Tc,HKV,Dk|Dv]. Returns (o [B,T,HQ,Dv], lse [B,T,HQ] fp32, -inf if none)."""
    B, T, HQ, _ = q.shape
    cu = seq_offsets(B, T, cu_seqlens, q.device)
    ccu = cmp_offsets(B, k_cmp.shape[1], cu_seqlens, block_size, stride, q.device)
    o, lse = dense_masked_attention(pack(q), pack(k_cmp), pack(v_cmp), cu, ccu, mode=1,
                                    scale=default_scale(q, scale), cmp_l=block_size, cmp_d=stride)
    return o.reshape(B, T, HQ, v_cmp.shape[-1]), lse.reshape(B, T, HQ)
