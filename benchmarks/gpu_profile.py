"""Kernel-level profile of the Triton NSA backend on one GPU: where the time of a forward, a forward+backward and a
decode step goes, kernel by kernel, and how long the GPU sits idle (host overhead: Python, launches, allocations,
device synchronisations).

    python benchmarks/gpu_profile.py [--lengths 4096,65536] [--decode 65536] [--out benchmarks/results/gpu_profile]
    TRITON_INTERPRET=1 python benchmarks/gpu_profile.py --cpu-smoke     # script check on CPU (CPU ops, no kernels)

Cases: the paper config (B=1, HQ=64, HKV=4, Dk=192, Dv=128, bf16, paper geometry) through
`native_sparse_attention(backend="triton")`, forward (inputs requiring grad, as in training) and forward+backward,
the Triton decode step (`triton_decode`, eager) at batch 1 and 16, and a whole layer's eager decode step (hidden
2560, projections, cache append and the decode kernels) at batch 1. Each case: one untimed warm-up (compilation,
autotuning), `--iters` host-timed iterations (synchronised wall clock), then `--iters` iterations under
`torch.profiler`. Per iteration: wall ms, GPU-busy ms (sum of the kernel times; one stream, so they do not
overlap), idle share 1 - busy / wall, and the kernels by GPU time with their launches per iteration. Then one more
iteration as a timeline: every kernel in launch order with its duration and the idle gap before it.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import gpu_decode  # noqa: E402  (this folder: the decode benchmark's filled layer cache)
import gpu_suite  # noqa: E402  (this folder: the same random inputs as the suite)
import nsa  # noqa: E402
from nsa.ops.triton_decode import triton_decode  # noqa: E402

TOP = 14  # kernels listed per case
TIMELINE_ROWS = 120  # launches listed per case in the markdown (all of them in the JSON)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_table(prof, iters: int, device: str) -> list[dict]:
    """[(name, ms per iteration, launches per iteration)] by GPU time: the profiled kernels (CUDA), or the CPU ops
    without children's time on a CPU smoke run."""
    total, count = defaultdict(float), defaultdict(int)
    for evt in prof.events():
        if device == "cuda":
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.time_range.elapsed_us()
        else:
            us = evt.self_cpu_time_total
        total[evt.name] += us
        count[evt.name] += 1
    rows = [dict(kernel=name[:100], ms=total[name] / 1e3 / iters, launches=count[name] / iters) for name in total]
    return sorted(rows, key=lambda r: -r["ms"])


def timeline(prof) -> list[dict]:
    """The kernels of one profiled iteration in launch order: name, start (ms from the first kernel), duration and
    the idle gap before it (ms). Names alone merge e.g. the compressed and window kernels (same Triton function);
    the order tells them apart, and the gaps show where the host stalls the GPU."""
    evts = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    rows, end = [], None
    t0 = evts[0].time_range.start if evts else 0
    for e in evts:
        start, stop = e.time_range.start, e.time_range.end
        rows.append(dict(kernel=e.name[:80], start_ms=(start - t0) / 1e3, ms=(stop - start) / 1e3,
                         gap_ms=0.0 if end is None else max(0.0, (start - end) / 1e3)))
        end = stop if end is None else max(end, stop)
    return rows


def profile_case(name: str, fn, iters: int, device: str) -> dict:
    fn()  # warm-up: compilation and autotuning stay out of the numbers
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    wall = (time.perf_counter() - t0) * 1e3 / iters
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    rows = kernel_table(prof, iters, device)
    with profile(activities=acts) as one:
        fn()
        sync(device)
    order = timeline(one) if device == "cuda" else []
    busy = sum(r["ms"] for r in rows) if device == "cuda" else float("nan")
    launches = sum(r["launches"] for r in rows) if device == "cuda" else float("nan")
    res = dict(case=name, wall_ms=wall, gpu_busy_ms=busy, idle_share=1 - busy / wall if wall else float("nan"),
               launches=launches, kernels=rows[:TOP], timeline=order)
    print(f"\n## {name}: wall {wall:.3f} ms, GPU busy {busy:.3f} ms, idle {res['idle_share']:.0%}, "
          f"{launches:.0f} launches", flush=True)
    for r in rows[:TOP]:
        print(f"  {r['ms']:9.3f} ms  x{r['launches']:<6.1f} {r['kernel']}", flush=True)
    return res


