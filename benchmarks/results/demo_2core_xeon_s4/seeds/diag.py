"""Selection recall of the needle block at the NIAH answer queries, for an NSA checkpoint.

usage: diag.py CKPT [--oracle]
For NIAH@512 examples generated exactly as the demo eval does (val corpus, seed 4321, 7 depths, 16 samples), report
per layer / KV head whether the selection block holding the needle's value byte (what the first answer query must
read) is among the selected blocks, the rank of its score among the free candidates, its cmp-attention mass, the
gates at the answer query, and accuracy split by selection hit. --oracle: also rerun with the needle block forced
into every layer's / head's selection (replacing the weakest free pick) to measure the read-out alone.
"""
import sys
from collections import defaultdict

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4] / "src"))
from nsa.data import niah_example, stdlib_corpus  # noqa: E402
from nsa.evaluate import _answers_correct  # noqa: E402
from nsa.layer import NativeSparseAttention  # noqa: E402
from nsa.ops import dispatch  # noqa: E402
from nsa.ops.reference import block_scores, topn_blocks  # noqa: E402
from nsa.train import load_model  # noqa: E402

torch.set_num_threads(1)
ckpt = sys.argv[1]
oracle = "--oracle" in sys.argv
ONLY = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--only=")), None)
L = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--len=")), 512))
samples = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--samples=")), 16))
model, cfg, step = load_model(ckpt)
model.eval()
ncfg = model.cfg.nsa_config()
val = stdlib_corpus("val", cfg.val_fraction)
depths = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
exs = []
for j, depth in enumerate(depths):
    g = torch.Generator().manual_seed(4321 + 1000 * L + j)
    exs += [niah_example(val, L, depth, g) for _ in range(samples)]

STATE = dict(rec=None, force=None)
force_v = []  # rec: list per layer of dicts; force: [B] needle block (or None)
layers = [b.attn for b in model.blocks]


