"""Triton backend: the functions of `nsa.ops.reference` with the same signatures, on Triton kernels.

Importing raises ImportError where Triton is missing. CUDA tensors run compiled kernels; CPU tensors run in the
Triton interpreter, which must be enabled (TRITON_INTERPRET=1) before Triton is first imported. float64 inputs
are delegated to the reference (the kernels accumulate in fp32).
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .. import reference as _reference
from .. import torch_backend as _torch_backend
from .combine import combine_bwd, combine_fwd
from .compression import compressed_attention as _compressed_attention
from .flash import default_scale, masked_attention_bwd, masked_attention_fwd
from .selection import SelectionPlan, selected_bwd, selected_fwd
from .selection import selected_attention as _selected_attention
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
    return q.dtype == torch.float64


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
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if _use_reference(q):
        return _reference.native_sparse_attention(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                                  block_indices=block_indices)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args):
        return _NSAFunction.apply(*args, block_indices, cu_seqlens, config, scale)
    return _forward(*args, config, scale, cu_seqlens, block_indices)[0]


class _Geometry:
    """Sizes, scale and packed offsets of one composed call."""

    def __init__(self, q, k_cmp, v_slc, config, scale, cu_seqlens):
        self.B, self.T, self.HQ, self.Dk = q.shape
        self.HKV, self.Dv = k_cmp.shape[2], v_slc.shape[-1]
        self.scale = default_scale(q, scale)
        self.l, self.d = config.cmp_block_size, config.cmp_stride
        self.cu = seq_offsets(self.B, self.T, cu_seqlens, q.device)
        self.ccu = cmp_offsets(self.B, k_cmp.shape[1], cu_seqlens, self.l, self.d, q.device)


def _forward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config, scale, cu_seqlens, block_indices):
    """(o [B,T,HQ,Dv], residuals (`RESIDUALS` order, [B,T,...] views), the selected branch's plan)."""
    geo = _Geometry(q, k_cmp, v_slc, config, scale, cu_seqlens)
    B, T, HQ, HKV, Dv, sc = geo.B, geo.T, geo.HQ, geo.HKV, geo.Dv, geo.scale
    qp, kcp = pack(q), pack(k_cmp)
    o_cmp, lse_cmp = masked_attention_fwd(qp, kcp, pack(v_cmp), geo.cu, geo.ccu, 1, sc, 1, geo.l, geo.d)
    if block_indices is None:
        idx = topn_from_lse(qp, kcp, lse_cmp, geo.cu, geo.ccu, config=config, scale=sc)
    else:
        idx = block_indices.reshape(B * T, HKV, -1).long()
    o_slc, lse_slc, plan = selected_fwd(qp, pack(k_slc), pack(v_slc), idx, geo.cu, config.slc_block_size, sc)
    o_win, lse_win = masked_attention_fwd(qp, pack(k_win), pack(v_win), geo.cu, geo.cu, 0, sc, config.window_size,
                                          1, 1)
    o = combine_fwd(*(x.reshape(-1, Dv) for x in (o_cmp, o_slc, o_win)), gates.contiguous().reshape(-1, 3))
    res = (o_cmp.view(B, T, HQ, Dv), lse_cmp.view(B, T, HQ), o_slc.view(B, T, HQ, Dv), lse_slc.view(B, T, HQ),
           o_win.view(B, T, HQ, Dv), lse_win.view(B, T, HQ), idx.view(B, T, HKV, -1))
    return o.view(B, T, HQ, Dv), res, plan


def _backward(do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, config, scale, cu_seqlens,
              plan=None):
    """Gradients of all 8 inputs; `plan` is the forward's selection plan (None: rebuilt from the indices)."""
    geo = _Geometry(q, k_cmp, v_slc, config, scale, cu_seqlens)
    B, T, HQ, Dv, sc = geo.B, geo.T, geo.HQ, geo.Dv, geo.scale
    o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, idx = (x.reshape(B * T, *x.shape[2:]) for x in residuals)
    d_cmp, d_slc, d_win, dg = combine_bwd(*(x.reshape(-1, Dv) for x in (o_cmp, o_slc, o_win)),
                                          gates.contiguous().reshape(-1, 3), do.reshape(-1, Dv))
    qp, ks, vs = pack(q), pack(k_slc), pack(v_slc)
    dq, dkc, dvc = masked_attention_bwd(qp, pack(k_cmp), pack(v_cmp), o_cmp, lse_cmp, geo.cu, geo.ccu,
                                        d_cmp.view(B * T, HQ, Dv), None, 1, sc, 1, geo.l, geo.d)
    if plan is None:
        plan = SelectionPlan(idx, geo.cu, config.slc_block_size, HQ // geo.HKV, None)
    dq_s, dks, dvs = selected_bwd(qp, ks, vs, o_slc, lse_slc, geo.cu, d_slc.view(B * T, HQ, Dv), plan,
                                  config.slc_block_size, sc)
    dq_w, dkw, dvw = masked_attention_bwd(qp, pack(k_win), pack(v_win), o_win, lse_win, geo.cu, geo.cu,
                                          d_win.view(B * T, HQ, Dv), None, 0, sc, config.window_size, 1, 1)
    dq = (dq.float() + dq_s.float() + dq_w.float()).to(q.dtype)  # the three branches summed once, in fp32
    return (dq.view(q.shape), dkc.view(k_cmp.shape), dvc.view(v_cmp.shape), dks.view(k_slc.shape),
            dvs.view(v_slc.shape), dkw.view(k_win.shape), dvw.view(v_win.shape), dg.view(gates.shape))


class _NSAFunction(torch.autograd.Function):
    """The eager autograd entry point: `_forward`, then `_backward` with the forward's selection plan."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_indices, cu_seqlens, config, scale):
        args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
        o, residuals, ctx.plan = _forward(*args, config, scale, cu_seqlens, block_indices)
        ctx.save_for_backward(*args, cu_seqlens, *residuals)
        ctx.cfg = (config, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors
        grads = _backward(do, *saved[:8], saved[9:], *ctx.cfg, saved[8], plan=ctx.plan)
        return (*grads, None, None, None, None)


# ----------------------------------------------------------------------------------- split forward/backward
# The torch.compile path (`nsa.ops.library`) runs the composed op as a forward returning its residuals and a
# backward taking them, with the contract of the torch backend's pair (same names, RESIDUALS order).
RESIDUALS = _torch_backend.RESIDUALS


def residual_dtypes(dtype):
    """(per-branch o dtype, lse dtype) of `native_sparse_attention_fwd`'s residuals."""
    if dtype == torch.float64:
        return _torch_backend.residual_dtypes(dtype)
    return dtype, torch.float32


def native_sparse_attention_fwd(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None
):
    """(o [B,T,HQ,Dv], residuals): the per-branch o [B,T,HQ,Dv] (q's dtype) and lse [B,T,HQ] (fp32), and the
    int64 indices [B,T,HKV,n] (a copy of block_indices when given: op outputs may not alias inputs); float64
    runs the torch backend's pair."""
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if _use_reference(q):
        return _torch_backend.native_sparse_attention_fwd(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                                          block_indices=block_indices)
    o, residuals, _ = _forward(*args, config, scale, cu_seqlens, block_indices)
    if block_indices is not None:
        residuals = (*residuals[:-1], residuals[-1].clone())
    return o, residuals


def native_sparse_attention_bwd(
    do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, *, config, scale=None, cu_seqlens=None
):
    """Gradients (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dgates) of `native_sparse_attention_fwd`."""
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if _use_reference(q):
        return _torch_backend.native_sparse_attention_bwd(do, *args, residuals, config=config, scale=scale,
                                                          cu_seqlens=cu_seqlens)
    return _backward(do, *args, residuals, config, scale, cu_seqlens)
