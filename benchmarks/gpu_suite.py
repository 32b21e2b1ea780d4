"""GPU benchmark of the Triton NSA backend against dense causal attention (SDPA, flash backend), ~6 min on one GPU.

1. Correctness: bf16 Triton vs the reference on a small varlen case (outputs, every gradient, the selection).
   Then the compressed branch's fwd+bwd at 64k with the dK/dV kernel's own tiles vs the forward's (A/B).
2. Small-group tiles: selected attention with packed (several positions per tile) vs padded (one position, G
   rows padded to 16) query tiles, G in {1, 2, 4, 8, 16}: which wins.
3. Paper config (B=1, HQ=64, HKV=4, Dk=192, Dv=128, l=32 d=16 l'=64 n=16 w=512): fwd, bwd, fwd+bwd at
   T = 4k .. 64k, plus a per-branch forward breakdown.
4. G sweep (HQ=16, HKV in {16, 8, 4, 2, 1}, D=128) at the same lengths.

Every number is a median of CUDA-event timings measured in this run; the baseline is measured in the same run on the
same card. SDPA's flash kernel needs Dk == Dv and MHA, so the baseline gets K/V expanded to HQ heads and V
zero-padded to Dk outside the timed region (it then does slightly more work than a Dv=128 kernel would).
Writes <out>.json and <out>.md. Run via benchmarks/run_gpu_suite.sh (PYTHONPATH=src, no install).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import traceback

import torch

import nsa
from nsa.ops.varlen import num_compressed_total

DEVICE = "cuda"  # "cpu" only for --cpu-smoke (Triton interpreter, tiny shapes)
DTYPE = torch.bfloat16  # fp16 for --cpu-smoke: the interpreter's bf16 tl.dot is wrong
LENGTHS = [4096, 8192, 16384, 32768, 65536]
PAPER = dict(HQ=64, HKV=4, Dk=192, Dv=128)
G_HQ, G_SWEEP_HKV = 16, [16, 8, 4, 2, 1]


def env_info() -> dict:
    import triton

    if DEVICE != "cuda":
        return dict(card="CPU smoke run (Triton interpreter; timings meaningless)", capability="", memory_gib=0,
                    torch=torch.__version__, triton=triton.__version__, cuda=None, python=platform.python_version(),
                    commit="", date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    props = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - no git on the box is fine
        commit = ""
    return dict(card=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), commit=commit,
                date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def inputs(T, HQ, HKV, Dk, Dv, cfg, dtype=None, cu=None, seed=0):
    """q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates on the GPU with requires_grad (random, never zeros)."""
    dtype = DTYPE if dtype is None else dtype
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    Tc = num_compressed_total(T, cu, cfg.cmp_block_size, cfg.cmp_stride)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype).requires_grad_()

    x = [rnd(1, T, HQ, Dk), rnd(1, Tc, HKV, Dk), rnd(1, Tc, HKV, Dv), rnd(1, T, HKV, Dk), rnd(1, T, HKV, Dv),
         rnd(1, T, HKV, Dk), rnd(1, T, HKV, Dv)]
    gates = torch.sigmoid(torch.randn(1, T, HQ, 3, generator=g, device=DEVICE)).to(dtype).requires_grad_()
    return x + [gates]


def cuda_time(fn, reps, warmup=1, setup=None) -> float:
    """Median milliseconds of fn() over reps (CUDA events); setup() runs untimed before each call."""
    times = []
    for i in range(warmup + reps):
        state = setup() if setup else None
        if DEVICE != "cuda":  # --cpu-smoke: wall clock, only to exercise the code path
            t = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - t) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_fwd_bwd(forward, grads_of, reps) -> dict:
    """fwd (graph built), bwd (after an untimed fwd), fwd+bwd, in ms."""
    out = {}
    probe = forward()
    do = torch.randn_like(probe)
    del probe
    out["fwd"] = cuda_time(lambda _: forward(), reps)
    out["bwd"] = cuda_time(lambda o: o.backward(do), reps, setup=forward)
    out["fwd_bwd"] = cuda_time(lambda _: forward().backward(do), reps)
    for x in grads_of:
        x.grad = None
    return out


def dense_baseline(T, HQ, HKV, Dk, Dv, reps) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=DEVICE).manual_seed(1)
    dtype = DTYPE
    D = max(Dk, Dv)
    q = torch.randn(1, HQ, T, Dk, generator=g, device=DEVICE, dtype=dtype)
    k = torch.randn(1, HKV, T, Dk, generator=g, device=DEVICE, dtype=dtype)
    v = torch.randn(1, HKV, T, Dv, generator=g, device=DEVICE, dtype=dtype)
    G = HQ // HKV
    k = k.repeat_interleave(G, 1)
    v = torch.nn.functional.pad(v.repeat_interleave(G, 1), (0, D - Dv))
    q = torch.nn.functional.pad(q, (0, D - Dk)).requires_grad_()
    k = torch.nn.functional.pad(k, (0, D - Dk)).requires_grad_()
    v = v.requires_grad_()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH):
        res = time_fwd_bwd(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                           (q, k, v), reps)
    del q, k, v
    return res


def nsa_case(T, HQ, HKV, Dk, Dv, cfg, reps) -> dict:
    x = inputs(T, HQ, HKV, Dk, Dv, cfg)
    res = time_fwd_bwd(lambda: nsa.native_sparse_attention(*x, config=cfg, backend="triton"), x, reps)
    del x
    return res


def branch_breakdown(T, HQ, HKV, Dk, Dv, cfg, reps) -> dict:
    """Forward ms of each stage under no_grad: cmp attention, top-n, selected, window, gate combine."""
    from nsa.ops import triton as tb
    from nsa.ops.triton.combine import combine_fwd
    from nsa.ops.triton.flash import masked_attention_fwd
    from nsa.ops.triton.selection import selected_fwd
    from nsa.ops.triton.utils import cmp_offsets, seq_offsets

    x = [t.detach() for t in inputs(T, HQ, HKV, Dk, Dv, cfg)]
    q, kc, vc, ks, vs, kw, vw, gates = x
    out = {}
    with torch.no_grad():
        cu = seq_offsets(1, T, None, q.device)
        ccu = cmp_offsets(1, kc.shape[1], None, cfg.cmp_block_size, cfg.cmp_stride, q.device)
        sc = Dk ** -0.5
        qp, kcp = q[0], kc[0]
        l, d, lp, w = cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size, cfg.window_size
        o_c, lse = masked_attention_fwd(qp, kcp, vc[0], cu, ccu, 1, sc, 1, l, d)
        out["cmp"] = cuda_time(lambda _: masked_attention_fwd(qp, kcp, vc[0], cu, ccu, 1, sc, 1, l, d), reps)
        out["topn"] = cuda_time(lambda _: tb.topn_from_lse(qp, kcp, lse, cu, ccu, config=cfg, scale=sc), reps)
        idx = tb.topn_from_lse(qp, kcp, lse, cu, ccu, config=cfg, scale=sc)
        out["slc"] = cuda_time(lambda _: selected_fwd(qp, ks[0], vs[0], idx, cu, lp, sc), reps)
        out["win"] = cuda_time(lambda _: masked_attention_fwd(qp, kw[0], vw[0], cu, cu, 0, sc, w, 1, 1), reps)
        o_s = selected_fwd(qp, ks[0], vs[0], idx, cu, lp, sc)[0]
        rows = [x.reshape(-1, Dv) for x in (o_c, o_s, o_c)]
        out["combine"] = cuda_time(lambda _: combine_fwd(*rows, gates[0].reshape(-1, 3)), reps)
    return out


def branch_breakdown_fwd_bwd(T, HQ, HKV, Dk, Dv, cfg, reps) -> dict:
    """fwd+bwd ms of each branch op alone (public ops, triton backend; selection indices precomputed)."""
    x = inputs(T, HQ, HKV, Dk, Dv, cfg)
    q, kc, vc, ks, vs, kw, vw, _ = x
    idx = nsa.select_blocks(q.detach(), kc.detach(), config=cfg, backend="triton")
    ops = dict(
        cmp=lambda: nsa.compressed_attention(q, kc, vc, block_size=cfg.cmp_block_size, stride=cfg.cmp_stride,
                                             backend="triton")[0],
        slc=lambda: nsa.selected_attention(q, ks, vs, idx, block_size=cfg.slc_block_size, backend="triton"),
        win=lambda: nsa.sliding_window_attention(q, kw, vw, window=cfg.window_size, backend="triton"))
    out = {}
    for name, fn in ops.items():
        do = torch.randn_like(fn())
        out[name] = cuda_time(lambda _: fn().backward(do), reps)
        for t in x:
            t.grad = None
    del x, q, kc, vc, ks, vs, kw, vw
    return out


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def check_correctness() -> dict:
    cfg = nsa.NSAConfig()
    T, HQ, HKV, Dk, Dv = (2048, 16, 2, 192, 128) if DEVICE == "cuda" else (150, 4, 2, 24, 16)
    cu = torch.tensor([0, 300, 1500, 2048] if DEVICE == "cuda" else [0, 40, 120, 150], device=DEVICE)
    x = inputs(T, HQ, HKV, Dk, Dv, cfg, cu=cu, seed=3)
    idx_t = nsa.select_blocks(x[0].detach(), x[1].detach(), config=cfg, cu_seqlens=cu, backend="triton")
    idx_r = nsa.select_blocks(x[0].detach(), x[1].detach(), config=cfg, cu_seqlens=cu, backend="reference")
    o = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, backend="triton")
    e = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, block_indices=idx_t, backend="reference")
    do = torch.randn_like(o)
    gt = torch.autograd.grad(o, x, do)
    ge = torch.autograd.grad(e, x, do)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    res = dict(case=f"{str(DTYPE)[6:]}, varlen cu_seqlens={cu.tolist()}, HQ={HQ}, HKV={HKV}, Dk={Dk}, Dv={Dv}, "
                    "paper geometry",
               selection_rows_identical=float((idx_t == idx_r).all(-1).float().mean()),
               o_max_abs_err=(o.float() - e.float()).abs().max().item(), o_cosine=_cos(o, e),
               grad_cosine={n: _cos(a, b) for n, a, b in zip(names, gt, ge)})
    res["pass"] = bool(res["o_cosine"] > 0.999 and min(res["grad_cosine"].values()) > 0.99
                       and res["selection_rows_identical"] > 0.95)
    return res


def packing_comparison(T, reps) -> list:
    """Selected attention fwd+bwd with packed vs padded small-group tiles (HQ=16, D=128, paper l', n)."""
    from nsa.ops.triton import selection

    cfg = nsa.NSAConfig()
    rows = []
    for HKV in G_SWEEP_HKV:
        HQ = G_HQ
        x = inputs(T, HQ, HKV, PAPER["Dv"], PAPER["Dv"], cfg)
        q, ks, vs = x[0], x[3], x[4]
        idx = nsa.select_blocks(q.detach(), x[1].detach(), config=cfg, backend="triton")
        row = dict(T=T, HQ=HQ, HKV=HKV, G=HQ // HKV)
        for packed in (False, True):
            selection.PACK_SMALL_GROUPS = packed
            r = time_fwd_bwd(lambda: nsa.selected_attention(q, ks, vs, idx, block_size=64, backend="triton"),
                             (q, ks, vs), reps)
            row["packed" if packed else "padded"] = r
            row["positions_per_tile_" + ("packed" if packed else "padded")] = selection.tile_shape(HQ // HKV)[1]
        selection.PACK_SMALL_GROUPS = True
        row["packed_speedup_fwd_bwd"] = row["padded"]["fwd_bwd"] / row["packed"]["fwd_bwd"]
        rows.append(row)
        del x, q, ks, vs
    return rows


def dkv_tiles_comparison(T, reps) -> list:
    """Compressed attention fwd+bwd (paper heads) with the dK/dV kernel's tiles as chosen (32x32: no register
    spills on sm_90, but mma.sync) against the forward's (64x32, spills at Dk = 192) and against 16 queries x 64
    keys (the smallest wgmma-sized key tile; spills 16-24 bytes at 8 warps): which is faster."""
    from nsa.ops.triton import flash

    cfg = nsa.NSAConfig()
    x = inputs(T, **PAPER, cfg=cfg)
    q, kc, vc = x[0], x[1], x[2]
    chosen = flash._bwd_blocks
    rows = []
    for name, blocks in (("chosen", chosen), ("forward tiles", flash._blocks),
                         ("16x64", lambda dk, dv, dtype: (16, 64))):
        flash._bwd_blocks = blocks
        try:
            r = time_fwd_bwd(lambda: nsa.compressed_attention(q, kc, vc, block_size=cfg.cmp_block_size,
                                                              stride=cfg.cmp_stride, backend="triton")[0],
                             (q, kc, vc), reps)
        finally:
            flash._bwd_blocks = chosen
        rows.append(dict(T=T, tiles=name, blocks=list(blocks(PAPER["Dk"], PAPER["Dv"], DTYPE)), **r))
    del x, q, kc, vc
    return rows


def autotune_choices() -> dict:
    """The config each autotuned kernel picked per autotune key in this run (and the last timings it compared),
    so a report says which warps/stages its numbers come from."""
    from nsa.ops.triton import flash, selection, topk

    out = {}
    for mod, names in ((flash, ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel")),
                       (selection, ("_slc_fwd_kernel", "_slc_bwd_dq_kernel", "_slc_bwd_dkv_kernel")),
                       (topk, ("_topn_kernel",))):
        for name in names:
            tuner = getattr(mod, name)

            def cfg(c):
                return f"w{c.num_warps}s{c.num_stages}" + "".join(f" {k}={v}" for k, v in sorted(c.kwargs.items()))

            picks = [dict(key=[str(x) for x in k], config=cfg(c)) for k, c in getattr(tuner, "cache", {}).items()]
            last = {cfg(c): [round(float(x), 4) for x in (t if isinstance(t, (list, tuple)) else [t])]
                    for c, t in (getattr(tuner, "configs_timings", None) or {}).items()}
            if picks:
                out[name] = dict(picks=picks, last_timings_ms=last)
    return out


def main():
    global DEVICE, DTYPE, PAPER, G_HQ, G_SWEEP_HKV
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_suite")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--g-lengths", default="65536,16384,4096,32768,8192",
                    help="G sweep lengths, in the order they run (the budget may cut the last ones)")
    ap.add_argument("--g-hkv", default=",".join(map(str, G_SWEEP_HKV)),
                    help="G sweep KV head counts (HQ=16), in the order they run")
    ap.add_argument("--skip-packing", action="store_true", help="skip the packed vs padded tile comparison")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="exercise every code path on CPU in the Triton interpreter with tiny shapes (not a benchmark)")
    args = ap.parse_args()
    if args.cpu_smoke:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--cpu-smoke needs TRITON_INTERPRET=1"
        DEVICE, DTYPE, args.reps = "cpu", torch.float16, 1
        PAPER, G_HQ, G_SWEEP_HKV = dict(HQ=4, HKV=2, Dk=24, Dv=16), 2, [2, 1]
        args.lengths = args.g_lengths = "100"
    else:
        assert torch.cuda.is_available(), "the GPU suite needs a CUDA GPU"
        assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET for the GPU suite"
    lengths = [int(t) for t in args.lengths.split(",")]
    if not args.cpu_smoke:
        G_SWEEP_HKV = [int(h) for h in args.g_hkv.split(",")]
    t0 = time.time()
    result = dict(env=env_info(), dtype=str(DTYPE)[6:], reps=args.reps, lengths=lengths, notes=[], paper=[],
                  g_sweep=[], packing=[], dkv_tiles=[])

    def left():
        return args.budget_s - (time.time() - t0)

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))

    def guarded(name, fn):
        if left() <= 0:
            result["notes"].append(f"skipped (time budget): {name}")
            return None
        try:
            t = time.time()
            r = fn()
            print(f"[{time.time() - t0:6.1f}s] {name}: {time.time() - t:.1f}s", flush=True)
            return r
        except Exception as exc:  # noqa: BLE001 - record and go on: one OOM must not lose the other numbers
            traceback.print_exc()
            result["notes"].append(f"error in {name}: {type(exc).__name__}: {exc}"[:500])
            torch.cuda.empty_cache()
            return None

    print(json.dumps(result["env"]), flush=True)
    result["correctness"] = guarded("correctness", check_correctness)
    save()
    td = 65536 if DEVICE == "cuda" else 64
    result["dkv_tiles"] = guarded(f"dK/dV tiles T={td}", lambda: dkv_tiles_comparison(td, args.reps)) or []
    save()
    tp = 16384 if DEVICE == "cuda" else 64
    if not args.skip_packing:
        result["packing"] = guarded(f"packing T={tp}", lambda: packing_comparison(tp, args.reps)) or []
        save()
    cfg = nsa.NSAConfig()
    for T in lengths:
        r = guarded(f"paper T={T}", lambda: dict(T=T, **PAPER, nsa=nsa_case(T, **PAPER, cfg=cfg, reps=args.reps),
                                                 sdpa=dense_baseline(T, **PAPER, reps=args.reps)))
        if r:
            r["breakdown_fwd"] = guarded(f"breakdown T={T}", lambda: branch_breakdown(T, **PAPER, cfg=cfg,
                                                                                     reps=args.reps))
            if T >= 16384 or DEVICE != "cuda":
                r["breakdown_fwd_bwd"] = guarded(f"fwd+bwd breakdown T={T}", lambda: branch_breakdown_fwd_bwd(
                    T, **PAPER, cfg=cfg, reps=args.reps))
            result["paper"].append(r)
        save()
    for T in [int(t) for t in args.g_lengths.split(",")]:
        for HKV in G_SWEEP_HKV:
            shape = dict(HQ=G_HQ, HKV=HKV, Dk=128, Dv=128) if DEVICE == "cuda" else dict(HQ=G_HQ, HKV=HKV, Dk=16, Dv=16)
            r = guarded(f"G sweep T={T} HKV={HKV}",
                        lambda: dict(T=T, **shape, nsa=nsa_case(T, **shape, cfg=cfg, reps=args.reps),
                                     sdpa=dense_baseline(T, **shape, reps=args.reps)))
            if r:
                result["g_sweep"].append(r)
            save()
    result["autotune"] = autotune_choices()
    result["wall_s"] = round(time.time() - t0, 1)
    save()
    print(markdown(result))


