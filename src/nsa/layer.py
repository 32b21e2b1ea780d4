"""NativeSparseAttention: projections, RoPE, φ, gates, and the NSA op (paper §3)."""
from __future__ import annotations

import torch
from torch import nn

from .compression import block_starts, make_compressor
from .config import NSAConfig
from .ops import dispatch
from .ops.varlen import token_positions
from .rope import apply_rope


class NativeSparseAttention(nn.Module):
    """NSA attention layer: [B, T, hidden] -> [B, T, hidden] (or packed [1, T, hidden] with `cu_seqlens`).

    - q from one projection; independent K/V projections for cmp, slc and win (§3.3.3) unless `shared_kv`.
    - cmp keys/values are compressed by φ (`compression`: "mlp" | "linear" | "mean") from *un-rotated* keys; each
      compressed key is then rotated at the position of its block's last token (i*d + l - 1), the first query
      position allowed to see it. q and the slc/win keys are rotated at their own positions.
    - gates g = sigmoid(Linear(x)) per query head and branch (Eq. 5).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        config: NSAConfig = NSAConfig(),
        compression: str = "mlp",
        shared_kv: bool = False,
        rope_theta: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.v_head_dim, self.config = head_dim, v_head_dim, config
        self.shared_kv, self.rope_theta, self.backend = shared_kv, rope_theta, backend
        self.num_kv_sets = 1 if shared_kv else 3
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, self.num_kv_sets * num_kv_heads * (head_dim + v_head_dim), bias=False)
        self.g_proj = nn.Linear(hidden_size, 3 * num_heads)
        nn.init.zeros_(self.g_proj.bias)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)
        l, d = config.cmp_block_size, config.cmp_stride
        self.compress_k = make_compressor(compression, head_dim, l, d, position_embedding=True)
        self.compress_v = make_compressor(compression, v_head_dim, l, d, position_embedding=False)

    def project(self, x: torch.Tensor, cu_seqlens=None, position_ids=None):
        """All inputs of the NSA op for x [B, T, hidden]: (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)."""
        B, T, _ = x.shape
        HQ, HKV, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        if position_ids is None:
            position_ids = token_positions(T, cu_seqlens, x.device)
        q = apply_rope(self.q_proj(x).view(B, T, HQ, Dk), position_ids, self.rope_theta)
        kv = self.kv_proj(x).view(B, T, self.num_kv_sets, HKV, Dk + Dv)
        ks, vs = kv[..., :Dk].unbind(2), kv[..., Dk:].unbind(2)
        if self.shared_kv:
            ks, vs = ks * 3, vs * 3
        (k_cmp_raw, k_slc, k_win), (v_cmp_raw, v_slc, v_win) = ks, vs
        k_cmp = self.compress_k(k_cmp_raw, cu_seqlens)
        v_cmp = self.compress_v(v_cmp_raw, cu_seqlens)
        l, d = self.config.cmp_block_size, self.config.cmp_stride
        last = block_starts(T, l, d, cu_seqlens, x.device) + l - 1
        k_cmp = apply_rope(k_cmp, position_ids[..., last], self.rope_theta)
        k_slc = apply_rope(k_slc, position_ids, self.rope_theta)
        k_win = k_slc if self.shared_kv else apply_rope(k_win, position_ids, self.rope_theta)
        gates = torch.sigmoid(self.g_proj(x)).view(B, T, HQ, 3)
        return q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got {shape}")
        B, T, _ = x.shape
        o = dispatch.native_sparse_attention(
            *self.project(x, cu_seqlens, position_ids), config=self.config, cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        return self.o_proj(o.reshape(B, T, -1))
