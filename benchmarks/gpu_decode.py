"""GPU decode-step benchmark: the Triton NSA decode kernel vs SDPA with one query over the dense cache.

Both sides time the attention of one new token per sequence given a filled cache (projections and the cache
append are excluded). Default: the paper's model heads (HQ = 64, HKV = 4, Dk = 192, Dv = 128), bfloat16, paper
geometry (l=32, d=16, l'=64, n=16, w=512), contexts 8k..128k, batch 1 and 16. Dense is
`F.scaled_dot_product_attention` with each KV group's G query heads folded into the query axis (q [B, HKV, G, Dk]
vs k [B, HKV, S, Dk], no mask: exactly the new token's causal attention, no K/V expansion). The torch decode
(`nsa.ops.decode.torch_decode`) is timed too. Times: `triton.testing.do_bench` (ms) in one run on one GPU, so the
printed ratios compare like with like. Each step is timed twice: eagerly (Python and kernel-launch overhead
included; the Triton decode launches 4 kernels) and as the replay of a CUDA graph (kernel time, how a serving loop
runs decode steps). A serving loop captures one graph sized for its capacity (`decode_attention(...,
max_length=capacity)`) and replays it as the lengths grow: `nsa_triton_graph_half_ms` is a step at context S/2 from a
graph sized for S, to compare with the S/2 row's `nsa_triton_graph_ms`.

    python benchmarks/gpu_decode.py [--contexts ...] [--batches 1,16]
    python benchmarks/gpu_decode.py --smoke      # tiny shapes on CPU through the Triton interpreter (script check)

Then (`--layer-contexts`, default 64k) the eager step of the whole layer over a filled NSACache against a dense
layer step of the same sizes (`layer_rows` in the JSON; see `layer_run`), and a chunked-prefill call (`--prefill-chunk`
queries at 64k, batch 1): the Triton kernels against the torch decode (`prefill_rows`).

Writes benchmarks/results/gpu_decode.json (smoke runs write nothing unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import nsa  # noqa: E402
from nsa.ops.decode import torch_decode  # noqa: E402
from nsa.ops.triton_decode import triton_decode  # noqa: E402


def bench_ms(fn, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def graph_ms(fn, device):
    """ms per replay of fn captured in a CUDA graph (how a serving loop runs a decode step: no Python or launch
    gaps between the kernels); None on CPU."""
    if device != "cuda":
        return None
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100)


def traffic_ratio(S, cfg, G, Dk, Dv, elt):
    """Dense bytes / the Triton decode's main HBM traffic per (sequence, KV head): compressed K/V once, the fp32
    scores of the G heads written and read back, the selected and window K/V (partials and indices excluded)."""
    m = nsa.decode_memory_access(S, cfg)
    nsa_bytes = (m["nsa"] * (Dk + Dv) * elt) + 2 * G * m["compressed"] * 4
    return S * (Dk + Dv) * elt / nsa_bytes


def random_step(B, S, Tq, HQ, HKV, Dk, Dv, dtype, device, cfg):
    """Random decode inputs: Tq queries per sequence over a cache of S tokens (seeded), as the decode functions take
    them (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates), the window reading the selection cache."""
    torch.manual_seed(0)
    tc = cfg.num_compressed(S)
    k_cmp, v_cmp, k, v = [torch.randn(B, n, HKV, dd, device=device, dtype=dtype)
                          for n, dd in ((tc, Dk), (tc, Dv), (S, Dk), (S, Dv))]
    q = torch.randn(B, Tq, HQ, Dk, device=device, dtype=dtype)
    gates = torch.rand(B, Tq, HQ, 3, device=device, dtype=dtype)
    return q, k_cmp, v_cmp, k, v, k, v, gates


def run(contexts, batches, HQ, HKV, Dk, Dv, dtype, device, cfg, check=True):
    rows = []
    G = HQ // HKV
    for B in batches:
        for S in contexts:
            args = random_step(B, S, 1, HQ, HKV, Dk, Dv, dtype, device, cfg)
            q, k_cmp, v_cmp, k, v = args[:5]
            lengths = torch.full((B,), S, dtype=torch.long, device=device)
            kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # dense layout [B, HKV, S, D]
            qd = q[:, 0].reshape(B, HKV, G, Dk)
            kw = dict(lengths=lengths, config=cfg, max_len=S)  # host max length: no sync, graph-capturable

            def dense():
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)

            def nsa_triton():
                return triton_decode(*args, **kw)

            def nsa_torch():
                return torch_decode(*args, **kw, min_len=S)

            with torch.no_grad():
                if check:  # the kernel agrees with the torch decode on this very input
                    err = (nsa_triton().float() - nsa_torch().float()).abs().max().item()
                else:
                    err = float("nan")
                t_dense, t_tri, t_torch = bench_ms(dense, device), bench_ms(nsa_triton, device), bench_ms(nsa_torch,
                                                                                                        device)
                g_dense, g_tri = graph_ms(dense, device), graph_ms(nsa_triton, device)
                # context S/2 from a graph sized for capacity S (decode_attention's max_length): what a serving loop
                # that captured one graph at its capacity pays, against the S/2 row's nsa_triton_graph_ms
                g_half = graph_ms(lambda: triton_decode(*args, **{**kw, "lengths": lengths // 2}), device)
            bound = nsa.decode_memory_access(S, cfg)["ratio"]
            traffic = traffic_ratio(S, cfg, G, Dk, Dv, k.element_size())
            rows.append(dict(context=S, batch=B, dense_ms=t_dense, nsa_triton_ms=t_tri, nsa_torch_ms=t_torch,
                             speedup=t_dense / t_tri, dense_graph_ms=g_dense, nsa_triton_graph_ms=g_tri,
                             speedup_graph=None if g_tri is None else g_dense / g_tri,
                             nsa_triton_graph_half_ms=g_half, memory_bound=bound,
                             kernel_traffic_ratio=traffic,
                             max_abs_diff_vs_torch=err))
            print(f"{S:>8} {B:>5} {t_dense:>10.4f} {t_tri:>10.4f} {t_torch:>10.4f} {t_dense / t_tri:>8.2f}x "
                  f"{bound:>8.2f}x {traffic:>8.2f}x {err:>9.2e}"
                  + ("" if g_tri is None else f" {g_dense:>9.4f} {g_tri:>9.4f} {g_dense / g_tri:>8.2f}x"
                         f" {g_half:>9.4f}"), flush=True)
            del args, q, k, v, kd, vd, k_cmp, v_cmp
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


class DenseLayerStep:
    """The dense counterpart of an NSA layer's cached decode step: the same q/k/v/o projection sizes and RoPE, the
    new token's K/V written into a dense [B, HKV, S, D] cache, SDPA over the cached prefix (GQA folded as above)."""

    def __init__(self, hidden, HQ, HKV, Dk, Dv, B, S, S_max, device, dtype):
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False, device=device, dtype=dtype)  # noqa: E731
        self.q_proj, self.kv_proj = lin(hidden, HQ * Dk), lin(hidden, HKV * (Dk + Dv))
        self.o_proj = lin(HQ * Dv, hidden)
        self.k = torch.randn(B, HKV, S_max, Dk, device=device, dtype=dtype)
        self.v = torch.randn(B, HKV, S_max, Dv, device=device, dtype=dtype)
        self.L, self.dims = S, (HQ, HKV, Dk, Dv)

    def __call__(self, x):
        from nsa.rope import apply_rope

        HQ, HKV, Dk, Dv = self.dims
        B = x.shape[0]
        pos = torch.full((B, 1), self.L, device=x.device)
        q = apply_rope(self.q_proj(x).view(B, 1, HQ, Dk), pos)
        kv = self.kv_proj(x).view(B, 1, HKV, Dk + Dv)
        self.k[:, :, self.L] = apply_rope(kv[..., :Dk], pos)[:, 0]
        self.v[:, :, self.L] = kv[:, 0, :, Dk:]
        self.L += 1
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, 0].reshape(B, HKV, HQ // HKV, Dk), self.k[:, :, :self.L], self.v[:, :, :self.L])
        return self.o_proj(o.reshape(B, 1, HQ * Dv))


def filled_layer(hidden, HQ, HKV, Dk, Dv, B, S, S_max, dtype, device, cfg, static=False):
    """An NSA layer (triton) and an NSACache holding S random tokens per row (room for S_max)."""
    layer = nsa.NativeSparseAttention(hidden, HQ, HKV, Dk, v_head_dim=Dv, config=cfg,
                                      backend="triton").to(device=device, dtype=dtype)
    cache = nsa.NSACache(1, B, S_max, device=device, dtype=dtype, static=static)
    lc = cache.layer(0, num_kv_heads=HKV, head_dim=Dk, v_head_dim=Dv, config=cfg, shared_kv=layer.window_reads_slc,
                     device=device, dtype=dtype)
    for t in lc.tensors().values():
        t.normal_()
    lc.set_lengths(slice(None), torch.full((B,), S, dtype=torch.long))
    return layer, cache


def layer_run(contexts, batches, hidden, HQ, HKV, Dk, Dv, dtype, device, cfg):
    """Eager one-token steps of the whole `NativeSparseAttention` layer over a filled `NSACache` (projections,
    cache append, compressed-token emission every d steps, the Triton decode) against `DenseLayerStep`: what an
    eager generation loop pays per layer and token. Timed steps keep appending, so lengths grow by a few hundred.
    Then both as CUDA-graph replays: the NSA step over a static cache (`NSACache(static=True)`, one capture serving
    every step) and the dense step (captured at its length)."""
    rows = []
    for B in batches:
        for S in contexts:
            torch.manual_seed(0)
            S_max = S + 4096
            layer, cache = filled_layer(hidden, HQ, HKV, Dk, Dv, B, S, S_max, dtype, device, cfg)
            dense = DenseLayerStep(hidden, HQ, HKV, Dk, Dv, B, S, S_max, device, dtype)
            x = torch.randn(B, 1, hidden, device=device, dtype=dtype)
            with torch.no_grad():
                t_nsa = bench_ms(lambda: layer(x, cache=cache, layer_idx=0), device)
                t_dense = bench_ms(lambda: dense(x), device)
                torch.manual_seed(0)  # room for every replay do_bench makes (thousands): a full row would be NaN
                layer_s, static = filled_layer(hidden, HQ, HKV, Dk, Dv, B, S, S + 65536, dtype, device, cfg,
                                               static=True)
                g_nsa = graph_ms(lambda: layer_s(x, cache=static, layer_idx=0), device)
                g_dense = graph_ms(lambda: dense(x), device)
                if g_nsa is not None and int(static.layers[0].lengths.max()) >= S + 65536:
                    g_nsa = None  # the replays reached the capacity: not a valid timing
            rows.append(dict(context=S, batch=B, hidden=hidden, dense_layer_ms=t_dense, nsa_layer_ms=t_nsa,
                             speedup=t_dense / t_nsa, steps_appended=int(cache.layers[0].host_lengths[0]) - S,
                             dense_layer_graph_ms=g_dense, nsa_static_layer_graph_ms=g_nsa,
                             speedup_graph=None if g_nsa is None else g_dense / g_nsa))
            print(f"layer step {S:>8} {B:>5} dense {t_dense:.4f} ms  NSA {t_nsa:.4f} ms  {t_dense / t_nsa:.2f}x"
                  + ("" if g_nsa is None else f"  graphs: dense {g_dense:.4f} ms  NSA (static cache) {g_nsa:.4f} ms"
                                               f"  {g_dense / g_nsa:.2f}x"), flush=True)
            del layer, cache, dense, layer_s, static
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def prefill_run(contexts, batches, chunk, HQ, HKV, Dk, Dv, dtype, device, cfg):
    """A chunked-prefill call: `chunk` new queries per sequence over a cache of `context` tokens (the chunk's K/V
    included), the Triton decode kernels (one row per query, in passes within SCORES_BUDGET) against the torch
    decode (gathers, 32 queries at a time). Attention only; the two agree on the output (max |diff| reported)."""
    rows = []
    G = HQ // HKV
    for B in batches:
        for S in contexts:
            args = random_step(B, S, chunk, HQ, HKV, Dk, Dv, dtype, device, cfg)
            kw = dict(lengths=torch.full((B,), S, dtype=torch.long, device=device), config=cfg, max_len=S)
            with torch.no_grad():
                diff = triton_decode(*args, **kw).float() - torch_decode(*args, **kw, min_len=S).float()
                err = diff.abs().max().item()
                t_tri = bench_ms(lambda: triton_decode(*args, **kw), device)
                t_torch = bench_ms(lambda: torch_decode(*args, **kw, min_len=S), device)
            rows.append(dict(context=S, batch=B, chunk=chunk, nsa_triton_ms=t_tri, nsa_torch_ms=t_torch,
                             speedup_vs_torch=t_torch / t_tri, max_abs_diff_vs_torch=err, heads=(G, HKV)))
            print(f"prefill chunk {chunk} at {S:>8} {B:>5}: triton {t_tri:.3f} ms  torch {t_torch:.3f} ms  "
                  f"{t_torch / t_tri:.2f}x  max|diff| {err:.2e}", flush=True)
            del args
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def split_run(contexts, batches, programs, HQ, HKV, Dk, Dv, dtype, device, cfg):
    """The decode step's graph-replay time against `target_programs` (how many programs the compressed-token pass
    aims for: at batch 16 the default 264 gives each (row, KV head) only 5 splits), to pick the default from data."""
    rows = []
    for B in batches:
        for S in contexts:
            args = random_step(B, S, 1, HQ, HKV, Dk, Dv, dtype, device, cfg)
            kw = dict(lengths=torch.full((B,), S, dtype=torch.long, device=device), config=cfg, max_len=S)
            with torch.no_grad():
                times = {p: graph_ms(lambda: triton_decode(*args, **kw, target_programs=p), device) for p in programs}
            rows.append(dict(context=S, batch=B, graph_ms_by_target_programs=times))
            if device == "cuda":
                print(f"target_programs at {S:>8} {B:>5}: "
                      + "  ".join(f"{p}: {t:.4f} ms" for p, t in times.items()), flush=True)
            del args
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dk", type=int, default=192)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layer-contexts", default="65536", help="contexts of the eager whole-layer step ('' skips it)")
    ap.add_argument("--hidden", type=int, default=2560, help="hidden size of the layer step (paper's 27B: 2560)")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="queries of the chunked-prefill rows (0 skips)")
    ap.add_argument("--prefill-contexts", default="65536")
    ap.add_argument("--split-contexts", default="65536", help="contexts of the target_programs sweep ('' skips it)")
    ap.add_argument("--target-programs", default="132,264,528,1056")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via the Triton interpreter")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = nsa.NSAConfig()
    if args.smoke:
        device, contexts, batches, dtype = "cpu", [700], [1, 2], torch.float32
        cfg = nsa.NSAConfig(window_size=128, num_selected=4)
        args.heads, args.kv_heads, args.dk, args.dv, args.hidden = 16, 1, 32, 16, 64
        args.layer_contexts, args.prefill_contexts, args.prefill_chunk = "700", "700", 9
        args.split_contexts, args.target_programs = "700", "8,264"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_decode.py needs a CUDA GPU (or --smoke)")
        device, dtype = "cuda", getattr(torch, args.dtype)
        contexts = [int(c) for c in args.contexts.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter smoke run)"
    print(f"# GPU decode step, attention only: NSA Triton decode vs SDPA (one query, dense cache)\n# {gpu}, "
          f"torch {torch.__version__}; HQ={args.heads} HKV={args.kv_heads} Dk={args.dk} Dv={args.dv} {dtype}")
    print(f"{'context':>8} {'batch':>5} {'dense ms':>10} {'triton ms':>10} {'torch ms':>10} {'speedup':>9} "
          f"{'mem bound':>9} {'traffic':>9} {'max|diff|':>9} {'graph: dense':>9} {'triton':>9} {'speedup':>9} "
          f"{'S/2 at cap S':>12}")
    rows = run(contexts, batches, args.heads, args.kv_heads, args.dk, args.dv, dtype, device, cfg)
    layer_contexts = [int(c) for c in args.layer_contexts.split(",") if c]
    layer_rows = layer_run(layer_contexts, batches, args.hidden, args.heads, args.kv_heads, args.dk, args.dv, dtype,
                           device, cfg)
    prefill_rows = [] if not args.prefill_chunk else prefill_run(
        [int(c) for c in args.prefill_contexts.split(",") if c], [batches[0]], args.prefill_chunk, args.heads,
        args.kv_heads, args.dk, args.dv, dtype, device, cfg)
    split_rows = split_run([int(c) for c in args.split_contexts.split(",") if c], batches,
                           [int(p) for p in args.target_programs.split(",")], args.heads, args.kv_heads, args.dk,
                           args.dv, dtype, device, cfg)
    out = args.out or (None if args.smoke else str(Path(__file__).parent / "results" / "gpu_decode.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(benchmark="gpu_decode", device=gpu, heads=args.heads,
                                             kv_heads=args.kv_heads, dk=args.dk, dv=args.dv, dtype=str(dtype),
                                             config=cfg.__dict__, rows=rows, layer_rows=layer_rows,
                                             prefill_rows=prefill_rows, split_rows=split_rows), indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
