"""φ, the learnable block compressor of Eq. 7, as a small registry: "mlp" (default), "linear", "mean".

A compressor maps raw keys (or values) x [B, T, H, D] to compressed tokens [B, Tc, H, D], one per block of
l = block_size tokens taken every d = stride tokens: block i covers positions [i*d, i*d + l - 1]. φ is shared by
the KV heads. With `cu_seqlens`, blocks never straddle two sequences and the output packs each sequence's
compressed tokens in order (see `nsa.ops.varlen.compressed_cu_seqlens`).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import check_bool, check_int, num_compressed_tokens
from .ops import library
from .ops.varlen import packed_block_starts


def block_starts(seqlen: int, block_size: int, stride: int, cu_seqlens: torch.Tensor | None, device=None,
                 call_id: int = 0, anchor: torch.Tensor | None = None):
    """First packed position of every compressed block, [Tc] int64 (per sequence when packed). `call_id` (one per
    layer) and `anchor` (the layer's input): see `nsa.ops.library.packed_block_starts`."""
    if cu_seqlens is None:
        return torch.arange(num_compressed_tokens(seqlen, block_size, stride), device=device) * stride
    if torch.compiler.is_compiling():  # the offsets are read at run time: a dynamic size, no graph break
        anchor = cu_seqlens if anchor is None else anchor.detach()
        return library.packed_block_starts(cu_seqlens, block_size, stride, call_id, anchor).to(device)
    return packed_block_starts(cu_seqlens, block_size, stride, device)


def compression_blocks(x: torch.Tensor, block_size: int, stride: int, cu_seqlens=None, starts=None) -> torch.Tensor:
    """Overlapping blocks of x [B, T, H, D] -> [B, Tc, H, l, D]; `starts` (from `block_starts`) saves recomputing
    them."""
    if starts is None:
        starts = block_starts(x.shape[1], block_size, stride, cu_seqlens, x.device)
    idx = starts[:, None] + torch.arange(block_size, device=x.device)  # [Tc, l]
    # gathered straight into a contiguous [B, Tc, H, l, D], so φ's flatten is a view (no copy)
    heads = torch.arange(x.shape[2], device=x.device)
    return x[:, idx[:, None, :], heads[None, :, None]]


class Compressor(nn.Module):
    """Base class: subclasses implement `compress(blocks [B, Tc, H, l, D]) -> [B, Tc, H, D]`."""

    def __init__(self, head_dim: int, block_size: int, stride: int, position_embedding: bool = False):
        super().__init__()
        head_dim = check_int("head_dim", head_dim, 1, numpy=True)
        block_size = check_int("block_size", block_size, 1, numpy=True)
        stride = check_int("stride", stride, 1, numpy=True)
        check_bool("position_embedding", position_embedding)
        self.head_dim, self.block_size, self.stride = head_dim, block_size, stride
        # learned intra-block position embedding, added to the l tokens of a block (§3.3.1)
        self.pos_emb = nn.Parameter(torch.randn(block_size, head_dim) * 0.02) if position_embedding else None

    def reset_parameters(self) -> None:
        """Initialise again as `__init__` does (PE ~ N(0, 0.02²); subclasses: φ starts as mean pooling), the
        submodules included: for meta-device initialisation (`to_empty()`, then `reset_parameters()` or a
        post-order `module.apply`, which resets children first)."""
        with torch.no_grad():
            if self.pos_emb is not None:
                self.pos_emb.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, starts=None) -> torch.Tensor:
        """x [B, T, H, head_dim] -> [B, Tc, H, head_dim]. Checks x's rank and head dim only (static shapes: no
        cost, nothing for torch.compile/export to guard on)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, H, head_dim={self.head_dim}], got {got}")
        blocks = compression_blocks(x, self.block_size, self.stride, cu_seqlens, starts)
        if self.pos_emb is not None:
            blocks = blocks + self.pos_emb.to(blocks.dtype)
        return self.compress(blocks)

    def compress(self, blocks: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MeanCompressor(Compressor):
    """Parameter-free mean pooling of each block."""

    def __init__(self, head_dim, block_size, stride, position_embedding=False):
        super().__init__(head_dim, block_size, stride, position_embedding=False)

    def compress(self, blocks):
        return blocks.mean(dim=-2)


class LinearCompressor(Compressor):
    """A linear map of the flattened block [l*D] -> [D], initialised to mean pooling."""

    def __init__(self, head_dim, block_size, stride, position_embedding=True):
        super().__init__(head_dim, block_size, stride, position_embedding)
        self.proj = nn.Linear(block_size * head_dim, head_dim)
        self._mean_pooling()

    def _mean_pooling(self) -> None:
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.head_dim).repeat(1, self.block_size) / self.block_size)
            self.proj.bias.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._mean_pooling()

    def compress(self, blocks):
        return _per_block(blocks, self.proj)


class MLPCompressor(Compressor):
    """Mean pooling plus a two-layer MLP over the flattened block (GELU); the MLP's last layer starts at zero,
    so φ starts as mean pooling and learns from there."""

    def __init__(self, head_dim, block_size, stride, position_embedding=True, hidden: int | None = None):
        super().__init__(head_dim, block_size, stride, position_embedding)
        hidden = self.head_dim if hidden is None else check_int("hidden", hidden, 1, numpy=True)
        self.mlp = nn.Sequential(nn.Linear(block_size * head_dim, hidden), nn.GELU(), nn.Linear(hidden, head_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.mlp[0].reset_parameters()
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def compress(self, blocks):
        return blocks.mean(dim=-2) + _per_block(blocks, self.mlp)


def _per_block(blocks: torch.Tensor, layers: nn.Module) -> torch.Tensor:
    """`layers` (a Linear, or a Sequential of Linears and elementwise modules) applied to each flattened block of
    blocks [B, Tc, H, l, D] -> [B, Tc, H, out].

    Under torch.export the Linears run as products over (B, H) with the compressed tokens as columns: Linear's own
    reshape of [B, Tc, H, l*D] to rows and back makes export guard on divisibility by the derived size
    Tc = (T - l)//d + 1, which fails a dynamic T. Eagerly, one product over all rows is faster. (The export path
    reads each Linear's weight and bias: hooks or Linear subclasses with their own forward are not supported there.)"""
    x = blocks.flatten(-2)
    if not torch.compiler.is_exporting():
        return layers(x)
    B, Tc, H, K = x.shape
    cols = x.permute(0, 2, 3, 1).reshape(B * H, K, Tc)
    for m in layers if isinstance(layers, nn.Sequential) else (layers,):
        if isinstance(m, nn.Linear):
            out = torch.bmm(m.weight.expand(B * H, -1, -1), cols)
            cols = out if m.bias is None else out + m.bias[:, None]
        else:
            cols = m(cols)
    return cols.view(B, H, cols.shape[1], Tc).permute(0, 3, 1, 2).contiguous()


COMPRESSORS: dict[str, type[Compressor]] = {"mlp": MLPCompressor, "linear": LinearCompressor, "mean": MeanCompressor}


def make_compressor(name: str, head_dim: int, block_size: int, stride: int, position_embedding: bool) -> Compressor:
    """The compressor `name` (a key of COMPRESSORS) for the given geometry; ValueError naming a bad argument."""
    if not isinstance(name, str) or name not in COMPRESSORS:
        raise ValueError(f"compression must be one of {sorted(COMPRESSORS)}, got {name!r}")
    check_bool("position_embedding", position_embedding)  # "mean" ignores it
    return COMPRESSORS[name](head_dim, block_size, stride, position_embedding=position_embedding)
