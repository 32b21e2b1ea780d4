"""Lower bounds on the NSA kernels' GPU time from work and traffic counts (no GPU needed): what the issue's speed
targets would take, branch by branch, against a dense causal attention measured on the same card.

Counts are exact sums over query positions for one sequence (B=1) with the paper geometry. Per branch:
  cmp     attention over the t/d visible compressed tokens (Eq. 7): 2*HQ*sum(n_cmp)*(Dk+Dv) flops
  top-n   the q.k_cmp recomputation of the selection kernel: 2*HQ*sum(n_cmp)*Dk flops
  slc     the selected tokens: 2*HQ*sum(n_slc)*(Dk+Dv) flops, and HKV*sum(n_slc)*(Dk+Dv)*bytes of K/V read per
          position with no reuse between positions (random selections; each KV group loads its blocks once for
          its G heads)
  win     2*HQ*sum(min(t+1, w))*(Dk+Dv) flops
Time at peak = max(flops / peak tensor flops, bytes / peak HBM bandwidth), per branch; the backward takes 2.5x the
forward's flops (two products per forward product plus the recomputed scores), and the selected branch's backward
reads its K/V twice (dQ pass and dK/dV pass) and its queries and output gradients once per (position, block).

    python benchmarks/gpu_bounds.py [--T 65536] [--dense-fwd-ms 326.85 --dense-bwd-ms 966.84]
        [--tflops 989 --tbps 4.8]       # H100/H200 SXM data-sheet peaks: dense bf16 tensor TFLOP/s, HBM TB/s
"""
from __future__ import annotations

import argparse

import nsa


def counts(T: int, cfg: nsa.NSAConfig) -> dict:
    """Sums over query positions t = 0..T-1 of the keys each branch attends to."""
    l, d, lp, w, n = (cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size, cfg.window_size, cfg.num_selected)
    n_cmp = sum((t - l + 1) // d + 1 for t in range(l - 1, T))
    n_slc = 0
    for t in range(T):  # min(n, own + 1) blocks, the own block only up to t
        own = t // lp
        n_slc += (min(n, own + 1) - 1) * lp + (t - own * lp + 1)
    n_win = sum(min(t + 1, w) for t in range(T))
    return dict(cmp=n_cmp, slc=n_slc, win=n_win, dense=T * (T + 1) // 2)


def bounds(T, HQ, HKV, Dk, Dv, cfg, tflops, tbps, elt=2) -> dict:
    c = counts(T, cfg)
    G = HQ // HKV
    peak_f, peak_b = tflops * 1e12, tbps * 1e12
    ms = lambda flops, nbytes=0: 1e3 * max(flops / peak_f, nbytes / peak_b)  # noqa: E731
    slc_kv = HKV * c["slc"] * (Dk + Dv) * elt
    pairs = HKV * T * cfg.num_selected  # (position, block) pairs per KV head group
    fwd = dict(cmp=ms(2 * HQ * c["cmp"] * (Dk + Dv)), topn=ms(2 * HQ * c["cmp"] * Dk),
               slc=ms(2 * HQ * c["slc"] * (Dk + Dv), slc_kv), win=ms(2 * HQ * c["win"] * (Dk + Dv)))
    bwd = dict(cmp=2.5 * fwd["cmp"], slc=ms(5 * HQ * c["slc"] * (Dk + Dv), 2 * slc_kv + pairs * G * (Dk + Dv) * elt),
               win=2.5 * fwd["win"])
    return dict(counts=c, fwd=fwd, bwd=bwd, fwd_total=sum(fwd.values()), bwd_total=sum(bwd.values()),
                slc_kv_gb=slc_kv / 1e9, dense_fwd=ms(2 * HQ * c["dense"] * (Dk + Dv)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--heads", default="64,4,192,128", help="HQ,HKV,Dk,Dv")
    ap.add_argument("--tflops", type=float, default=989.0)
    ap.add_argument("--tbps", type=float, default=4.8)
    ap.add_argument("--dense-fwd-ms", type=float, default=326.85, help="measured dense forward (H200 run, 64k)")
    ap.add_argument("--dense-bwd-ms", type=float, default=966.84, help="measured dense backward (H200 run, 64k)")
    args = ap.parse_args(argv)
    HQ, HKV, Dk, Dv = (int(x) for x in args.heads.split(","))
    b = bounds(args.T, HQ, HKV, Dk, Dv, nsa.NSAConfig(), args.tflops, args.tbps)
    print(f"T={args.T} HQ={HQ} HKV={HKV} Dk={Dk} Dv={Dv}, paper geometry, peaks {args.tflops:g} TFLOP/s and "
          f"{args.tbps:g} TB/s")
    print("keys attended, summed over positions: " + ", ".join(f"{k} {v:,}" for k, v in b["counts"].items()))
    print(f"selected K/V read per forward (no reuse): {b['slc_kv_gb']:.1f} GB")
    print("forward  ms at peak: " + ", ".join(f"{k} {v:.2f}" for k, v in b["fwd"].items())
          + f"; total {b['fwd_total']:.2f} -> at most {args.dense_fwd_ms / b['fwd_total']:.1f}x the measured dense "
          f"{args.dense_fwd_ms} ms (dense at peak: {b['dense_fwd']:.1f} ms)")
    print("backward ms at peak: " + ", ".join(f"{k} {v:.2f}" for k, v in b["bwd"].items())
          + f"; total {b['bwd_total']:.2f} -> at most {args.dense_bwd_ms / b['bwd_total']:.1f}x the measured dense "
          f"{args.dense_bwd_ms} ms")
    return b


if __name__ == "__main__":
    main()
