"""CPU benchmark of the "torch" NSA backend against SDPA causal on the same tensors, in the same run.

B=1, HQ=16, HKV=4, D=64, paper geometry (l=32, d=16, l'=64, n=16, w=512), fp32. For each T: forward time,
forward+backward time (each after one untimed warm-up call), and the peak extra memory of a forward (RSS
high-water mark above the inputs, each measurement in a fresh subprocess). Plus a decode-shaped row: one query at position T-1 over a 64k context
(NSA via `torch_backend.native_sparse_attention_tail`, which runs `decode.torch_decode` for such short tails)
against SDPA with that one query over the dense context.
Ratios are SDPA time / NSA time (> 1: NSA faster) and NSA memory / SDPA memory. Prints a table and writes JSON
and Markdown. Timings are wall-clock medians; nothing here asserts a speed.

    python benchmarks/cpu_suite.py [--T 4096 8192 ...] [--out benchmarks/results/cpu_<tag>]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import nsa
from nsa.ops import cpu_kernels
from nsa.ops import torch_backend as tb

HQ, HKV, D = 16, 4, 64
CFG = nsa.NSAConfig()  # paper geometry


def make(T, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Tc = CFG.num_compressed(T)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    q = rnd(1, T, HQ, D)
    kc, vc = rnd(1, Tc, HKV, D), rnd(1, Tc, HKV, D)
    ks, vs, kw, vw = (rnd(1, T, HKV, D) for _ in range(4))
    gates = torch.sigmoid(torch.randn(1, T, HQ, 3, generator=g)).requires_grad_(requires_grad)
    return q, kc, vc, ks, vs, kw, vw, gates


def run_nsa(x):
    return tb.native_sparse_attention(*x, config=CFG)


def run_sdpa(x):
    q, _, _, k, v, *_ = x  # dense attention over the slc keys/values
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return o.transpose(1, 2)


IMPLS = {"nsa": run_nsa, "sdpa": run_sdpa}


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def time_forward(impl, T, repeat):
    x = make(T)
    with torch.no_grad():
        IMPLS[impl](x)  # warm-up (first-touch page faults, one-time setup), same for both impls
        return timed(lambda: IMPLS[impl](x), repeat)


def time_fwd_bwd(impl, T, repeat):
    x = make(T, requires_grad=True)
    do = torch.randn(1, T, HQ, D, generator=torch.Generator().manual_seed(1))

    def step():
        for t in x:
            t.grad = None
        IMPLS[impl](x).backward(do)

    step()  # warm-up, as in time_forward
    return timed(step, repeat)[0]


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def peak_child(impl, T):
    """Runs in a fresh process: MiB of RSS high-water mark added by one no-grad forward above the inputs.

    Linux: the high-water mark is reset after the inputs exist (clear_refs 5), so import-time peaks do not hide
    the op's; elsewhere falls back to ru_maxrss."""
    x = make(T)
    if impl == "nsa":
        cpu_kernels.load()  # loading the compiled kernels is a one-time cost, not the op's memory
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, hwm = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        base, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, \
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        IMPLS[impl](x)
    return (hwm() - base) / 1024


def peak_memory(impl, T):
    cmd = [sys.executable, __file__, "--child-peak", impl, str(T)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def decode_row(T, repeat):
    x = make(T)
    q, kc, vc, ks, vs, kw, vw, gates = x
    ql, gl = q[:, -1:], gates[:, -1:]
    with torch.no_grad():
        t_nsa, o_nsa = timed(lambda: tb.native_sparse_attention_tail(ql, kc, vc, ks, vs, kw, vw, gl, config=CFG), repeat)
        t_sdpa, _ = timed(lambda: F.scaled_dot_product_attention(
            ql.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), enable_gqa=True), repeat)
        # check: the tail op equals the last row of the full forward (only where that is affordable)
        tail_err = None
        if T <= 16384:
            tail_err = (run_nsa(x)[:, -1:] - o_nsa).abs().max().item()
    return t_nsa, t_sdpa, tail_err


