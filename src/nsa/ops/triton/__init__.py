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
from .flash import default_scale, masked_attention_bwd, masked_attention_fwd
from .selection import SelectionPlan, selected_bwd, selected_fwd
from .topk import select_blocks as _select_blocks
from .topk import topn_from_lse
from .utils import cmp_offsets, interpreting, pack, seq_offsets

__all__ = [
    "compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention",
    "native_sparse_attention", "native_sparse_attention_fwd", "native_sparse_attention_bwd", "branch_fwd",
    "branch_bwd", "residual_dtypes",
]


def _use_reference(q) -> bool:
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported; got q on "
            f"{q.device}"
        )
    return q.dtype == torch.float64


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None, cu_seqlens=None):
    """(o [B,T,HQ,Dv], lse [B,T,HQ] fp32, -inf where no compressed token is visible) over compressed tokens (Eq. 7)."""
    if _use_reference(q):
        return _reference.compressed_attention(q, k_cmp, v_cmp, block_size=block_size, stride=stride, scale=scale,
                                               cu_seqlens=cu_seqlens)
    return _branch("cmp", q, k_cmp, v_cmp, None, (block_size, stride), scale, cu_seqlens)


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None):
    """int64 [B,T,HKV,n] selected blocks (Eq. 8-11), ascending, -1 padded (online top-n kernel)."""
    fn = _reference.select_blocks if _use_reference(q) else _select_blocks
    return fn(q, k_cmp, config=config, scale=scale, cu_seqlens=cu_seqlens)


def selected_attention(q, k, v, indices, *, block_size, scale=None, cu_seqlens=None, return_lse=False):
    """o [B,T,HQ,Dv] (and lse [B,T,HQ] fp32) over the raw tokens of the selected blocks (Eq. 12)."""
    if _use_reference(q):
        return _reference.selected_attention(q, k, v, indices, block_size=block_size, scale=scale,
                                             cu_seqlens=cu_seqlens, return_lse=return_lse)
    o, lse = _branch("slc", q, k, v, indices, (block_size,), scale, cu_seqlens)
    return (o, lse) if return_lse else o


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, return_lse=False):
    """o [B,T,HQ,Dv] (and lse [B,T,HQ] fp32) over keys [t - window + 1, t] of the query's own sequence."""
    if _use_reference(q):
        return _reference.sliding_window_attention(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens,
                                                   return_lse=return_lse)
    o, lse = _branch("win", q, k, v, None, (window,), scale, cu_seqlens)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------- branch ops
def _branch(branch, q, k, v, indices, geometry, scale, cu_seqlens):
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _BranchFunction.apply(branch, q, k, v, indices, geometry, scale, cu_seqlens)
    return _branch_forward(branch, q, k, v, indices, geometry, scale, cu_seqlens)[:2]


def _branch_offsets(branch, q, k, geometry, cu_seqlens):
    """Packed offsets of the queries and of the keys (the compressed tokens' for "cmp")."""
    B, T = q.shape[:2]
    cu = seq_offsets(B, T, cu_seqlens, q.device)
    if branch == "cmp":
        return cu, cmp_offsets(B, k.shape[1], cu_seqlens, geometry[0], geometry[1], q.device)
    return cu, cu


def _mask(branch, geometry):
    """(MODE, window, cmp_l, cmp_d) of the flash kernels for "cmp" (Eq. 7 visibility) or "win"."""
    return (1, 1, *geometry) if branch == "cmp" else (0, geometry[0], 1, 1)