def decode_inputs(S, B, HQ, HKV, Dk, Dv, cfg, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    tc = cfg.num_compressed(S)
    args = (rnd(B, 1, HQ, Dk), rnd(B, tc, HKV, Dk), rnd(B, tc, HKV, Dv), rnd(B, S, HKV, Dk), rnd(B, S, HKV, Dv))
    args = args + args[3:] + (torch.rand(B, 1, HQ, 3, generator=g, device=device).to(dtype),)
    return args, torch.full((B,), S, dtype=torch.long, device=device)


def markdown(res: dict) -> str:
    lines = [f"# Kernel profile: {res['device']}", "", res["setup"], ""]
    for c in res["cases"]:
        lines += [f"## {c['case']}", "",
                  f"wall {c['wall_ms']:.3f} ms/iteration, GPU busy {c['gpu_busy_ms']:.3f} ms, idle "
                  f"{c['idle_share']:.0%}, {c['launches']:.0f} launches", "",
                  "| kernel | ms/iter | launches/iter |", "|---|---|---|"]
        lines += [f"| `{r['kernel']}` | {r['ms']:.3f} | {r['launches']:.1f} |" for r in c["kernels"]]
        lines.append("")
        if c.get("timeline"):
            lines += ["One iteration in launch order (ms):", "", "| # | kernel | start | duration | idle before |",
                      "|---|---|---|---|---|"]
            lines += [f"| {i} | `{r['kernel']}` | {r['start_ms']:.3f} | {r['ms']:.3f} | {r['gap_ms']:.3f} |"
                      for i, r in enumerate(c["timeline"][:TIMELINE_ROWS])]
            if len(c["timeline"]) > TIMELINE_ROWS:
                lines.append(f"| ... | {len(c['timeline']) - TIMELINE_ROWS} more | | | |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,65536", help="prefill lengths (forward and forward+backward)")
    ap.add_argument("--decode", default="65536", help="decode contexts (batch 1 and 16)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=2560, help="hidden size of the layer decode step")
    ap.add_argument("--out", default="benchmarks/results/gpu_profile")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via the Triton interpreter")
    args = ap.parse_args(argv)
    cfg = nsa.NSAConfig()
    if args.cpu_smoke:
        device, dtype, args.iters = "cpu", torch.float16, 1
        heads, lengths, contexts, batches = dict(HQ=4, HKV=2, Dk=24, Dv=16), [100], [300], [1, 2]
        args.hidden = 32
        cfg = nsa.NSAConfig(window_size=128, num_selected=4)
        out = None
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_profile.py needs a CUDA GPU (or --cpu-smoke)")
        device, dtype = "cuda", torch.bfloat16
        heads = dict(HQ=64, HKV=4, Dk=192, Dv=128)
        lengths = [int(t) for t in args.lengths.split(",") if t]
        contexts, batches = [int(s) for s in args.decode.split(",") if s], [1, 16]
        out = args.out
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run (Triton interpreter)"
    setup = (f"torch {torch.__version__}; HQ={heads['HQ']} HKV={heads['HKV']} Dk={heads['Dk']} Dv={heads['Dv']}, "
             f"{str(dtype)[6:]}, l={cfg.cmp_block_size} d={cfg.cmp_stride} l'={cfg.slc_block_size} "
             f"n={cfg.num_selected} w={cfg.window_size}; {args.iters} profiled iterations per case.")
    print(f"# {card}\n# {setup}", flush=True)
    cases = []
    for T in lengths:
        gpu_suite.DEVICE = device
        x = gpu_suite.inputs(T, **heads, cfg=cfg, dtype=dtype)

        def fwd():
            return nsa.native_sparse_attention(*x, config=cfg, backend="triton")

        do = torch.randn_like(fwd())
        cases.append(profile_case(f"forward T={T}", fwd, args.iters, device))
        cases.append(profile_case(f"forward+backward T={T}", lambda: fwd().backward(do), args.iters, device))
        del x, do
        if device == "cuda":
            torch.cuda.empty_cache()
    for S in contexts:
        for B in batches:
            dargs, lens = decode_inputs(S, B, **heads, cfg=cfg, device=device, dtype=dtype)
            with torch.no_grad():
                cases.append(profile_case(
                    f"decode S={S} B={B} (eager)",
                    lambda: triton_decode(*dargs, lengths=lens, config=cfg, max_len=S), args.iters, device))
            del dargs
        layer, cache = gpu_decode.filled_layer(args.hidden, heads["HQ"], heads["HKV"], heads["Dk"], heads["Dv"], 1, S,
                                               S + 1024, dtype, device, cfg)
        x1 = torch.randn(1, 1, args.hidden, device=device, dtype=dtype)
        with torch.no_grad():
            cases.append(profile_case(f"layer decode step S={S} B=1 (eager, projections and cache included)",
                                      lambda: layer(x1, cache=cache, layer_idx=0), args.iters, device))
        del layer, cache
    res = dict(benchmark="gpu_profile", device=card, setup=setup, cases=cases)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".json").write_text(json.dumps(res, indent=1))
        Path(out + ".md").write_text(markdown(res))
        print(f"wrote {out}.json, {out}.md")
    return res


if __name__ == "__main__":
    main()
