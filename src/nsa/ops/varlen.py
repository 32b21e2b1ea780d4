"""Helpers for the one variable-length convention: packed tokens with flash-attn style `cu_seqlens`."""
from __future__ import annotations

import weakref
from typing import Iterable, Iterator

import torch

from ..config import check_int, num_compressed_tokens

# id(offsets tensor) -> (weak reference to it, its version counter, its values as host ints). Device kernels need the
# offsets on the host (tile tables, loop bounds); remembering them where they were built from host numbers, or read
# once, avoids a device synchronisation per use, and a padded batch needs none at all (so its forward can be
# captured in a CUDA graph). (Not a WeakKeyDictionary: its key comparison would call Tensor.__eq__.)
_HOST_OFFSETS: dict[int, tuple[weakref.ref, int, list[int]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if _HOST_OFFSETS.get(key, (None,))[0] is ref:
        del _HOST_OFFSETS[key]


def _version(cu: torch.Tensor) -> int:
    return -1 if cu.is_inference() else cu._version  # inference tensors keep no version counter


def remember_offsets(cu: torch.Tensor, values: Iterable[int], owned: bool = True) -> torch.Tensor:
    """Record `values` (host ints) as the contents of the offsets tensor `cu`; returns cu. `owned=False` marks a
    caller's tensor: an inference tensor of theirs is not remembered, since without a version counter an in-place
    change to it could not be told."""
    if owned or not cu.is_inference():
        key = id(cu)
        ref = weakref.ref(cu, lambda r: _forget(key, r))
        _HOST_OFFSETS[key] = (ref, _version(cu), [int(v) for v in values])
    return cu


def _read_offsets(cu: torch.Tensor) -> list[int]:
    return cu.tolist()  # a device read: synchronises with the GPU


def host_offsets(cu: torch.Tensor) -> list[int]:
    """The values of the 1-D offsets tensor `cu` as host ints: remembered ones (also after an in-place change is
    ruled out by the version counter), else read from the device once and remembered. A CPU tensor's remembered
    values are checked against its contents (a cheap read), since writes through a NumPy view, `.data` or a
    storage alias do not bump the version counter; on a GPU such writes to a tensor already used are not seen
    (write offsets with torch ops, or pass a new tensor)."""
    hit = _HOST_OFFSETS.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == _version(cu):
        if cu.device.type != "cpu" or cu.tolist() == hit[2]:
            return hit[2]
    values = _read_offsets(cu)
    remember_offsets(cu, values, owned=False)
    return values


def sequence_spans(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None) -> Iterator[tuple[int, int, int]]:
    """Yield (batch index, start, end) of every sequence: whole rows, or the packed spans of `cu_seqlens`."""
    if cu_seqlens is None:
        for b in range(batch):
            yield b, 0, seqlen
    else:
        bounds = host_offsets(cu_seqlens)
        for start, end in zip(bounds[:-1], bounds[1:]):
            yield 0, start, end


def check_offsets(name: str, cu: torch.Tensor) -> list[int]:
    """The host values of the offsets `cu` (as the ops check `cu_seqlens`: a 1-D int32/int64 tensor of at least
    two values, from 0, non-decreasing), else ValueError naming it."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [N+1] of sequence offsets, got "
                         f"{tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")
    values = host_offsets(cu)
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values}")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    return values


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """Offsets of each sequence's compressed tokens in the packed compressed tensor (Eq. 7 count per sequence),
    with their host values remembered (`host_offsets`). ValueError naming the argument for offsets the ops would
    refuse or a block_size / stride that is not a positive int."""
    block_size = check_int("block_size", block_size, 1, numpy=True)
    stride = check_int("stride", stride, 1, numpy=True)
    bounds = check_offsets("cu_seqlens", cu_seqlens)
    offsets = [0]
    for start, end in zip(bounds[:-1], bounds[1:]):
        offsets.append(offsets[-1] + num_compressed_tokens(end - start, block_size, stride))
    out = torch.tensor(offsets, dtype=cu_seqlens.dtype).to(cu_seqlens.device)
    return remember_offsets(out, offsets)


def num_compressed_total(batch_seqlen: int, cu_seqlens: torch.Tensor | None, block_size: int, stride: int) -> int:
    """Length of the compressed K/V time axis for a padded batch of `batch_seqlen` or a packed batch."""
    if cu_seqlens is None:
        return num_compressed_tokens(batch_seqlen, block_size, stride)
    bounds = host_offsets(cu_seqlens)
    return sum(num_compressed_tokens(e - s, block_size, stride) for s, e in zip(bounds[:-1], bounds[1:]))


def packed_block_starts(cu_seqlens: torch.Tensor, block_size: int, stride: int, device=None) -> torch.Tensor:
    """First packed position of every compressed block of a packed batch, int64 [Tc total] (Eq. 7 per sequence),
    on `device` (default: the offsets' device)."""
    device = cu_seqlens.device if device is None else device
    bounds = host_offsets(cu_seqlens)
    parts = [start + torch.arange(num_compressed_tokens(end - start, block_size, stride), device=device) * stride
             for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def token_positions(seqlen: int, cu_seqlens: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor:
    """Position of each token inside its own sequence, [T] int64 (0-based)."""
    if cu_seqlens is None:
        return torch.arange(seqlen, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=seqlen)
    return torch.arange(seqlen, device=device) - starts


def check_position_ids(position_ids, B: int, T: int) -> None:
    """None or an integer (not bool) tensor [T] or [B, T], else ValueError naming position_ids."""
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor)
                                     or tuple(position_ids.shape) not in ((T,), (B, T))
                                     or position_ids.is_floating_point() or position_ids.is_complex()
                                     or position_ids.dtype == torch.bool):
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be an integer tensor [T] or [B, T] = [{B}, {T}], got {shape}")
