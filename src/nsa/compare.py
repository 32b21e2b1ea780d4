"""`nsa compare`: NSA against dense attention on random inputs (agreement, sparsity, timing)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .config import NSAConfig
from .ops import dispatch
from .ops.varlen import num_compressed_total


def _dense(q, k, v):
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def _timed(fn, repeats=2):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats


def attended_keys(T: int, config: NSAConfig) -> float:
    """Mean number of distinct keys (cmp tokens + selected + window) a query reads, vs t+1 for dense."""
    l, d, lp, n, w = (config.cmp_block_size, config.cmp_stride, config.slc_block_size, config.num_selected,
                      config.window_size)
    t = torch.arange(T, dtype=torch.float64)
    cmp = torch.clamp(torch.div(t - l + 1, d, rounding_mode="floor") + 1, min=0)
    slc = torch.minimum(torch.full_like(t, n * lp), t + 1)
    win = torch.minimum(torch.full_like(t, w), t + 1)
    return float((cmp + slc + win).mean())


def run_compare(seqlen: int = 2048, heads: int = 16, kv_heads: int = 4, head_dim: int = 64, seed: int = 0,
                backends: list[str] | None = None) -> list[dict]:
    """Print and return one row per backend: NSA vs dense SDPA on the same random q/k/v."""
    torch.manual_seed(seed)
    config = NSAConfig()
    B, T = 1, seqlen
    q = torch.randn(B, T, heads, head_dim)
    k, v = torch.randn(B, T, kv_heads, head_dim), torch.randn(B, T, kv_heads, head_dim)
    Tc = num_compressed_total(T, None, config.cmp_block_size, config.cmp_stride)
    k_cmp, v_cmp = torch.randn(B, Tc, kv_heads, head_dim), torch.randn(B, Tc, kv_heads, head_dim)
    gates = torch.sigmoid(torch.randn(B, T, heads, 3))
    dense, t_dense = _timed(lambda: _dense(q, k, v))
    # with only the selection gate open and n*l' >= T, NSA must reproduce dense attention exactly
    full_cfg = NSAConfig(num_selected=max(16, -(-T // 64)))
    slc_only = torch.zeros_like(gates)
    slc_only[..., 1] = 1.0
    rows = []
    for name in backends or [b for b in dispatch.available_backends() if b != "triton" or q.is_cuda]:
        run = lambda: dispatch.native_sparse_attention(q, k_cmp, v_cmp, k, v, k, v, gates, config=config,
                                                       backend=name)
        out, t_nsa = _timed(run, repeats=1 if name == "reference" else 2)
        exact = dispatch.native_sparse_attention(q, k_cmp, v_cmp, k, v, k, v, slc_only, config=full_cfg,
                                                 backend=name)
        rows.append(dict(backend=name, T=T, max_err_vs_dense_when_full=float((exact - dense).abs().max()),
                         rel_diff_vs_dense=float((out - dense).norm() / dense.norm()),
                         keys_per_query=attended_keys(T, config), dense_keys_per_query=(T + 1) / 2,
                         nsa_ms=1e3 * t_nsa, dense_ms=1e3 * t_dense, finite=bool(torch.isfinite(out).all())))
    header = f"{'backend':<10} {'T':>6} {'exact-mode err':>14} {'rel diff':>9} {'keys/query':>15} {'NSA ms':>9} {'SDPA ms':>9}"
    print(f"NSA vs dense causal SDPA, B=1 HQ={heads} HKV={kv_heads} D={head_dim}, paper geometry, fp32, CPU threads="
          f"{torch.get_num_threads()}")
    print(header)
    for r in rows:
        print(f"{r['backend']:<10} {r['T']:>6} {r['max_err_vs_dense_when_full']:>14.2e} {r['rel_diff_vs_dense']:>9.3f} "
              f"{r['keys_per_query']:>7.0f}/{r['dense_keys_per_query']:<7.0f} {r['nsa_ms']:>9.1f} {r['dense_ms']:>9.1f}")
    print("exact-mode err: max |NSA - dense| with only the selection gate open and n*l' >= T (must be ~1e-6).")
    print("rel diff: NSA (all three branches, random gates) is a different function from dense, by design.")
    return rows
