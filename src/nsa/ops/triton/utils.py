"""Host-side helpers shared by the Triton kernels: packing to the varlen layout, tile tables, launch configs.

Every kernel works on the packed layout `[Ttot, H, D]` (contiguous) plus int64 sequence offsets `cu [N+1]`.
A padded batch `[B, T, H, D]` is the packed batch of B sequences of length T (a free reshape).
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from ..varlen import compressed_cu_seqlens, host_offsets, remember_offsets  # noqa: F401 (host_offsets re-exported)


def interpreting() -> bool:
    """True when kernels run in the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(x: int, lo: int = 16) -> int:
    """Smallest power of two >= max(x, lo) (tl.dot needs tile dims that are powers of two >= 16)."""
    return max(lo, triton.next_power_of_2(max(1, int(x))))


# (num_warps, num_stages). With Triton 3.6 a loop built with 2 stages waits for its own loads at the top of each
# iteration (async_wait num=0 in the sm_90 TTGIR; `inflight` in benchmarks/triton_aot_check.py): only >= 3 stages
# keep the next tiles' loads in flight during the math. In bf16 every autotuned kernel builds without register spills
# at 8 warps (2 or 3 stages); the dK/dV kernels spill at 4 (fp32 builds spill in places: the AOT report). The
# selected-attention loops (K/V behind a block index, latency bound) get pipelined configs only.
DEFAULT_CONFIGS = ((8, 2), (4, 3), (8, 3))
PIPELINED_CONFIGS = ((4, 3), (8, 3), (4, 4))


def autotune_configs(pairs=DEFAULT_CONFIGS):
    """`pairs` (num_warps, num_stages) as the autotune list on GPU; a single config under the interpreter, and with
    NSA_TRITON_AUTOTUNE=0 (read at import; the GPU test stage sets it so each test compiles one variant per kernel
    instead of three) the first pair."""
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if os.environ.get("NSA_TRITON_AUTOTUNE") == "0":
        pairs = pairs[:1]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use IEEE dots (no silent TF32); fp16/bf16 use the tensor-core default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B*T, H, D]."""
    B, T, H, D = x.shape
    return x.contiguous().reshape(B * T, H, D)


def seq_offsets(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """int64 [N+1] offsets of the packed sequences: cu_seqlens, or 0, T, 2T, ... for a padded batch (host values
    remembered: no device read later)."""
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        return remember_offsets(cu, [i * T for i in range(B + 1)])
    cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()  # the kernels index it as a flat array
    return cu if cu is cu_seqlens else remember_offsets(cu, host_offsets(cu_seqlens))


def cmp_offsets(B: int, Tc: int, cu_seqlens: torch.Tensor | None, block_size: int, stride: int, device):
    """int64 [N+1] offsets of each sequence's compressed tokens in the packed compressed tensor."""
    if cu_seqlens is None:
        ccu = torch.arange(B + 1, device=device, dtype=torch.int64) * Tc
        return remember_offsets(ccu, [i * Tc for i in range(B + 1)])
    ccu = compressed_cu_seqlens(cu_seqlens, block_size, stride)
    return remember_offsets(ccu.to(device=device, dtype=torch.int64), host_offsets(ccu))


_TILE_TABLES: dict = {}  # (offsets, block, device) -> table: fixed shapes (training steps) build each table once
_TILE_TABLES_BYTES = 32 << 20  # the oldest tables go first past this many bytes (a table is 8 bytes per tile) ...
_TILE_TABLES_MAX = 4096  # ... or past this many tables (varlen training meets new offsets every step) ...
_CAPTURED: set = set()  # ... except those a CUDA graph captured: its replays read them, so they must stay allocated
_TILE_TABLES_LOCK = threading.Lock()  # ops may run in several threads at once


def tile_table(cu: torch.Tensor, block: int) -> torch.Tensor:
    """int32 [num_tiles, 2] of (sequence, first packed row): tiles of `block` rows that never cross a sequence.
    Built on the host from cu's host values (`host_offsets`: no device read for a padded batch) and cached, so a
    repeated shape neither rebuilds nor copies it (and a CUDA graph capture after a warm-up call finds it)."""
    bounds = host_offsets(cu)
    key = (tuple(bounds), int(block), cu.device)
    with _TILE_TABLES_LOCK:
        table = _TILE_TABLES.get(key)
        if table is None:
            table = _TILE_TABLES[key] = _build_tile_table(bounds, block, cu.device)
            total = sum(t.numel() * 4 for t in _TILE_TABLES.values())
            for old in [k for k in _TILE_TABLES if k != key and k not in _CAPTURED]:
                if total <= _TILE_TABLES_BYTES and len(_TILE_TABLES) <= _TILE_TABLES_MAX:
                    break
                total -= _TILE_TABLES.pop(old).numel() * 4
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            _CAPTURED.add(key)
    return table


def _build_tile_table(bounds: list[int], block: int, device) -> torch.Tensor:
    seqs, starts = [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e > s:
            st = torch.arange(s, e, block, dtype=torch.int32)
            starts.append(st)
            seqs.append(torch.full_like(st, n))
    if not starts:
        return torch.zeros(0, 2, dtype=torch.int32, device=device)
    return torch.stack([torch.cat(seqs), torch.cat(starts)], 1).contiguous().to(device)


def token_seq_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: the sequence each packed row belongs to."""
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=total)


def device_jit(fn):
    """@triton.jit for device helpers; a plain function under the interpreter, which otherwise re-patches
    triton.language on every helper call (most of the interpreted run time)."""
    return fn if interpreting() else triton.jit(fn)


@device_jit
def load_cols(ptrs, ok, D, LO: tl.constexpr, WIDTH: tl.constexpr):
    """Tile [rows, WIDTH] of head-dim columns LO .. LO + WIDTH - 1 (< D) of the rows at ptrs [rows] (zeros past D
    and in rows that are not ok): one of the two power-of-two pieces a head dim is loaded in."""
    offs = LO + tl.arange(0, WIDTH)
    return tl.load(ptrs[:, None] + offs[None, :], mask=ok[:, None] & (offs[None, :] < D), other=0.0)


@device_jit
def online_softmax_step(m_i, l_i, acc, s, vis, v, PREC: tl.constexpr):
    """One key tile of the flash forward: scaled log2 scores s [rows, keys] (masked by vis) and values v [keys, Dv]
    folded into the running max m_i, sum l_i and accumulator acc [rows, Dv] (fp32)."""
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@device_jit
def dq_step(dq, dq2, s, vis, lse2, delta, do, k, k2, v, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """One key tile of a dQ pass: p = exp2(s - lse2) where vis, dS = p * (dO V^T - delta), dq += dS K (and dq2 +=
    dS K2, the head dim's second piece, when SPLIT). Returns (dq, dq2); dq2 is passed through unused otherwise."""
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq += tl.dot(ds, k, input_precision=PREC)
    if SPLIT:
        dq2 += tl.dot(ds, k2, input_precision=PREC)
    return dq, dq2