def machine():
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg": os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--bwd-T", type=int, nargs="*", default=None, help="T values for fwd+bwd (default: all --T)")
    ap.add_argument("--mem-T", type=int, nargs="*", default=None, help="T values for peak memory (default: all --T)")
    ap.add_argument("--decode-T", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats below 16k (one above)")
    ap.add_argument("--out", default="benchmarks/results/cpu_latest")
    ap.add_argument("--child-peak", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peak:
        print(peak_child(args.child_peak[0], int(args.child_peak[1])))
        return
    bwd_T = args.T if args.bwd_T is None else args.bwd_T
    mem_T = args.T if args.mem_T is None else args.mem_T
    info = machine()
    print(f"machine: {info}")
    time_forward("nsa", 1024, 1), time_forward("sdpa", 1024, 1)  # warm-up
    rows = []
    for T in args.T:
        rep = args.repeat if T < 16384 else 1
        row = {"T": T}
        row["fwd_nsa_s"], _ = time_forward("nsa", T, rep)
        row["fwd_sdpa_s"], _ = time_forward("sdpa", T, rep)
        if T in bwd_T:
            row["fwdbwd_nsa_s"] = time_fwd_bwd("nsa", T, rep)
            row["fwdbwd_sdpa_s"] = time_fwd_bwd("sdpa", T, rep)
        if T in mem_T:
            row["peak_nsa_mib"] = peak_memory("nsa", T)
            row["peak_sdpa_mib"] = peak_memory("sdpa", T)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dec = {"T": args.decode_T}
    dec["nsa_s"], dec["sdpa_s"], dec["tail_vs_full_max_abs"] = decode_row(args.decode_T, 20)
    info["load_avg_end"] = os.getloadavg()
    result = {"machine": info, "config": {"B": 1, "HQ": HQ, "HKV": HKV, "D": D, "dtype": "float32",
                                          "nsa": CFG.__dict__, "sdpa": "causal, enable_gqa=True"},
              "rows": rows, "decode": dec}

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    def sec(x):
        return f"{x:.3f}" if x is not None else "-"

    def mib(x):
        return f"{x:.0f}" if x is not None else "-"

    lines = ["| T | fwd NSA (s) | fwd SDPA (s) | fwd speed-up | fwd+bwd NSA (s) | fwd+bwd SDPA (s) | fwd+bwd speed-up "
             "| peak fwd NSA (MiB) | peak fwd SDPA (MiB) | memory ratio |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['T']} | {sec(r['fwd_nsa_s'])} | {sec(r['fwd_sdpa_s'])} | {ratio(r['fwd_sdpa_s'], r['fwd_nsa_s'])} "
            f"| {sec(r.get('fwdbwd_nsa_s'))} | {sec(r.get('fwdbwd_sdpa_s'))} "
            f"| {ratio(r.get('fwdbwd_sdpa_s'), r.get('fwdbwd_nsa_s'))} "
            f"| {mib(r.get('peak_nsa_mib'))} | {mib(r.get('peak_sdpa_mib'))} "
            f"| {ratio(r.get('peak_nsa_mib'), r.get('peak_sdpa_mib'))} |")
    lines.append("")
    lines.append(f"Decode (one query at position {dec['T'] - 1} over {dec['T']} keys): NSA {dec['nsa_s'] * 1e3:.2f} ms, "
                 f"SDPA {dec['sdpa_s'] * 1e3:.2f} ms, speed-up {dec['sdpa_s'] / dec['nsa_s']:.2f}x")
    lines.append("")
    lines.append(f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} "
                 f"threads); load average at start {tuple(round(x, 2) for x in info['load_avg'])}, at end "
                 f"{tuple(round(x, 2) for x in info['load_avg_end'])}.")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
