"""Rotary position embedding (rotate-half convention) at explicit integer positions."""
from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B or 1, T, 1, dim] in `dtype` for positions [T] or [B, T]: build once, rotate several tensors
    at the same positions (`apply_rope(..., tables=)`)."""
    # angles in float64: positions reach 10^5+ and float32 angles would lose the low bits
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    angles = positions.to(device=device, dtype=torch.float64)[..., None] * inv_freq  # [..., T, D/2]
    if angles.dim() == 2:
        angles = angles[None]
    cos = torch.cos(angles).repeat(1, 1, 2)[:, :, None, :]
    sin = torch.sin(angles).repeat(1, 1, 2)[:, :, None, :]
    return cos.to(dtype), sin.to(dtype)


def rope_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotations are computed in for x of `dtype`: float64 stays, anything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None, theta: float = 10000.0, *, tables=None):
    """Rotate x [B, T, H, D] (D even) by angles positions * theta^(-2i/D); positions [T] or [B, T]. `tables`:
    `rope_tables(positions, D, theta, x.device, float64 for float64 x else float32)`, in place of positions."""
    if (positions is None) == (tables is None):
        raise ValueError("apply_rope takes exactly one of positions and tables")
    D = x.shape[-1]
    acc = rope_dtype(x.dtype)
    cos, sin = rope_tables(positions, D, theta, x.device, acc) if tables is None else tables
    xf = x.to(acc)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
