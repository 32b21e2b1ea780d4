"""nsa: Native Sparse Attention (Yuan et al. 2025, arXiv 2502.11089) in PyTorch and Triton."""
from .config import NSAConfig, num_compressed_tokens
from .compression import COMPRESSORS, make_compressor
from .layer import NativeSparseAttention
from .cache import NSACache
from .decode_stats import decode_memory_access
from .padding import cu_seqlens_from_position_ids, pad_input, unpad_input
from .ops.varlen import compressed_cu_seqlens
from .ops.dispatch import (
    available_backends,
    compressed_attention,
    decode_attention,
    native_sparse_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)

__all__ = [
    "NSAConfig",
    "NativeSparseAttention",
    "NSACache",
    "decode_memory_access",
    "COMPRESSORS",
    "available_backends",
    "compressed_attention",
    "compressed_cu_seqlens",
    "cu_seqlens_from_position_ids",
    "decode_attention",
    "make_compressor",
    "native_sparse_attention",
    "num_compressed_tokens",
    "pad_input",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "unpad_input",
]
__version__ = "0.1.0"
