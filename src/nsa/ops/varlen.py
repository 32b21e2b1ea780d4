"""Helpers for the one variable-length convention: packed tokens with flash-attn style `cu_seqlens`."""
from __future__ import annotations

from typing import Iterator

import torch

from ..config import num_compressed_tokens


def sequence_spans(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None) -> Iterator[tuple[int, int, int]]:
    """Yield (batch index, start, end) of every sequence: whole rows, or the packed spans of `cu_seqlens`."""
    if cu_seqlens is None:
        for b in range(batch):
            yield b, 0, seqlen
    else:
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            yield 0, start, end


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """Offsets of each sequence's compressed tokens in the packed compressed tensor (Eq. 7 count per sequence)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [num_compressed_tokens(n, block_size, stride) for n in lengths]
    out = torch.zeros(len(counts) + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    if counts:
        out[1:] = torch.tensor(counts, dtype=cu_seqlens.dtype, device=cu_seqlens.device).cumsum(0)
    return out


def num_compressed_total(batch_seqlen: int, cu_seqlens: torch.Tensor | None, block_size: int, stride: int) -> int:
    """Length of the compressed K/V time axis for a padded batch of `batch_seqlen` or a packed batch."""
    if cu_seqlens is None:
        return num_compressed_tokens(batch_seqlen, block_size, stride)
    return int(compressed_cu_seqlens(cu_seqlens, block_size, stride)[-1])


def token_positions(seqlen: int, cu_seqlens: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor:
    """Position of each token inside its own sequence, [T] int64 (0-based)."""
    if cu_seqlens is None:
        return torch.arange(seqlen, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=seqlen)
    return torch.arange(seqlen, device=device) - starts
