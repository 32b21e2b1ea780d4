"""Rotary position embedding (rotate-half convention) at explicit integer positions."""
from __future__ import annotations

import torch


_INV_FREQ: dict = {}


def _inv_freq(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2i/dim), i < dim/2, float64 on `device`. Eagerly built once per (dim, theta, device), not per call (a
    decode step rotates at one new position per layer); while compiling, traced inline."""
    def build():
        return theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)

    if torch.compiler.is_compiling():
        return build()
    key = (dim, theta, device)
    if key not in _INV_FREQ:
        if len(_INV_FREQ) >= 64:
            _INV_FREQ.clear()
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable by any later call
            _INV_FREQ[key] = build()
    return _INV_FREQ[key]


def rope_tables(positions: torch.Tensor, dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B or 1, T, 1, dim] in `dtype` for positions [T] or [B, T]: build once, rotate several tensors
    at the same positions (`apply_rope(..., tables=)`). `sin` carries the rotation's sign: (-sin, +sin) halves,
    so that a rotation is x * cos + (x2, x1) * sin."""
    # angles in float64: positions reach 10^5+ and float32 angles would lose the low bits
    angles = positions.to(device=device, dtype=torch.float64)[..., None] * _inv_freq(dim, float(theta),
                                                                                      torch.device(device))
    if angles.dim() == 2:
        angles = angles[None]
    cos = torch.cos(angles).repeat(1, 1, 2)[:, :, None, :]
    sin = torch.sin(angles)
    sin = torch.cat((-sin, sin), -1)[:, :, None, :]
    return cos.to(dtype), sin.to(dtype)


def rope_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotations are computed in for x of `dtype`: float64 stays, anything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None, theta: float = 10000.0, *, tables=None):
    """Rotate x [B, T, H, D] (D even) by angles positions * theta^(-2i/D); positions [T] or [B, T]. `tables`:
    `rope_tables(positions, D, theta, x.device, float64 for float64 x else float32)`, in place of positions.
    Rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as x cos + (x2, x1) * (-sin, sin)."""
    if (positions is None) == (tables is None):
        raise ValueError("apply_rope takes exactly one of positions and tables")
    D = x.shape[-1]
    acc = rope_dtype(x.dtype)
    cos, sin = rope_tables(positions, D, theta, x.device, acc) if tables is None else tables
    xf = x.to(acc)
    swapped = torch.cat((xf[..., D // 2:], xf[..., :D // 2]), -1)  # (x2, x1); roll() breaks compiled dynamic shapes
    return (xf * cos + swapped * sin).to(x.dtype)
