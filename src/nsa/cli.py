"""Command line: `nsa compare` (and the training/eval commands as they land)."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="NSA vs dense attention on random inputs")
    cmp.add_argument("--seqlen", type=int, default=2048)
    cmp.add_argument("--heads", type=int, default=16)
    cmp.add_argument("--kv-heads", type=int, default=4)
    cmp.add_argument("--head-dim", type=int, default=64)
    cmp.add_argument("--backend", action="append", default=None)
    demo = sub.add_parser("demo", help="the main demo")
    demo.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args(argv)
    from .compare import run_compare

    if args.command == "compare":
        run_compare(args.seqlen, args.heads, args.kv_heads, args.head_dim, backends=args.backend)
    elif args.command == "demo":
        run_compare(args.seqlen)


if __name__ == "__main__":
    main()
