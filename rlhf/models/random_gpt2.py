"""A GPT-2-shaped checkpoint with random weights, for running the reference experiment offline at its real size.

    python -m rlhf.models.random_gpt2 OUT_DIR [--size small|medium] [--seed 0]
    python -m rlhf.data.export_synthetic hh.jsonl --pairs 2000   # HH-format preference data, offline
    python train.py experiment=gpt2_hh model.name_or_path=OUT_DIR data.data_files=hh.jsonl

Weights cannot be downloaded on every machine; this writes what `from_pretrained` reads (config,
safetensors, tokenizer) in GPT-2's own configuration (small: 12 layers, 768 wide, 12 heads, 1024
positions, vocabulary 50257, 124M parameters) with GPT-2's real tokenizer, bundled offline. Every
tensor shape, kernel and memory figure of the real model is there; what it learns is not: use it
for timing, memory and plumbing, never for results.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# GPT-2's published shapes; everything else is transformers' GPT2Config default (= GPT-2's config).
SIZES = {"small": dict(n_layer=12, n_embd=768, n_head=12), "medium": dict(n_layer=24, n_embd=1024, n_head=16)}


def save_random_gpt2(out_dir: str | Path, size: str = "small", seed: int = 0) -> Path:
    """Writes a random-init GPT2LMHeadModel of `size` and the bundled GPT-2 tokenizer to `out_dir`.

    Refuses a directory that already holds files: a checkpoint is never overwritten.
    """
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.errors import UserError
    from rlhf.models.tokenizer import load_tokenizer

    if size not in SIZES:
        raise UserError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory; refusing to overwrite it")
    transformers.utils.logging.disable_progress_bar()
    tok = load_tokenizer("gpt2-bundled")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[size], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from rlhf.errors import UserError

    ap = argparse.ArgumentParser(prog="python -m rlhf.models.random_gpt2", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to create (must not hold files)")
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="GPT-2 size (default small, 124M)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = ap.parse_args(argv)
    try:
        out = save_random_gpt2(args.out_dir, args.size, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote a random-weight GPT-2 {args.size} to {out}; run it with model.name_or_path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