def _row(r):
    cells = [str(r["T"]), str(r["HQ"]), str(r["HKV"])]
    for mode in ("fwd", "bwd", "fwd_bwd"):
        a, b = r["nsa"][mode], r["sdpa"][mode]
        cells += [f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def markdown(res) -> str:
    env = res["env"]
    lines = [f"# NSA Triton GPU suite: {env['card']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, "
             f"{env['date_utc']}. Medians of {res['reps']} CUDA-event timings (ms); speedup = SDPA flash / NSA, "
             f"both measured in this run. {res.get('dtype', 'bfloat16')}.", ""]
    c = res.get("correctness")
    if c:
        verdict = "pass" if c["pass"] else "FAIL"
        lines += [f"## Correctness ({res.get('dtype', 'bfloat16')} vs reference)", "", f"{c['case']}: **{verdict}**; "
                  f"o cosine {c['o_cosine']:.6f}, max abs {c['o_max_abs_err']:.3e}; selection rows identical "
                  f"{c['selection_rows_identical']:.4f}; grad cosines "
                  + ", ".join(f"{k} {v:.5f}" for k, v in c["grad_cosine"].items()), ""]
    if res.get("packing"):
        lines += ["## Selected attention: packed vs padded small-group tiles (fwd+bwd ms)", "",
                  "| T | G | padded | packed | packed speedup |", "|---|---|---|---|---|"]
        for r in res["packing"]:
            lines.append(f"| {r['T']} | {r['G']} | {r['padded']['fwd_bwd']:.2f} | {r['packed']['fwd_bwd']:.2f} | "
                         f"{r['packed_speedup_fwd_bwd']:.2f}x |")
        lines.append("")
    if res.get("dkv_tiles"):
        lines += ["## Compressed attention (paper heads): dK/dV tiles (ms)", "",
                  "| T | dK/dV tiles | (BLOCK_M, BLOCK_N) | fwd | bwd | fwd+bwd |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['T']} | {r['tiles']} | {tuple(r['blocks'])} | {r['fwd']:.2f} | {r['bwd']:.2f} | "
                  f"{r['fwd_bwd']:.2f} |" for r in res["dkv_tiles"]] + [""]
    head = ["| T | HQ | HKV | NSA fwd | SDPA fwd | speedup | NSA bwd | SDPA bwd | speedup | NSA fwd+bwd | "
            "SDPA fwd+bwd | speedup |", "|" + "---|" * 12]
    for key, title in (("paper", "Paper config (Dk=192, Dv=128)"), ("g_sweep", "G sweep (HQ=16, D=128)")):
        if res.get(key):
            lines += [f"## {title}", ""] + head + [_row(r) for r in res[key]] + [""]
    gs = res.get("g_sweep", [])
    base = {r["T"]: r["nsa"]["fwd_bwd"] for r in gs if r["HKV"] == r["HQ"] // 16}
    if base:
        lines += ["## G sweep: NSA fwd+bwd per-token throughput relative to G = 16 (target >= 0.6)", "",
                  "| T | G | NSA fwd+bwd ms | relative throughput |", "|---|---|---|---|"]
        for r in sorted(gs, key=lambda r: (r["T"], -r["HKV"])):
            if r["T"] in base:
                lines.append(f"| {r['T']} | {r['HQ'] // r['HKV']} | {r['nsa']['fwd_bwd']:.2f} | "
                             f"{base[r['T']] / r['nsa']['fwd_bwd']:.2f} |")
        lines.append("")
    for key, title, cols in (
            ("breakdown_fwd", "forward breakdown (ms, no_grad)", ("cmp", "topn", "slc", "win", "combine")),
            ("breakdown_fwd_bwd", "fwd+bwd of each branch op alone (ms, given indices)", ("cmp", "slc", "win"))):
        rows = [r for r in res.get("paper", []) if r.get(key)]
        if rows:
            lines += [f"## Paper config: {title}", "", "| T | " + " | ".join(cols) + " |",
                      "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {r['T']} | " + " | ".join(f"{r[key][c]:.2f}" for c in cols) + " |" for r in rows] + [""]
    if res.get("autotune"):
        lines += ["## Autotune picks (num_warps w, num_stages s) per kernel, over its autotune keys", ""]
        lines += [f"- {name}: " + ", ".join(sorted({p['config'] for p in a["picks"]})) + f" ({len(a['picks'])} keys)"
                  for name, a in res["autotune"].items()] + [""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