def _branch_forward(branch, q, k, v, indices, geometry, scale, cu_seqlens, offsets=None):
    """(o [B,T,HQ,Dv], lse [B,T,HQ] fp32, the selection plan for "slc" else None); `offsets` (query and key
    offsets, `_branch_offsets`) when the caller has them."""
    B, T, HQ, _ = q.shape
    HKV, Dv = k.shape[2], v.shape[-1]
    sc = default_scale(q, scale)
    cu, cu_k = offsets or _branch_offsets(branch, q, k, geometry, cu_seqlens)
    plan = None
    if branch == "slc":
        idx = indices.to(q.device).reshape(B * T, HKV, indices.shape[-1])
        o, lse, plan = selected_fwd(pack(q), pack(k), pack(v), idx, cu, geometry[0], sc)
    else:
        mode, window, cmp_l, cmp_d = _mask(branch, geometry)
        o, lse = masked_attention_fwd(pack(q), pack(k), pack(v), cu, cu_k, mode, sc, window, cmp_l, cmp_d)
    return o.view(B, T, HQ, Dv), lse.view(B, T, HQ), plan


def _branch_backward(branch, do, dlse, q, k, v, o, lse, indices, geometry, scale, cu_seqlens, plan=None,
                     offsets=None):
    """(dq, dk, dv) of `_branch_forward`; `plan` is its selection plan ("slc"; None: rebuilt from the indices)."""
    B, T, HQ, _ = q.shape
    HKV, Dv = k.shape[2], v.shape[-1]
    sc = default_scale(q, scale)
    cu, cu_k = offsets or _branch_offsets(branch, q, k, geometry, cu_seqlens)
    qp, kp, vp = pack(q), pack(k), pack(v)
    o, lse = o.reshape(B * T, HQ, Dv), lse.reshape(B * T, HQ)
    do = None if do is None else do.reshape(B * T, HQ, Dv)
    if branch == "slc":
        if plan is None:
            idx = indices.to(q.device).reshape(B * T, HKV, indices.shape[-1])
            plan = SelectionPlan(idx, cu, geometry[0], HQ // HKV, None)
        dlse = None if dlse is None else dlse.reshape(B * T, HQ)
        dq, dk, dv = selected_bwd(qp, kp, vp, o, lse, cu, do, plan, geometry[0], sc, dlse)
    else:
        dlse = None if dlse is None else dlse.reshape(B * T, HQ)
        mode, window, cmp_l, cmp_d = _mask(branch, geometry)
        dq, dk, dv = masked_attention_bwd(qp, kp, vp, o, lse, cu, cu_k, do, dlse, mode, sc, window, cmp_l, cmp_d)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


class _BranchFunction(torch.autograd.Function):
    """The eager autograd entry point of one branch op: (o, lse), the backward reusing the forward's plan."""

    @staticmethod
    def forward(ctx, branch, q, k, v, indices, geometry, scale, cu_seqlens):
        o, lse, ctx.plan = _branch_forward(branch, q, k, v, indices, geometry, scale, cu_seqlens)
        ctx.save_for_backward(q, k, v, o, lse, indices, cu_seqlens)
        ctx.cfg = (branch, geometry, scale)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, indices, cu_seqlens = ctx.saved_tensors
        branch, geometry, scale = ctx.cfg
        grads = _branch_backward(branch, do, dlse, q, k, v, o, lse, indices, geometry, scale, cu_seqlens, ctx.plan)
        return (None, *grads, None, None, None, None)


def residual_dtypes(dtype):
    """(per-branch o dtype, lse dtype) of the split forwards' residuals (`native_sparse_attention_fwd`,
    `branch_fwd`)."""
    if dtype == torch.float64:
        return _torch_backend.residual_dtypes(dtype)
    return dtype, torch.float32


def branch_fwd(branch, q, k, v, indices=None, *, geometry, scale=None, cu_seqlens=None):
    """One branch op ("cmp" | "slc" | "win") as a forward returning what its backward needs: (o, lse), the
    torch backend's contract (`residual_dtypes`); float64 runs the torch backend's pair."""
    if _use_reference(q):
        return _torch_backend.branch_fwd(branch, q, k, v, indices, geometry=geometry, scale=scale,
                                         cu_seqlens=cu_seqlens)
    return _branch_forward(branch, q, k, v, indices, geometry, scale, cu_seqlens)[:2]


def branch_bwd(branch, do, dlse, q, k, v, o, lse, indices=None, *, geometry, scale=None, cu_seqlens=None):
    """(dq, dk, dv) of `branch_fwd`."""
    if _use_reference(q):
        return _torch_backend.branch_bwd(branch, do, dlse, q, k, v, o, lse, indices, geometry=geometry, scale=scale,
                                         cu_seqlens=cu_seqlens)
    return _branch_backward(branch, do, dlse, q, k, v, o, lse, indices, geometry, scale, cu_seqlens)


# ----------------------------------------------------------------------------------- composed op
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


def _forward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config, scale, cu_seqlens, block_indices):
    """(o [B,T,HQ,Dv], residuals (`RESIDUALS` order), the selected branch's plan)."""
    B, T, HQ, _ = q.shape
    HKV, Dv = k_slc.shape[2], v_slc.shape[-1]
    cmp_geometry = (config.cmp_block_size, config.cmp_stride)
    cu, ccu = _branch_offsets("cmp", q, k_cmp, cmp_geometry, cu_seqlens)
    o_cmp, lse_cmp, _ = _branch_forward("cmp", q, k_cmp, v_cmp, None, cmp_geometry, scale, cu_seqlens, (cu, ccu))
    if block_indices is None:  # Eq. 8-11 from the cmp branch's lse: no second softmax pass
        idx = topn_from_lse(pack(q), pack(k_cmp), lse_cmp.view(B * T, HQ), cu, ccu, config=config,
                            scale=default_scale(q, scale)).view(B, T, HKV, config.num_selected)
    else:
        idx = block_indices.to(q.device, torch.int64)
    o_slc, lse_slc, plan = _branch_forward("slc", q, k_slc, v_slc, idx, (config.slc_block_size,), scale, cu_seqlens,
                                           (cu, cu))
    o_win, lse_win, _ = _branch_forward("win", q, k_win, v_win, None, (config.window_size,), scale, cu_seqlens,
                                        (cu, cu))
    o = combine_fwd(*(x.reshape(-1, Dv) for x in (o_cmp, o_slc, o_win)), gates.contiguous().reshape(-1, 3))
    return o.view(B, T, HQ, Dv), (o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, idx), plan