def make_forward(li, layer):
    def fwd(x, cu_seqlens=None, position_ids=None, **kw):
        B, T, _ = x.shape
        args = layer.project(x, cu_seqlens, position_ids)
        q, k_cmp, gates = args[0], args[1], args[7]
        scores = block_scores(q, k_cmp, config=ncfg)
        idx = topn_blocks(scores, config=ncfg)
        if STATE["force"] is not None and (ONLY is None or ONLY == li):
            force = STATE["force"]
            # replace the weakest non-forced selected block at the first answer query with the needle block
            for b in range(B):
              t0, nb0 = force[b]
              for t, nb in ((t0, nb0), (t0 + 1, (nb0 * 0 + force_v[b] + 1) // ncfg.slc_block_size), (t0 + 2, (force_v[b] + 2) // ncfg.slc_block_size)):
                for h in range(idx.shape[2]):
                    row = idx[b, t, h].tolist()
                    if nb in row:
                        continue
                    own = t // ncfg.slc_block_size
                    free = [j for j in row if j >= ncfg.num_init_blocks and j <= own - ncfg.num_local_blocks]
                    weakest = min(free, key=lambda j: float(scores[b, t, h, j]))
                    row[row.index(weakest)] = nb
                    idx[b, t, h] = torch.tensor(sorted(row))
        STATE["rec"][li] = dict(idx=idx, scores=scores, gates=gates.detach())
        o = dispatch.native_sparse_attention(*args, config=ncfg, block_indices=idx, backend=layer.backend)
        return layer.o_proj(o.reshape(B, T, -1))
    return fwd


for li, layer in enumerate(layers):
    layer.forward = make_forward(li, layer)

stats = defaultdict(list)
with torch.no_grad():
    for i in range(0, len(exs), 16):
        chunk = exs[i:i + 16]
        STATE["rec"] = [None] * len(layers)
        STATE["force"] = None
        ok = _answers_correct(model, chunk, batch_size=16)
        recs = STATE["rec"]
        forces = []
        force_vs = []
        for b, e in enumerate(chunk):
            n = len(e.tokens)
            t = n - 3  # first answer query (answer = 2 value bytes + newline)
            vpos = e.info["needle_pos"] + len(e.info["key"]) + 2
            nb = vpos // ncfg.slc_block_size
            forces.append((t, nb))
            force_vs.append(vpos)
            beyond = e.info["gap"] >= ncfg.window_size
            stats["beyond"].append(beyond)
            stats["ok"].append(ok[b])
            hits = []
            for li, r in enumerate(recs):
                for h in range(r["idx"].shape[2]):
                    sel = r["idx"][b, t, h].tolist()
                    hits.append(nb in sel)
                    sc = r["scores"][b, t, h]
                    own = t // ncfg.slc_block_size
                    cand = [j for j in range(own + 1) if ncfg.num_init_blocks <= j <= own - ncfg.num_local_blocks]
                    if nb in cand:
                        rank = sorted(cand, key=lambda j: -float(sc[j])).index(nb)
                        stats[f"rank_L{li}H{h}"].append((beyond, rank, len(cand)))
                    stats[f"mass_L{li}H{h}"].append((beyond, float(sc[nb]) / float(sc[: own + 1].sum())))
                g = r["gates"][b, t].mean(0).tolist()
                stats[f"gates_L{li}"].append(g)
            stats["hits"].append(hits)
        if oracle:
            STATE["force"] = forces
            force_v[:] = force_vs
            STATE["rec"] = [None] * len(layers)
            stats["ok_oracle"] += _answers_correct(model, chunk, batch_size=16)

beyond = stats["beyond"]
nB = sum(beyond)
print(f"{ckpt} step {step}: NIAH@{L} n={len(beyond)} ({nB} beyond window {ncfg.window_size})")
acc = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
print(f"accuracy all {acc(stats['ok']):.1%}  inside {acc([o for o, b in zip(stats['ok'], beyond) if not b]):.1%}"
      f"  beyond {acc([o for o, b in zip(stats['ok'], beyond) if b]):.1%}")
names = [f"L{li}H{h}" for li in range(len(layers)) for h in range(layers[li].num_kv_heads)]
for k, name in enumerate(names):
    hb = [hs[k] for hs, b in zip(stats["hits"], beyond) if b]
    ranks = [r for (b, r, c) in stats[f"rank_L{name[1]}H{name[3]}"] if b]
    ncand = [c for (b, r, c) in stats[f"rank_L{name[1]}H{name[3]}"] if b]
    mass = [m for (b, m) in stats[f"mass_L{name[1]}H{name[3]}"] if b]
    print(f"  {name}: needle block selected (beyond) {acc(hb):.1%}; free-candidate rank mean "
          f"{sum(ranks) / max(len(ranks), 1):.2f} of {sum(ncand) / max(len(ncand), 1):.1f} (rank0 {acc([r == 0 for r in ranks]):.1%}); "
          f"score share {sum(mass) / max(len(mass), 1):.3f}")
for li in range(len(layers)):
    gs = torch.tensor(stats[f"gates_L{li}"]).mean(0).tolist()
    print(f"  gates L{li} at answer query (cmp, slc, win): {[round(x, 3) for x in gs]}")
# accuracy given hits (beyond only)
anyhit = [any(hs) for hs, b in zip(stats["hits"], beyond) if b]
allhit = [all(hs) for hs, b in zip(stats["hits"], beyond) if b]
okb = [o for o, b in zip(stats["ok"], beyond) if b]
for label, cond in (("any head hit", anyhit), ("all heads hit", allhit)):
    a = [o for o, c in zip(okb, cond) if c]
    na = [o for o, c in zip(okb, cond) if not c]
    print(f"  beyond, {label}: {acc(cond):.1%} of cases; acc when yes {acc(a):.1%} (n={len(a)}), when no "
          f"{acc(na):.1%} (n={len(na)})")
if oracle:
    ob = [o for o, b in zip(stats["ok_oracle"], beyond) if b]
    print(f"  ORACLE (needle block forced): all {acc(stats['ok_oracle']):.1%}  beyond {acc(ob):.1%}")
gaps = []
for i in range(0, len(exs)):
    gaps.append(exs[i].info["gap"])
bins = [0, 64, 128, 192, 256, 320, 384, 448, 520]
line, line2, line3 = [], [], []
for a, b in zip(bins[:-1], bins[1:]):
    sel = [k for k, gp in enumerate(gaps) if a <= gp < b]
    if not sel:
        continue
    line.append(f"{a}-{b}:{acc([stats['ok'][k] for k in sel]):.0%}({len(sel)})")
    line2.append(f"{a}-{b}:" + "/".join(f"{acc([stats['hits'][k][h] for k in sel]):.0%}" for h in range(len(names))))
    if oracle:
        line3.append(f"{a}-{b}:{acc([stats['ok_oracle'][k] for k in sel]):.0%}")
print("  acc by gap:", " ".join(line))
print("  recall by gap (" + "/".join(names) + "):", " ".join(line2))
if oracle:
    print("  oracle acc by gap:", " ".join(line3))
