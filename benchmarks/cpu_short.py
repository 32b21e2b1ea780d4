"""CPU benchmark at the training demo's shapes: short packed sequences, on each path of the torch backend's
composed op (chunked with the compiled float32 kernels, the dense path `nsa.ops.torch_dense`, chunked pure PyTorch).

The demo's real batches (tiny-cpu preset: 8 rows x 512 tokens packed with cu_seqlens, sequences of 64-512 tokens;
heads and geometry of the preset's model: HQ=4, HKV=4, D=32, l=8, d=4, l'=32, n=8, w=64), fp32, one thread (as each
demo model trains):
- the attention op, forward+backward, per layer: the three NSA paths, and full attention (one SDPA causal call per
  packed sequence, as `nsa.models.llama` does);
- a whole training step (forward, backward, AdamW) of the tiny-cpu NSA model on each path and of its
  full-attention twin.
Times are the median over the batches of the minimum over `--repeat` runs (op) or the median step time (model).
Nothing here asserts a speed.

    python benchmarks/cpu_short.py [--batches 4] [--repeat 5] [--steps 10] [--out benchmarks/results/short_<tag>]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import nsa
from nsa.data import DataMix, stdlib_corpus
from nsa.models.llama import LlamaLM, ModelConfig
from nsa.ops import torch_backend as tb
from nsa.ops import torch_dense
from nsa.ops.varlen import compressed_cu_seqlens, sequence_spans
from nsa.train import DEMO_NSA, PRESETS, load_config

from cpu_suite import machine  # noqa: E402  (benchmarks/ is the script's directory)

_MODEL = PRESETS["tiny-cpu"]["model"]
HQ, HKV, D = _MODEL["num_heads"], _MODEL["num_kv_heads"], _MODEL["head_dim"]
NCFG = nsa.NSAConfig(**DEMO_NSA)


class nsa_path:
    """Forces one path of the composed op: "fused" (chunked, compiled float32 kernels: the default where they
    build), "dense" (masked SDPA per length bucket: the default without them) or "chunked_pure" (chunked,
    pure PyTorch)."""

    def __init__(self, path):
        self.fused = path == "fused"
        self.dense_len = None if path == "dense" else 0

    def __enter__(self):
        self.old = torch_dense.DENSE_MAX_LEN, tb.USE_FUSED_CPU
        tb.USE_FUSED_CPU = self.fused
        if self.dense_len is not None:
            torch_dense.DENSE_MAX_LEN = self.dense_len

    def __exit__(self, *exc):
        torch_dense.DENSE_MAX_LEN, tb.USE_FUSED_CPU = self.old


PATHS = ("fused", "dense", "chunked_pure")


def op_inputs(cu, seed):
    g = torch.Generator().manual_seed(seed)
    N = int(cu[-1])
    Nc = int(compressed_cu_seqlens(cu, NCFG.cmp_block_size, NCFG.cmp_stride)[-1])

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    gates = torch.rand(1, N, HQ, 3, generator=g).requires_grad_()
    return [rnd(1, N, HQ, D), rnd(1, Nc, HKV, D), rnd(1, Nc, HKV, D)] + [rnd(1, N, HKV, D) for _ in range(4)] + [gates]


def nsa_op(x, cu):
    o = tb.native_sparse_attention(*x, config=NCFG, cu_seqlens=cu)
    o.backward(torch.ones_like(o))


def full_op(x, cu):
    q, k, v = x[0], x[3], x[4]
    o = torch.zeros(1, q.shape[1], HQ, D)
    for _, s, e in sequence_spans(1, q.shape[1], cu):
        t = [y[:, s:e].transpose(1, 2) for y in (q, k, v)]
        o[:, s:e] = F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True).transpose(1, 2)
    o.backward(torch.ones_like(o))


def best_ms(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def step_s(attention, batches, steps):
    mc = dict(PRESETS["tiny-cpu"]["model"], attention=attention)
    torch.manual_seed(0)
    model = LlamaLM(ModelConfig(**mc))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        model.loss(b.input_ids, b.labels, cu_seqlens=b.cu_seqlens).backward()
        opt.step()
        opt.zero_grad()

    step(batches[0])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(batches[(i + 1) % len(batches)])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("tiny-cpu")
    mix = DataMix(stdlib_corpus("train", cfg.val_fraction), cfg.seq_len, cfg.batch_rows, cfg.data_weights, cfg.seed,
                  cfg.mqar_pairs, cfg.task_lengths, cfg.niah_lengths)
    batches = [mix.batch(s) for s in range(max(args.batches, args.steps + 1))]
    op = {k: [] for k in ["nsa_" + p for p in PATHS] + ["full"]}
    for i, b in enumerate(batches[:args.batches]):
        x = op_inputs(b.cu_seqlens, i)
        op["full"].append(best_ms(lambda: full_op(x, b.cu_seqlens), args.repeat))
        for p in PATHS:
            with nsa_path(p):
                op["nsa_" + p].append(best_ms(lambda: nsa_op(x, b.cu_seqlens), args.repeat))
    op = {k: statistics.median(v) for k, v in op.items()}
    step = {"full": step_s("full", batches, args.steps)}
    for p in PATHS:
        with nsa_path(p):
            step["nsa_" + p] = step_s("nsa", batches, args.steps)
    res = {"machine": machine(), "torch": torch.__version__, "threads": 1,
           "op_fwd_bwd_ms_per_layer": op, "train_step_s": step, "args": vars(args)}
    lines = ["| path | attention op fwd+bwd per layer (ms) | tiny-cpu training step (s) |", "|---|---|---|"]
    for k in ["nsa_" + p for p in PATHS] + ["full"]:
        lines.append(f"| {k} | {op[k]:.1f} | {step[k]:.3f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