def _backward(do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, config, scale, cu_seqlens,
              plan=None):
    """Gradients of all 8 inputs; `plan` is the forward's selection plan (None: rebuilt from the indices)."""
    Dv = v_slc.shape[-1]
    o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, idx = residuals
    d_cmp, d_slc, d_win, dg = combine_bwd(*(x.reshape(-1, Dv) for x in (o_cmp, o_slc, o_win)),
                                          gates.contiguous().reshape(-1, 3), do.reshape(-1, Dv))
    cmp_geometry = (config.cmp_block_size, config.cmp_stride)
    cu, ccu = _branch_offsets("cmp", q, k_cmp, cmp_geometry, cu_seqlens)
    dq, dkc, dvc = _branch_backward("cmp", d_cmp.view(o_cmp.shape), None, q, k_cmp, v_cmp, o_cmp, lse_cmp, None,
                                    cmp_geometry, scale, cu_seqlens, offsets=(cu, ccu))
    dq_s, dks, dvs = _branch_backward("slc", d_slc.view(o_slc.shape), None, q, k_slc, v_slc, o_slc, lse_slc, idx,
                                      (config.slc_block_size,), scale, cu_seqlens, plan, (cu, cu))
    dq_w, dkw, dvw = _branch_backward("win", d_win.view(o_win.shape), None, q, k_win, v_win, o_win, lse_win, None,
                                      (config.window_size,), scale, cu_seqlens, offsets=(cu, cu))
    dq = (dq.float() + dq_s.float() + dq_w.float()).to(q.dtype)  # the three branches summed once, in fp32
    return dq, dkc, dvc, dks, dvs, dkw, dvw, dg.view(gates.shape)


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
