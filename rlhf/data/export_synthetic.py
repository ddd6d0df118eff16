"""Synthetic preference pairs as an HH-RLHF .jsonl file, for running `data=hh_rlhf` offline, or
unpaired in TRL's KTO format.

    python -m rlhf.data.export_synthetic hh.jsonl [--pairs 2000] [--seed 0]
    python train.py experiment=gpt2_hh model.name_or_path=DIR data.data_files=hh.jsonl
    python -m rlhf.data.export_synthetic kto.jsonl --unpaired [--undesirable-fraction 0.25]
    python train.py algo=kto kto.unpaired_path=kto.jsonl

Each line is {"chosen": prompt + chosen, "rejected": prompt + rejected}, as the hub's rows are; with
--unpaired, {"prompt", "completion", "label"} (rlhf/data/unpaired.py).
"""
from __future__ import annotations

import argparse
import sys

from rlhf.data.synthetic import write_hh_file, write_unpaired_file
from rlhf.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.data.export_synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="a .jsonl file to create (never overwritten)")
    ap.add_argument("--pairs", type=int, default=2000, help="number of pairs (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    ap.add_argument("--unpaired", action="store_true", help="TRL's unpaired (KTO) format instead of HH pairs")
    ap.add_argument("--undesirable-fraction", type=float, default=1.0,
                    help="with --unpaired: the share of the rejected responses written as undesirable (default 1)")
    args = ap.parse_args(argv)
    try:
        if args.unpaired:
            n = write_unpaired_file(args.out, args.pairs, args.seed, args.undesirable_fraction)
        else:
            n = write_hh_file(args.out, args.pairs, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} {'examples' if args.unpaired else 'pairs'} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
