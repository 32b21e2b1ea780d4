"""Triton backend: the functions of `nsa.ops.reference` with the same signatures, on Triton kernels.

Importing raises ImportError where Triton is missing. CUDA tensors run compiled kernels; CPU tensors run in the
Triton interpreter, which must be enabled (TRITON_INTERPRET=1) before Triton is first imported. float64 inputs
are delegated to the reference (the kernels accumulate in fp32).
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .. import reference as _reference
from .. import torch_backend as _torch_backend
from .combine import combine_bwd, combine_fwd, combine_gates
from .compression import compressed_attention as _compressed_attention
from .flash import default_scale, dense_masked_attention, masked_attention_bwd, masked_attention_fwd
from .selection import SelectionPlan, selected_bwd, selected_fwd
from .selection import selected_attention as _selected_attention
from .selection import selected_attention_packed
from .topk import select_blocks as _select_blocks
from .topk import topn_from_lse
from .utils import cmp_offsets, interpreting, pack, seq_offsets
from .window import sliding_window_attention as _sliding_window_attention

__all__ = [
    "compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention",
    "native_sparse_attention", "native_sparse_attention_fwd", "native_sparse_attention_bwd", "residual_dtypes",
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


# ----------------------------------------------------------------------------------- split forward/backward
# The torch.compile path (`nsa.ops.library`) runs the composed op as a forward returning its residuals and a
# backward taking them, with the contract of the torch backend's pair (same names, RESIDUALS order).
RESIDUALS = _torch_backend.RESIDUALS


def residual_dtypes(dtype):
    """(per-branch o dtype, lse dtype) of `native_sparse_attention_fwd`'s residuals."""
    if dtype == _reference.torch.float64:
        return _torch_backend.residual_dtypes(dtype)
    return dtype, _reference.torch.float32


def _packed_geometry(q, k_cmp, config, cu_seqlens):
    B, T = q.shape[:2]
    cu = seq_offsets(B, T, cu_seqlens, q.device)
    ccu = cmp_offsets(B, k_cmp.shape[1], cu_seqlens, config.cmp_block_size, config.cmp_stride, q.device)
    return cu, ccu


def native_sparse_attention_fwd(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None
):
    """(o [B,T,HQ,Dv], residuals): the per-branch o [B,T,HQ,Dv] (q's dtype) and lse [B,T,HQ] (fp32), and the
    int64 indices [B,T,HKV,n]; float64 runs the torch backend's pair."""
    if _use_reference(q):
        return _torch_backend.native_sparse_attention_fwd(
            q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config=config, scale=scale, cu_seqlens=cu_seqlens,
            block_indices=block_indices)
    B, T, HQ, _ = q.shape
    HKV, Dv = k_slc.shape[2], v_slc.shape[-1]
    sc = default_scale(q, scale)
    l, d = config.cmp_block_size, config.cmp_stride
    cu, ccu = _packed_geometry(q, k_cmp, config, cu_seqlens)
    qp, kcp = pack(q), pack(k_cmp)
    o_cmp, lse_cmp = masked_attention_fwd(qp, kcp, pack(v_cmp), cu, ccu, 1, sc, 1, l, d)
    if block_indices is None:
        idx = topn_from_lse(qp, kcp, lse_cmp, cu, ccu, config=config, scale=sc)
    else:
        idx = block_indices.reshape(B * T, HKV, -1).to(_reference.torch.int64, copy=True)
    o_slc, lse_slc, _ = selected_fwd(qp, pack(k_slc), pack(v_slc), idx, cu,
                                     config.slc_block_size, sc)
    o_win, lse_win = masked_attention_fwd(qp, pack(k_win), pack(v_win), cu, cu, 0, sc,
                                          config.window_size, 1, 1)
    g = gates.contiguous().reshape(-1, 3)
    o = combine_fwd(*(x.reshape(-1, Dv) for x in (o_cmp, o_slc, o_win)), g)
    res = (o_cmp.view(B, T, HQ, Dv), lse_cmp.view(B, T, HQ), o_slc.view(B, T, HQ, Dv), lse_slc.view(B, T, HQ),
           o_win.view(B, T, HQ, Dv), lse_win.view(B, T, HQ), idx.view(B, T, HKV, -1))
    return o.view(B, T, HQ, Dv), res


def native_sparse_attention_bwd(
    do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, *, config, scale=None, cu_seqlens=None
):
    """Gradients (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dgates) of `native_sparse_attention_fwd`."""
    if _use_reference(q):
        return _torch_backend.native_sparse_attention_bwd(
            do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, config=config, scale=scale,
            cu_seqlens=cu_seqlens)
    B, T, HQ, Dk = q.shape
    HKV, Dv = k_slc.shape[2], v_slc.shape[-1]
    sc = default_scale(q, scale)
    l, d = config.cmp_block_size, config.cmp_stride
    cu, ccu = _packed_geometry(q, k_cmp, config, cu_seqlens)
    o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, idx = (x.reshape(B * T, *x.shape[2:]) for x in residuals)
    g = gates.contiguous().reshape(-1, 3)
    d_cmp, d_slc, d_win, dg = combine_bwd(*(x.reshape(-1, Dv) for x in (o_cmp, o_slc, o_win)), g,
                                          do.reshape(-1, Dv))
    qp = pack(q)
    ks, vs = pack(k_slc), pack(v_slc)
    dq, dkc, dvc = masked_attention_bwd(qp, pack(k_cmp), pack(v_cmp), o_cmp, lse_cmp, cu,
                                        ccu, d_cmp.view(B * T, HQ, Dv), None, 1, sc, 1, l, d)
    plan = SelectionPlan(idx, cu, config.slc_block_size, HQ // HKV, None)
    dq_s, dks, dvs = selected_bwd(qp, ks, vs, o_slc, lse_slc, cu, d_slc.view(B * T, HQ, Dv), plan,
                                  config.slc_block_size, sc)
    dq_w, dkw, dvw = masked_attention_bwd(qp, pack(k_win), pack(v_win), o_win, lse_win,
                                          cu, cu, d_win.view(B * T, HQ, Dv), None, 0, sc, config.window_size, 1, 1)
    dq = (dq.float() + dq_s.float() + dq_w.float()).to(q.dtype)
    return (dq.view(B, T, HQ, Dk), dkc.view(k_cmp.shape), dvc.view(v_cmp.shape), dks.view(k_slc.shape),
            dvs.view(v_slc.shape), dkw.view(k_win.shape), dvw.view(v_win.shape), dg.view(gates.shape))
