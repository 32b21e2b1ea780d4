"""`nsa eval`: validation loss/perplexity, a needle-in-a-haystack grid (context length x depth) with a heatmap,
and multi-query associative recall, for any checkpoint of either attention type.

Task answers are scored by teacher forcing: an answer counts as right iff the argmax at every answer position is the
answer byte, which is exactly when greedy generation would produce the answer.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import check_int
from .data import IGNORE, Corpus, DataMix, mqar_example, mqar_max_pairs, niah_example, stdlib_corpus


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def val_loss(model, corpus: Corpus, seq_len: int, num_batches: int = 8, rows: int = 4, seed: int = 1234) -> dict:
    """Mean next-token loss on `num_batches` fixed batches of validation code -> {loss, ppl, tokens}."""
    check_int("num_batches", num_batches, 1)
    was_training = model.training
    model.eval()
    mix = DataMix(corpus, seq_len, rows, {"lm": 1.0}, seed)
    total, count = 0.0, 0
    for step in range(num_batches):
        b = mix.batch(step).to(_device_of(model))
        logits = model(b.input_ids, cu_seqlens=b.cu_seqlens)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += int((b.labels != IGNORE).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return dict(loss=loss, ppl=math.exp(loss), tokens=count)


@torch.no_grad()
def _answers_correct(model, examples, batch_size: int = 16) -> list[bool]:
    """Per example: is the argmax right at every answer position? (equal lengths within a call)"""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids = torch.tensor([e.tokens for e in chunk], device=_device_of(model))
        labels = torch.tensor([e.labels for e in chunk], device=ids.device)
        mask = torch.tensor([e.answer for e in chunk], device=ids.device)
        pred = model(ids).argmax(-1)
        out += (((pred == labels) | ~mask).all(-1)).tolist()
    model.train(was_training)
    return out


def niah_grid(model, corpus: Corpus, lengths=(128, 256, 512), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
              samples: int = 16, window: int | None = None, seed: int = 4321) -> dict:
    """Accuracy per (length, depth) cell, plus accuracy over samples whose needle lies inside / beyond `window`
    tokens of the first answer query (`gap` in `niah_example`)."""
    check_int("niah samples", samples, 1)
    if not lengths or not depths:
        raise ValueError(f"niah lengths and depths must be non-empty, got {lengths!r} and {depths!r}")
    if not all(isinstance(d, (int, float)) and 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"niah depths must lie in [0, 1], got {list(depths)}")
    grid, records = [], []
    for L in lengths:
        row = []
        for j, depth in enumerate(depths):
            g = torch.Generator().manual_seed(seed + 1000 * L + j)
            exs = [niah_example(corpus, L, depth, g) for _ in range(samples)]
            ok = _answers_correct(model, exs)
            row.append(sum(ok) / len(ok))
            records += [dict(length=L, depth=depth, gap=e.info["gap"], correct=r) for e, r in zip(exs, ok)]
        grid.append(row)
    res = dict(lengths=list(lengths), depths=list(depths), accuracy=grid, samples=samples,
               mean=sum(map(sum, grid)) / (len(lengths) * len(depths)), records=records)
    if window is not None:
        res.update(window_split(records, window))
    return res


def window_split(records: list[dict], window: int, length: int | None = None) -> dict:
    """NIAH accuracy of the records (optionally of one context length) whose needle lies inside / beyond the
    window of the first answer query."""
    rs = [r for r in records if length is None or r["length"] == length]
    inside = [r["correct"] for r in rs if r["gap"] < window]
    beyond = [r["correct"] for r in rs if r["gap"] >= window]
    return dict(window=window, inside_window=sum(inside) / len(inside) if inside else None,
                beyond_window=sum(beyond) / len(beyond) if beyond else None, n_inside=len(inside),
                n_beyond=len(beyond), accuracy_all=sum(r["correct"] for r in rs) / len(rs) if rs else None)


def mqar_accuracy(model, length: int, num_pairs: int, samples: int = 32, seed: int = 999) -> dict:
    """Fraction of queried values recalled exactly (one value byte each), over `samples` MQAR sequences."""
    check_int("mqar samples", samples, 1)
    g = torch.Generator().manual_seed(seed)
    exs = [mqar_example(length, num_pairs, g) for _ in range(samples)]
    was_training = model.training
    model.eval()
    right = total = 0
    with torch.no_grad():
        for i in range(0, samples, 16):
            chunk = exs[i:i + 16]
            ids = torch.tensor([e.tokens for e in chunk], device=_device_of(model))
            labels = torch.tensor([e.labels for e in chunk], device=ids.device)
            mask = torch.tensor([e.answer for e in chunk], device=ids.device)
            hit = (model(ids).argmax(-1) == labels) | ~mask
            per_query = hit[mask]  # one answer byte per query
            right += int(per_query.sum())
            total += per_query.numel()
    model.train(was_training)
    return dict(accuracy=right / max(total, 1), queries=total, length=length, num_pairs=num_pairs)


def _mqar_at(model, T: int, max_pairs: int, samples: int) -> dict:
    """MQAR at the trained length with as many pairs as fit (up to max_pairs); skipped when none fits."""
    fit = mqar_max_pairs(T)
    if fit < 1:
        return dict(accuracy=None, skipped=f"seq_len {T} holds no MQAR pair (at least 11 tokens)", length=T)
    return mqar_accuracy(model, T, min(max_pairs, fit), samples)


def plot_niah(result: dict, path: str | Path, title: str = "") -> None:
    """Heatmap of a `niah_grid` result (rows: context length, columns: needle depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 1.5, 0.6 * len(result["lengths"]) + 1.5))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title or "needle in a haystack")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_checkpoint(path: str | Path, out_dir: str | Path | None = None, lengths=None, depths=None,
                        niah_samples: int = 16, mqar_samples: int = 32, val_batches: int = 8, device="cpu") -> dict:
    """Every metric for one checkpoint (or a run folder's latest); writes eval.json and niah.png into out_dir
    when given."""
    from .train import checkpoint_path, load_model

    for name, value in (("val_batches", val_batches), ("niah_samples", niah_samples), ("mqar_samples", mqar_samples)):
        check_int(name, value, 1)
    path = checkpoint_path(path)
    model, cfg, step = load_model(path, device)
    val = stdlib_corpus("val", cfg.val_fraction)
    T = cfg.seq_len
    window = model.cfg.nsa_config().window_size
    lengths = lengths or sorted({max(64, T // 4), max(64, T // 2), T})
    depths = depths or (0.0, 0.25, 0.5, 0.75, 1.0)
    res = dict(checkpoint=str(path), step=step, attention=model.cfg.attention, num_params=model.num_params(),
               val=val_loss(model, val, T, val_batches),
               niah=niah_grid(model, val, lengths, depths, niah_samples, window=window),
               mqar=_mqar_at(model, T, cfg.mqar_pairs[1], mqar_samples))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(res, indent=1))
        plot_niah(res["niah"], out / "niah.png", f"NIAH, {model.cfg.attention} attention (step {step})")
    return res


# ------------------------------------------------------------------------------------------------------ demo
def plot_losses(runs: dict, path: str | Path) -> None:
    """Train-loss curves of several runs ({name: metrics records}) on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in runs.items():
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_ylim(top=min(4.0, max(r["loss"] for recs in runs.values() for r in recs)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x, pct=False):
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.1%}" if pct else (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4f}")


def _demo_run(attention: str, run_dir: str, preset: str, overrides: dict, progress: bool, niah_samples: int,
              mqar_samples: int, threads: int = 0, position: int = 0) -> dict:
    """Train one demo model and evaluate it; writes run_dir/eval.json and niah.png, returns the results."""
    import shutil

    from .train import load_config, load_model, train

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(preset, overrides={**overrides, "model.attention": attention})
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train(cfg, run_dir, progress=progress, progress_position=position)
    model, _, step = load_model(summary["checkpoint"])
    val = stdlib_corpus("val", cfg.val_fraction)
    T = cfg.seq_len
    window = model.cfg.nsa_config().window_size
    lengths = sorted({max(64, T // 4), max(64, T // 2), T})
    niah = niah_grid(model, val, lengths, (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), niah_samples, window=window)
    res = dict(train=summary, val=val_loss(model, val, T, 8), niah=niah,
               niah_at_T=window_split(niah["records"], window, T),
               mqar=_mqar_at(model, T, cfg.mqar_pairs[1], mqar_samples),
               seq_len=T, window=window)
    plot_niah(niah, run_dir / "niah.png", f"NIAH, {attention} attention ({step} steps)")
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    return res


@torch.no_grad()
def _needle_sample(out: Path, names, T: int, window: int, seed: int = 7) -> dict | None:
    """One validation needle beyond the window, at the trained length, asked of each trained model by greedy
    generation (with its decoding cache): what a reader can look at besides the accuracies."""
    from .train import checkpoint_config, load_model

    cfg = checkpoint_config(out / names[0])
    val = stdlib_corpus("val", cfg.val_fraction)
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        ex = niah_example(val, T, float(torch.rand((), generator=g)), g)
        if ex.info["gap"] >= window:
            break
    else:
        return None
    value = ex.info["value"]
    question_end = len(ex.tokens) - len(value) - 1  # the last prompt token ("$"); the answer follows it
    prompt = torch.tensor([ex.tokens[:question_end + 1]])
    answers = {}
    for name in names:
        model, _, _ = load_model(out / name)
        model.eval()
        new = model.generate(prompt, len(value), temperature=0)[0, prompt.shape[1]:].tolist()
        answers[name] = bytes(new).decode(errors="replace")
    said = ", ".join(f"{'NSA' if a == 'nsa' else 'full attention'} answers {answers[a]!r}" for a in names)
    text = (f"Sample needle beyond the window: the line {ex.info['needle'].strip()!r} sits {ex.info['gap']} tokens "
            f"before the question {ex.info['key'] + '=$'!r} (window {window}); {said}.")
    return dict(key=ex.info["key"], value=value, gap=ex.info["gap"], answers=answers, text=text)


def run_demo(out_dir: str | Path = "runs/demo", preset: str = "tiny-cpu", overrides: dict | None = None,
             progress: bool = True, niah_samples: int = 16, mqar_samples: int = 32, jobs: int = 1) -> dict:
    """Train an NSA and a full-attention model with the same preset (same seed, data, steps and, up to the NSA
    gates and φ, parameters), evaluate both, print a side-by-side table, and write loss curves, NIAH heatmaps,
    summary.json and table.md under out_dir. jobs=2 trains the two models at once, one thread each."""
    import os
    import platform
    import shutil

    from .train import read_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    names = ("nsa", "full")
    from .ops import cpu_kernels
    cpu_kernels.load()  # build the compiled CPU kernels once, before the timed runs (cached after the first time)
    start = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_demo_run, args=(a, str(out / a), preset, overrides, progress, niah_samples,
                                                     mqar_samples, 1, i)) for i, a in enumerate(names)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"demo run failed with exit code {p.exitcode}")
        results = {a: json.loads((out / a / "eval.json").read_text()) for a in names}
    else:
        results = {a: _demo_run(a, str(out / a), preset, overrides, progress, niah_samples, mqar_samples)
                   for a in names}
    wall = time.perf_counter() - start
    metrics = {a: read_metrics(out / a) for a in names}
    plot_losses(metrics, out / "loss_curves.png")
    for attention in results:
        shutil.copyfile(out / attention / "niah.png", out / f"niah_{attention}.png")
    n, f = results["nsa"], results["full"]
    T, w = n["seq_len"], n["window"]
    rows = [
        ("parameters", n["train"]["num_params"], f["train"]["num_params"], False),
        ("train steps", n["train"]["final_step"], f["train"]["final_step"], False),
        ("final train loss", n["train"]["final_loss"], f["train"]["final_loss"], False),
        ("val loss (stdlib code, nats/byte)", n["val"]["loss"], f["val"]["loss"], False),
        ("val perplexity", n["val"]["ppl"], f["val"]["ppl"], False),
        (f"NIAH @ {T}, all depths", n["niah_at_T"]["accuracy_all"], f["niah_at_T"]["accuracy_all"], True),
        (f"NIAH @ {T}, needle inside window (<{w})", n["niah_at_T"]["inside_window"],
         f["niah_at_T"]["inside_window"], True),
        (f"NIAH @ {T}, needle beyond window", n["niah_at_T"]["beyond_window"], f["niah_at_T"]["beyond_window"], True),
        ("NIAH, whole grid", n["niah"]["mean"], f["niah"]["mean"], True),
        (f"MQAR @ {T} ({n['mqar']['num_pairs']} pairs)", n["mqar"]["accuracy"], f["mqar"]["accuracy"], True),
        ("train tokens/s", n["train"]["tokens_per_s"], f["train"]["tokens_per_s"], False),
        ("train time (s)", n["train"]["train_time"], f["train"]["train_time"], False),
    ]
    machine = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    lines = ["| metric | NSA | full attention |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(a, pct)} | {_fmt(b, pct)} |" for name, a, b, pct in rows]
    counts = (f"NIAH @ {T}: {n['niah_at_T']['n_inside']} needles inside / {n['niah_at_T']['n_beyond']} beyond the "
              f"window. Wall time, training + evaluation of both models ({jobs} job(s) in parallel): {wall:.0f} s; "
              f"machine: {machine}")
    table = "\n".join(lines + ["", counts])
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    sample = _needle_sample(out, names, T, w)
    if sample is not None:
        print("\n" + sample["text"])
    for res in results.values():
        res["niah"].pop("records")
    summary = dict(results=results, machine=machine, preset=preset, overrides=overrides, jobs=jobs, wall_s=wall,
                   sample=sample)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out}/loss_curves.png, niah_nsa.png, niah_full.png, table.md, summary.json")
    return summary
