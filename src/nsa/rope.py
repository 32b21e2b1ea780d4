"""Rotary position embedding (rotate-half convention) at explicit integer positions."""
from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [B, T, H, D] (D even) by angles positions * theta^(-2i/D); positions [T] or [B, T]."""
    D = x.shape[-1]
    # angles in float64: positions reach 10^5+ and float32 angles would lose the low bits
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    angles = positions.to(device=x.device, dtype=torch.float64)[..., None] * inv_freq  # [..., T, D/2]
    if angles.dim() == 2:
        angles = angles[None]
    cos = torch.cos(angles).repeat(1, 1, 2)[:, :, None, :]
    sin = torch.sin(angles).repeat(1, 1, 2)[:, :, None, :]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos.to(acc) + rotated * sin.to(acc)).to(x.dtype)
