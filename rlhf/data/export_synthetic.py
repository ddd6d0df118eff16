"""Synthetic preference pairs as an HH-RLHF .jsonl file, for running `data=hh_rlhf` offline.

    python -m rlhf.data.export_synthetic hh.jsonl [--pairs 2000] [--seed 0]
    python train.py experiment=gpt2_hh model.name_or_path=DIR data.data_files=hh.jsonl

Each line is {"chosen": prompt + chosen, "rejected": prompt + rejected}, as the hub's rows are.
"""
from __future__ import annotations

import argparse
import sys

from rlhf.data.synthetic import write_hh_file
from rlhf.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.data.export_synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="a .jsonl file to create (never overwritten)")
    ap.add_argument("--pairs", type=int, default=2000, help="number of pairs (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    args = ap.parse_args(argv)
    try:
        n = write_hh_file(args.out, args.pairs, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
