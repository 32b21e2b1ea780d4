"""CPU decode-step benchmark: NSA decode attention over an NSA cache vs SDPA with one query over the dense cache.

Both sides time the attention of one new token per sequence given a filled cache (projections and the cache
append are the same for both and excluded). NSA uses the torch decode (`nsa.ops.decode.torch_decode`: the
compiled CPU kernel `decode_fwd`, which reads the caches in place, float32 or bfloat16 / float16 converted on the
way; `nsa_vectorised_ms` times its pure-PyTorch gather path, what machines without a compiler run) with the paper
geometry (l=32, d=16, l'=64, n=16, w=512); dense uses `F.scaled_dot_product_attention` with the G query heads of a
KV group folded into the query axis (q [B, HKV, G, Dk] against k [B, HKV, S, Dk], no mask: for a single new token
this is exactly its causal attention, and no K/V head is expanded), in the same dtype. Default heads: one KV group
of the paper's model (G = 16, Dk = 192, Dv = 128), float32. With one KV head the NSA selection cache and the dense
cache are the same tensor (the layouts [B, S, 1, D] and [B, 1, S, D] coincide), and the window reads it too
(shared K/V).

    python benchmarks/cpu_decode.py [--contexts 8192,...] [--batches 1,16] [--repeats 5]

Prints a table and writes benchmarks/results/cpu_decode.json. Speedups are ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import nsa
from nsa.ops import decode
from nsa.ops.decode import torch_decode


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run(contexts, batches, HQ, HKV, Dk, Dv, dtype, repeats, seed=0):
    cfg = nsa.NSAConfig()
    rows = []
    g = torch.Generator().manual_seed(seed)
    for B in batches:
        for S in contexts:
            tc = cfg.num_compressed(S)
            k = torch.randn(B, S, HKV, Dk, generator=g, dtype=dtype)
            v = torch.randn(B, S, HKV, Dv, generator=g, dtype=dtype)
            k_cmp = torch.randn(B, tc, HKV, Dk, generator=g, dtype=dtype)
            v_cmp = torch.randn(B, tc, HKV, Dv, generator=g, dtype=dtype)
            q = torch.randn(B, 1, HQ, Dk, generator=g, dtype=dtype)
            gates = torch.rand(B, 1, HQ, 3, generator=g, dtype=dtype)
            lengths = torch.full((B,), S, dtype=torch.long)
            # dense layout [B, HKV, S, D]: a view of the same memory when HKV = 1, a copy otherwise
            kd, vd = k.transpose(1, 2), v.transpose(1, 2)
            if HKV > 1:
                kd, vd = kd.contiguous(), vd.contiguous()
            qd = q[:, 0].reshape(B, HKV, HQ // HKV, Dk)  # the group's heads as G query rows

            def dense():
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)

            def sparse():
                return torch_decode(q, k_cmp, v_cmp, k, v, k, v, gates, lengths=lengths, config=cfg)

            with torch.no_grad():
                t_dense = median_ms(dense, repeats)
                t_nsa = median_ms(sparse, repeats)
                decode.USE_FUSED_DECODE = False
                try:
                    t_vec = median_ms(sparse, repeats)
                finally:
                    decode.USE_FUSED_DECODE = True
            bound = nsa.decode_memory_access(S, cfg)["ratio"]
            rows.append(dict(context=S, batch=B, dense_ms=t_dense, nsa_ms=t_nsa, speedup=t_dense / t_nsa,
                             nsa_vectorised_ms=t_vec, speedup_vectorised=t_dense / t_vec, memory_bound=bound))
            r = rows[-1]
            print(f"{S:>8} {B:>5} {t_dense:>10.3f} {t_nsa:>10.3f} {r['speedup']:>8.2f}x {t_vec:>10.3f} "
                  f"{r['speedup_vectorised']:>8.2f}x {bound:>8.2f}x", flush=True)
            del k, v, kd, vd, k_cmp, v_cmp
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--dk", type=int, default=192)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_decode.json"))
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"# CPU decode step, attention only: NSA torch decode vs SDPA (one query, dense cache)\n# {info}")
    print(f"# HQ={args.heads} HKV={args.kv_heads} Dk={args.dk} Dv={args.dv} {args.dtype}, paper geometry; "
          f"median of {args.repeats}")
    print(f"{'context':>8} {'batch':>5} {'dense ms':>10} {'nsa ms':>10} {'speedup':>9} {'vect. ms':>10} "
          f"{'speedup':>9} {'mem bound':>9}")
    rows = run(contexts, batches, args.heads, args.kv_heads, args.dk, args.dv, dtype, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(benchmark="cpu_decode", machine=info, heads=args.heads, kv_heads=args.kv_heads,
                                   dk=args.dk, dv=args.dv, dtype=args.dtype, repeats=args.repeats,
                                   config=nsa.NSAConfig().__dict__, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
