"""Between padded batches and nsa's packed convention (`cu_seqlens`, B = 1), as flash-attn's `bert_padding` does.

NSA finds sequence boundaries only in `cu_seqlens` (position_ids set RoPE angles, nothing else), so a batch with a
padding mask (left or right padding) or HF-style packed position ids goes through these helpers first:

    x_packed, indices, cu_seqlens, max_seqlen = nsa.unpad_input(x, attention_mask)   # [1, N, hidden]
    y = nsa.pad_input(layer(x_packed, cu_seqlens=cu_seqlens), indices, B, T)        # [B, T, hidden], 0 at pads
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import check_int


def unpad_input(x: torch.Tensor, attention_mask: torch.Tensor):
    """x [B, T, ...] and attention_mask [B, T] (nonzero / True = a token) -> (x_packed [1, N, ...], indices [N]
    int64 (positions of the tokens in the flattened B*T), cu_seqlens [B+1] int32, max_seqlen). The tokens of a row,
    in order, form one sequence (padding on either side; rows may be empty)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = getattr(attention_mask, "shape", attention_mask)
        raise ValueError(f"attention_mask must be a [B, T] tensor, got {got}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"x must be [B, T, ...] with [B, T] = {tuple(attention_mask.shape)}, "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if attention_mask.is_floating_point() and bool(torch.isnan(attention_mask).any()):
        raise ValueError("attention_mask must not hold NaN")
    keep = attention_mask.to(x.device).bool()
    indices = keep.flatten().nonzero().flatten()
    lengths = keep.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return x.flatten(0, 1).index_select(0, indices)[None], indices, cu_seqlens, max_seqlen


def pad_input(x_packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of `unpad_input`: x_packed [1, N, ...] -> [batch, seqlen, ...], zeros at the padding.
    Differentiable in x_packed. indices: a 1-D integer tensor [N] of distinct positions in [0, batch * seqlen);
    batch, seqlen: non-negative ints (NumPy integers too). ValueError naming the argument otherwise. The values of
    indices (range, no duplicates) are read on the host (one device sync on a GPU; one O(N) pass, a sort only when
    they are not increasing) except while torch.compile traces, where only dtype, rank and shape are checked."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point() \
            or indices.is_complex() or indices.dtype == torch.bool:
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a 1-D integer tensor [N], got {got}")
    if not torch.compiler.is_compiling():  # sizes may be symbolic while tracing
        batch = check_int("batch", batch, 0, numpy=True)
        seqlen = check_int("seqlen", seqlen, 0, numpy=True)
    if not isinstance(x_packed, torch.Tensor) or x_packed.dim() < 2 or x_packed.shape[0] != 1 \
            or x_packed.shape[1] != indices.numel():
        raise ValueError(f"x_packed must be [1, N, ...] with N = {indices.numel()} (len(indices)), "
                         f"got {tuple(getattr(x_packed, 'shape', ()))}")
    if indices.numel() and not torch.compiler.is_compiling():
        _check_index_values(indices, batch * seqlen)
    x = x_packed[0]
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    return out.index_copy(0, indices.to(device=x.device, dtype=torch.long), x).view(batch, seqlen, *x.shape[1:])


def _check_index_values(indices: torch.Tensor, size: int) -> None:
    """ValueError unless the (non-empty) indices are distinct and in [0, size): one host read when they increase."""
    idx = indices.long()
    increasing = (idx[1:] > idx[:-1]).all()
    inc, lo, hi = torch.stack([increasing.long(), idx.min(), idx.max()]).tolist()
    if not 0 <= lo <= hi < size:
        raise ValueError(f"indices must lie in [0, batch * seqlen = {size}), got [{lo}, {hi}]")
    if not inc:
        s = idx.sort().values
        if bool((s[1:] == s[:-1]).any()):
            raise ValueError("indices must be distinct (a position given twice would be overwritten)")


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 cu_seqlens of a packed row whose positions restart at 0 for each sequence (HF's packing with
    position_ids, e.g. `DataCollatorWithFlattening`): [T] or [1, T] -> [N+1]. Each sequence's positions must run
    0, 1, 2, ... (ValueError otherwise). Reads the positions on the host."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() \
            or position_ids.dtype == torch.bool or not (
            position_ids.dim() == 1 or (position_ids.dim() == 2 and position_ids.shape[0] == 1)):
        raise ValueError("position_ids must be an integer tensor [T] or [1, T]")
    pos = position_ids.reshape(-1).cpu().long()
    T = pos.numel()
    if T == 0:
        return torch.zeros(1, dtype=torch.int32, device=position_ids.device)
    starts = (pos == 0).nonzero().flatten()
    if int(pos[0]) != 0:
        raise ValueError(f"position_ids must start at 0, got {int(pos[0])}")
    cu = torch.cat([starts, torch.tensor([T])])
    expected = torch.arange(T) - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    if not torch.equal(pos, expected):
        raise ValueError("position_ids must run 0, 1, 2, ... within each packed sequence")
    return cu.to(device=position_ids.device, dtype=torch.int32)
