"""Command line: `nsa train`, `nsa eval`, `nsa generate`, `nsa demo` (NSA vs full attention, end to end) and
`nsa compare`."""
from __future__ import annotations

import argparse
import json
import sys


def _value(text: str):
    """A --set value: JSON when it parses (numbers, lists, dicts, true/false/null; also Python's True/False/None),
    else the string."""
    python_words = {"True": True, "False": False, "None": None}
    if text in python_words:
        return python_words[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = _value(value)
    return out


def generate_text(checkpoint: str, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, stop: str | None = None, seed: int = 0, device: str = "cpu",
                  cuda_graph: bool = False) -> list[str]:
    """Continue each prompt with a trained byte-level checkpoint, all prompts in one ragged batch; the
    continuations (stop byte included) as text. `cuda_graph`: decode steps replayed from one CUDA graph (on a
    CUDA device; see `LlamaLM.generate`)."""
    import torch

    from .train import load_model

    data = [p.encode() for p in prompts]
    if not data or not all(data):
        raise ValueError("prompts must be one or more non-empty strings")
    eos = None
    if stop is not None:
        if len(stop.encode()) != 1:
            raise ValueError(f"stop must be one byte (e.g. a newline), got {stop!r}")
        eos = stop.encode()[0]
    model, _, _ = load_model(checkpoint, device)
    if model.cfg.vocab_size != 256:
        raise ValueError(f"checkpoint: generate_text decodes bytes, so vocab_size must be 256, got "
                         f"{model.cfg.vocab_size}")
    model.eval()
    lengths = torch.tensor([len(d) for d in data])
    prompt = torch.zeros(len(data), int(lengths.max()), dtype=torch.long)
    for i, d in enumerate(data):
        prompt[i, :len(d)] = torch.tensor(list(d))
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompt.to(device), max_new_tokens, temperature, top_p, generator=gen,
                             prompt_lengths=lengths, eos_token_id=eos, cuda_graph=cuda_graph).cpu()
    texts = []
    for i, n in enumerate(lengths.tolist()):
        new = out[i, n:n + max_new_tokens].tolist()
        if eos is not None and eos in new:
            new = new[:new.index(eos) + 1]
        texts.append(bytes(new).decode(errors="replace"))
    return texts


def _check_compare_args(args) -> None:
    """`nsa compare`'s sizes, as ValueError naming the flag (before any tensor is made)."""
    for flag in ("seqlen", "heads", "kv_heads", "head_dim"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive int, got {getattr(args, flag)}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")


def main(argv: list[str] | None = None) -> None:
    """Run a command. From the command line (argv None) a ValueError (a bad setting or flag) is reported as one
    line on stderr, exit status 2, without a traceback; called with argv, it propagates."""
    if argv is not None:
        return _main(argv)
    try:
        _main(None)
    except ValueError as exc:
        print(f"ValueError: {exc}", file=sys.stderr)
        sys.exit(2)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a small LM (NSA or full attention); runs under torchrun too")
    tr.add_argument("--preset", default=None, help="tiny-cpu | small-gpu | micro (default tiny-cpu without --config)")
    tr.add_argument("--config", default=None, help="YAML file merged over the preset")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. model.attention=full")
    tr.add_argument("--attention", choices=["nsa", "full"], default=None)
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--out", default="runs/train")
    tr.add_argument("--resume", nargs="?", const=True, default=False,
                    help="resume from the latest checkpoint in --out, or from the given file or folder; without "
                         "--preset/--config the settings are the checkpoint's (then --set)")
    tr.add_argument("--overwrite", action="store_true", help="delete a previous run's checkpoints and metrics in --out")
    tr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="val loss/ppl, NIAH grid + heatmap, MQAR for a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--out", default=None, help="folder for eval.json and niah.png (default: an eval/ folder next to the checkpoint)")
    ev.add_argument("--lengths", type=int, nargs="+", default=None)
    ev.add_argument("--depths", type=float, nargs="+", default=None)
    ev.add_argument("--niah-samples", type=int, default=16)
    ev.add_argument("--mqar-samples", type=int, default=32)
    ev.add_argument("--val-batches", type=int, default=8)
    ev.add_argument("--device", default="cpu")

    gen = sub.add_parser("generate", help="continue text prompts with a checkpoint (bytes are tokens)")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", default=None, help="stop a row after this byte, e.g. $'\\n'")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--cuda-graph", action="store_true", help="replay decode steps from one CUDA graph (CUDA only)")

    demo = sub.add_parser("demo", help="train tiny NSA and full-attention models, compare them side by side")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--preset", default="tiny-cpu")
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for both runs")
    demo.add_argument("--jobs", type=int, default=2, help="train the two models in parallel (one thread each)")
    demo.add_argument("--niah-samples", type=int, default=16)
    demo.add_argument("--no-progress", action="store_true")

    cmp = sub.add_parser("compare", help="NSA vs dense attention ops on random inputs")
    cmp.add_argument("--seqlen", type=int, default=2048)
    cmp.add_argument("--heads", type=int, default=16)
    cmp.add_argument("--kv-heads", type=int, default=4)
    cmp.add_argument("--head-dim", type=int, default=64)
    cmp.add_argument("--backend", action="append", default=None)
    args = parser.parse_args(argv)

    if args.command == "train":
        from .train import load_config, train

        from .train import checkpoint_config, latest_checkpoint

        over = _overrides(args.set)
        if args.attention:
            over["model.attention"] = args.attention
        if args.steps is not None:
            over["steps"] = args.steps
        base = None
        if args.resume and not (args.preset or args.config):  # continue with the checkpoint's own settings
            ckpt = latest_checkpoint(args.out) if args.resume is True else args.resume
            if ckpt is None:
                raise ValueError(f"--resume: {args.out} holds no checkpoint (give --preset or --config to start a "
                                 f"run there)")
            base = checkpoint_config(ckpt).to_dict()
        preset = args.preset or (None if args.config or base else "tiny-cpu")
        cfg = load_config(preset, args.config, over, base=base)
        summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
        print(json.dumps(summary, indent=1))
    elif args.command == "eval":
        from .evaluate import evaluate_checkpoint
        from .train import checkpoint_path

        out = args.out or str(checkpoint_path(args.checkpoint).parent / "eval")
        res = evaluate_checkpoint(args.checkpoint, out, args.lengths, args.depths, args.niah_samples,
                                  args.mqar_samples, args.val_batches, args.device)
        print(json.dumps({k: res[k] for k in ("attention", "step", "val", "mqar")}, indent=1))
        print(f"NIAH mean {res['niah']['mean']:.1%}, inside window {res['niah'].get('inside_window')}, beyond "
              f"{res['niah'].get('beyond_window')}; wrote {out}/eval.json and {out}/niah.png")
    elif args.command == "generate":
        texts = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                              args.stop, args.seed, args.device, args.cuda_graph)
        for prompt, text in zip(args.prompt, texts):
            print(f"{prompt}{text}")
    elif args.command == "demo":
        from .evaluate import run_demo

        over = _overrides(args.set)
        if args.steps is not None:
            over["steps"] = args.steps
        run_demo(args.out, args.preset, over, progress=not args.no_progress, niah_samples=args.niah_samples,
                 jobs=args.jobs)
    elif args.command == "compare":
        from .compare import run_compare

        _check_compare_args(args)
        run_compare(args.seqlen, args.heads, args.kv_heads, args.head_dim, backends=args.backend)


if __name__ == "__main__":
    main()
