"""End-to-end generation speed: the small-gpu model (12 layers, hidden 768, 12 query / 4 KV heads, paper geometry)
decoding after a long prompt, NSA and full attention, each eagerly and with `generate(cuda_graph=True)` (one
captured step over a static cache, replayed per token; for full attention each step attends over the whole static
cache under a mask, as HF's StaticCache does). Random weights and prompt, greedy, bf16.

Each row times `generate(prompt, 1 + N)` minus `generate(prompt, 1)` (the same prefill and first token; the faster
of two runs each), so the difference is N decode steps: ms per token. Also whether each graph's tokens equal the
eager ones (they may part after a near-tie: the two size their kernels differently, bf16).

    python benchmarks/gpu_generate.py [--contexts 8192] [--batches 1,8] [--tokens 64]
    python benchmarks/gpu_generate.py --smoke      # tiny model on CPU (eager only: no CUDA graph), script check
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nsa.models import LlamaLM, ModelConfig


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def build(attention, model_kw, device, dtype):
    torch.manual_seed(0)
    return LlamaLM(ModelConfig(**model_kw, attention=attention)).to(device=device, dtype=dtype).eval()


def run(contexts, batches, tokens, model_kw, device, dtype):
    rows = []
    models = {a: build(a, model_kw, device, dtype) for a in ("nsa", "full")}
    variants = [("nsa", False), ("full", False)] + ([("nsa", True), ("full", True)] if device == "cuda" else [])
    for B in batches:
        for S in contexts:
            g = torch.Generator().manual_seed(S + B)
            prompt = torch.randint(0, model_kw["vocab_size"], (B, S), generator=g).to(device)
            row = dict(context=S, batch=B, new_tokens=tokens)
            outs = {}
            for attention, graph in variants:
                model = models[attention]
                gen = lambda n: model.generate(prompt, n, temperature=0, cuda_graph=graph)  # noqa: E731
                with torch.no_grad():
                    gen(2)  # compilation, autotuning, graph capture set-up
                    t1 = min(timed(lambda: gen(1), device)[1] for _ in range(2))
                    (out, tn), (_, tn2) = timed(lambda: gen(1 + tokens), device), timed(lambda: gen(1 + tokens), device)
                    tn = min(tn, tn2)
                name = attention + ("_graph" if graph else "")
                row[f"{name}_ms_per_token"] = 1e3 * (tn - t1) / tokens
                outs[name] = out
            for a in ("nsa", "full"):
                if f"{a}_graph" in outs:
                    row[f"{a}_graph_tokens_equal_eager"] = bool(torch.equal(outs[f"{a}_graph"], outs[a]))
            rows.append(row)
            print(f"context {S:>7} batch {B:>3}: " + "  ".join(
                f"{k[:-13]} {v:.3f} ms/token" for k, v in row.items() if k.endswith("_ms_per_token"))
                + "".join(f"  {k[:-19]} tokens == eager: {v}" for k, v in row.items() if k.endswith("equal_eager")),
                flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_kw = dict(vocab_size=256, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                    intermediate_size=2048, nsa={}, shared_kv=False)
    if args.smoke:
        device, dtype, contexts, batches, tokens = "cpu", torch.float32, [100], [2], 3
        model_kw.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                        nsa=dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=4, window_size=16))
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_generate.py needs a CUDA GPU (or --smoke)")
        device, dtype = "cuda", torch.bfloat16
        contexts = [int(c) for c in args.contexts.split(",")]
        batches, tokens = [int(b) for b in args.batches.split(",")], args.tokens
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    print(f"# generation after a prompt, ms per new token: small-gpu model, {dtype}, {gpu}, torch {torch.__version__}")
    rows = run(contexts, batches, tokens, model_kw, device, dtype)
    out = args.out or (None if args.smoke else str(Path(__file__).parent / "results" / "gpu_generate.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(benchmark="gpu_generate", device=gpu, model=model_kw, dtype=str(dtype),
                                             rows=rows), indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
