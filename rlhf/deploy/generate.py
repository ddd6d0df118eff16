"""Sample completions from a finished run's policy, scored by its reward model.

    python -m rlhf.deploy.generate RUN_DIR --prompt "Any tips on cooking?" [--prompt ...] \
        [--max-new-tokens 32] [--temperature 1.0] [--num-samples 1] [--seed N] [--json]

RUN_DIR is a directory written by `python train.py`; the policy is ppo/model (sft/model when the
run stopped before PPO) and scores come from rm/model when the run has one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

# The HH-RLHF turn markers the models were trained on (same as rlhf.data.pairs; not imported from
# there because rlhf.data pulls in Lightning, seconds of start-up for a one-shot command).
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def format_prompt(prompt: str) -> str:
    """HH-formatted prompts pass through; plain text becomes one human turn awaiting the answer.

    The policy only ever saw "\\n\\nHuman: ...\\n\\nAssistant:" prompts, so a bare question would
    be continued as if it were the human's own text rather than answered.
    """
    if HUMAN in prompt or ASSISTANT in prompt:
        return prompt
    return f"{HUMAN} {prompt.strip()}{ASSISTANT}"


def context_overflow(artifacts, prompt: str, max_new_tokens: int) -> str | None:
    """Why `prompt` + `max_new_tokens` cannot fit the policy's context, or None when it fits.

    Checked up front: past the learned position embeddings the model fails with an index error
    deep inside the forward pass instead of a message the user can act on.
    """
    limit = artifacts.context_length
    if limit is None:
        return None
    n = len(artifacts.tokenizer(prompt).input_ids)
    if n + max_new_tokens <= limit:
        return None
    return (f"prompt is {n} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
            f"context of {limit} tokens")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlhf.deploy.generate",
        description="Sample completions from a run's policy (ppo/model, else sft/model) and score them "
                    "with its reward model (rm/model) when it has one.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `python train.py`")
    p.add_argument("--prompt", action="append", required=True,
                   help='prompt text; repeat for several. A prompt without the HH markers is wrapped as '
                        '"\\n\\nHuman: {prompt}\\n\\nAssistant:"; one containing "\\n\\nHuman:" or '
                        '"\\n\\nAssistant:" is used verbatim.')
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to sample per completion")
    p.add_argument("--temperature", type=positive_float, default=1.0,
                   help="softmax temperature (1.0 = the policy's own distribution, as PPO sampled it)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    p.add_argument("--stage", default=None, help="the policy to sample: a stage of the run that produces one "
                   "(default: its last, e.g. ppo, grpo or dpo)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per sample: {prompt, sample, completion, reward}")
    return p


def run(args: argparse.Namespace) -> list[dict]:
    """Sample and score; one record per (prompt, sample), in prompt order."""
    from rlhf.errors import UserError
    from rlhf.deploy.runs import RunArtifacts

    artifacts = RunArtifacts(args.run_dir, device=args.device, stage=args.stage)
    prompts = [format_prompt(p) for p in args.prompt]
    for i, prompt in enumerate(prompts, 1):
        problem = context_overflow(artifacts, prompt, args.max_new_tokens)
        if problem:
            raise UserError(f"--prompt #{i}: {problem}")
    # One batched call for all prompts x samples (repeats are adjacent), so --seed fixes every sample.
    batch = [p for p in prompts for _ in range(args.num_samples)]
    completions = artifacts.generate(batch, args.max_new_tokens, args.temperature, seed=args.seed)
    rewards = artifacts.score(batch, completions) if artifacts.reward_dir else [None] * len(batch)
    return [{"prompt": p, "sample": i % args.num_samples + 1, "completion": c, "reward": r}
            for i, (p, c, r) in enumerate(zip(batch, completions, rewards))]


def print_records(records: list[dict], num_samples: int, as_json: bool) -> None:
    if as_json:
        for rec in records:
            print(json.dumps(rec))
        return
    for i, rec in enumerate(records):
        if rec["sample"] == 1:
            print(f"=== prompt {i // num_samples + 1} ===")
            print(rec["prompt"].strip("\n"))
        reward = "" if rec["reward"] is None else f"  (reward {rec['reward']:+.4f})"
        print(f"--- sample {rec['sample']}/{num_samples}{reward}")
        print(rec["completion"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.run_dir):  # RunArtifacts says the same, but only after seconds of imports
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 1
    # Imported here, not at the top: --help and argument errors should not wait for torch.
    import transformers

    from rlhf.errors import UserError

    transformers.logging.set_verbosity_error()  # weight-loading reports would bury the samples
    transformers.utils.logging.disable_progress_bar()
    try:
        records = run(args)
    except (UserError, OSError) as e:  # OSError: an export that exists but cannot be read
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print_records(records, args.num_samples, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
