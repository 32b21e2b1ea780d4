"""The public NSA ops as torch custom ops, so torch.compile traces a model through them (no graph break).

- `nsa::native_sparse_attention_fwd` returns the composed op's output (Eq. 5) and the residuals its backward needs
  (per-branch o and lse, the selected blocks); `nsa::native_sparse_attention_bwd` takes them.
- `nsa::branch_fwd` / `nsa::branch_bwd`: one branch op ("cmp", "slc", "win") as (o, lse) and its backward.
- `nsa::select_blocks` (no gradient), `nsa::packed_block_starts` (a packed batch's compressed-block starts, whose
  length is a dynamic size) and `nsa::checked_offsets` (a layer's cu_seqlens, checked at run time).
Each runs the chosen backend's split pair (`native_sparse_attention_fwd` / `_bwd`, `branch_fwd` / `branch_bwd`, in
the torch and triton backends) eagerly at run time, where host-side planning (offsets, tile tables, selection
plans) and the checks that read tensor values (cu_seqlens, the range of block_indices) are allowed. The fake
implementations give Dynamo and AOTAutograd shapes and dtypes. `nsa.ops.dispatch` calls the wrappers below only
while compiling.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..config import NSAConfig, bounded_window


def _backend(backend: str, device: torch.device):
    from .dispatch import resolve_backend  # dispatch imports this module

    return resolve_backend(backend, device)


@torch.library.custom_op("nsa::native_sparse_attention_fwd", mutates_args=())
def _nsa_fwd(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor,
    gates: Tensor, block_indices: Optional[Tensor], cu_seqlens: Optional[Tensor], geometry: list[int],
    scale: Optional[float], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .dispatch import check_native_sparse_attention

    config = NSAConfig(*geometry)
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    cu_seqlens = check_native_sparse_attention(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                               block_indices=block_indices, backend=backend)
    o, residuals = _backend(backend, q.device).native_sparse_attention_fwd(
        *args, config=bounded_window(config, q.shape[1]), scale=scale, cu_seqlens=cu_seqlens,
        block_indices=block_indices)
    return (o, *residuals)


@_nsa_fwd.register_fake
def _nsa_fwd_fake(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_indices, cu_seqlens, geometry, scale,
                  backend):
    B, T, HQ, _ = q.shape
    HKV, Dv = k_slc.shape[2], v_slc.shape[3]
    n = NSAConfig(*geometry).num_selected if block_indices is None else block_indices.shape[3]
    o_dtype, lse_dtype = _backend(backend, q.device).residual_dtypes(q.dtype)
    residuals = []
    for _branch in ("cmp", "slc", "win"):
        residuals += [q.new_empty(B, T, HQ, Dv, dtype=o_dtype), q.new_empty(B, T, HQ, dtype=lse_dtype)]
    return (q.new_empty(B, T, HQ, Dv), *residuals, q.new_empty(B, T, HKV, n, dtype=torch.int64))


@torch.library.custom_op("nsa::native_sparse_attention_bwd", mutates_args=())
def _nsa_bwd(
    do: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor,
    gates: Tensor, residuals: list[Tensor], cu_seqlens: Optional[Tensor], geometry: list[int],
    scale: Optional[float], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    grads = _backend(backend, q.device).native_sparse_attention_bwd(
        do, *args, residuals, config=bounded_window(NSAConfig(*geometry), q.shape[1]), scale=scale,
        cu_seqlens=cu_seqlens)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, args))


@_nsa_bwd.register_fake
def _nsa_bwd_fake(do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, residuals, cu_seqlens, geometry, scale,
                  backend):
    return tuple(torch.empty_like(x) for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates))


def _setup_context(ctx, inputs, output):
    *args, _block_indices, cu_seqlens, geometry, scale, backend = inputs
    ctx.save_for_backward(*args, cu_seqlens, *output[1:])
    ctx.meta = (geometry, scale, backend)


def _backward(ctx, do, *_residual_grads):
    saved = ctx.saved_tensors
    args, cu_seqlens, residuals = saved[:8], saved[8], list(saved[9:])
    grads = _nsa_bwd(do, *args, residuals, cu_seqlens, *ctx.meta)
    return (*grads, None, None, None, None, None)


_nsa_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ branch ops
@torch.library.custom_op("nsa::branch_fwd", mutates_args=())
def _branch_fwd(
    branch: str, q: Tensor, k: Tensor, v: Tensor, indices: Optional[Tensor], cu_seqlens: Optional[Tensor],
    geometry: list[int], scale: Optional[float], backend: str,
) -> tuple[Tensor, Tensor]:
    from .dispatch import bounded_geometry, check_branch

    cu_seqlens = check_branch(branch, q, k, v, indices, geometry, scale=scale, cu_seqlens=cu_seqlens,
                              backend=backend)
    return _backend(backend, q.device).branch_fwd(branch, q, k, v, indices,
                                                  geometry=bounded_geometry(branch, geometry, q.shape[1]),
                                                  scale=scale, cu_seqlens=cu_seqlens)


@_branch_fwd.register_fake
def _branch_fwd_fake(branch, q, k, v, indices, cu_seqlens, geometry, scale, backend):
    B, T, HQ, _ = q.shape
    o_dtype, lse_dtype = _backend(backend, q.device).residual_dtypes(q.dtype)
    return q.new_empty(B, T, HQ, v.shape[3], dtype=o_dtype), q.new_empty(B, T, HQ, dtype=lse_dtype)


@torch.library.custom_op("nsa::branch_bwd", mutates_args=())
def _branch_bwd(
    branch: str, do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    indices: Optional[Tensor], cu_seqlens: Optional[Tensor], geometry: list[int], scale: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    from .dispatch import bounded_geometry

    grads = _backend(backend, q.device).branch_bwd(branch, do, dlse, q, k, v, o, lse, indices,
                                                   geometry=bounded_geometry(branch, geometry, q.shape[1]),
                                                   scale=scale, cu_seqlens=cu_seqlens)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v)))


@_branch_bwd.register_fake
def _branch_bwd_fake(branch, do, dlse, q, k, v, o, lse, indices, cu_seqlens, geometry, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _branch_setup_context(ctx, inputs, output):
    branch, q, k, v, indices, cu_seqlens, geometry, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output, indices, cu_seqlens)
    ctx.meta = (branch, geometry, scale, backend)


def _branch_backward(ctx, do, dlse):
    q, k, v, o, lse, indices, cu_seqlens = ctx.saved_tensors
    branch, geometry, scale, backend = ctx.meta
    dq, dk, dv = _branch_bwd(branch, do, dlse, q, k, v, o, lse, indices, cu_seqlens, geometry, scale, backend)
    return None, dq, dk, dv, None, None, None, None, None


_branch_fwd.register_autograd(_branch_backward, setup_context=_branch_setup_context)


def branch(name: str, q: Tensor, k: Tensor, v: Tensor, indices, *, geometry, scale=None, cu_seqlens=None,
           backend="auto") -> tuple[Tensor, Tensor]:
    """One branch op ("cmp" | "slc" | "win") through the custom ops: (o [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ])."""
    scale = None if scale is None else float(scale)
    o, lse = _branch_fwd(name, q, k, v, indices, cu_seqlens, list(geometry), scale, backend)
    return o.to(q.dtype), lse


@torch.library.custom_op("nsa::select_blocks", mutates_args=())
def _select_blocks(q: Tensor, k_cmp: Tensor, cu_seqlens: Optional[Tensor], geometry: list[int],
                   scale: Optional[float], backend: str) -> Tensor:
    from .dispatch import select_blocks

    return select_blocks(q, k_cmp, config=NSAConfig(*geometry), scale=scale, cu_seqlens=cu_seqlens, backend=backend)


@_select_blocks.register_fake
def _select_blocks_fake(q, k_cmp, cu_seqlens, geometry, scale, backend):
    return q.new_empty(*q.shape[:2], k_cmp.shape[2], NSAConfig(*geometry).num_selected, dtype=torch.int64)


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None, backend="auto") -> Tensor:
    """`nsa.select_blocks` through its custom op (no gradient: the indices are integers)."""
    scale = None if scale is None else float(scale)
    return _select_blocks(q.detach(), k_cmp.detach(), cu_seqlens, list(dataclasses.astuple(config)), scale, backend)


# ------------------------------------------------------------------------------------------------ packed batches
@torch.library.custom_op("nsa::checked_offsets", mutates_args=())
def checked_offsets(cu_seqlens: Tensor, seqlen: int) -> Tensor:
    """cu_seqlens checked at run time (ValueError naming it) and returned as a new tensor whose values are
    remembered on the host: layers trace their uses of the offsets from this output, so none runs before the
    check."""
    from .dispatch import check_offset_values
    from .varlen import remember_offsets

    values = check_offset_values(cu_seqlens, seqlen)
    return remember_offsets(cu_seqlens.clone(), values)


@checked_offsets.register_fake
def _checked_offsets_fake(cu_seqlens, seqlen):
    return torch.empty_like(cu_seqlens)


@torch.library.custom_op("nsa::packed_block_starts", mutates_args=())
def packed_block_starts(cu_seqlens: Tensor, block_size: int, stride: int, call_id: int, anchor: Tensor) -> Tensor:
    """`nsa.ops.varlen.packed_block_starts` as an op: its length depends on the offsets' values, so while compiling
    it is a dynamic size, and a new offset list neither breaks the graph nor recompiles. `call_id` and `anchor`
    (both unused: a layer's id and its input) tell the calls apart, of different layers (deep copies included) and
    of one layer called twice: identical calls get merged by the compiler's CSE, which then loses the merged calls'
    size symbols (an inductor error, "u1 not in {u0: ...}", torch 2.13)."""
    from .varlen import packed_block_starts as impl

    return impl(cu_seqlens, block_size, stride)


@packed_block_starts.register_fake
def _packed_block_starts_fake(cu_seqlens, block_size, stride, call_id, anchor):
    return cu_seqlens.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None,
                            cu_seqlens=None, block_indices=None, backend="auto") -> Tensor:
    """Same contract as `nsa.ops.dispatch.native_sparse_attention`, through the custom ops (for torch.compile)."""
    geometry = list(dataclasses.astuple(config))
    scale = None if scale is None else float(scale)
    return _nsa_fwd(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_indices, cu_seqlens, geometry, scale,
                    backend)[0]
