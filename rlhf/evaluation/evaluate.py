"""Evaluate a finished run's policy against its SFT (reference) policy on held-out prompts.

    python -m rlhf.evaluation RUN_DIR [--stage grpo] [--prompts 200] [--max-new-tokens N] [--temperature T]

The prompts are the first `--prompts` of the validation split of the run's data config (the pairs
no stage trained on). The policy (the run's last policy stage, e.g. `ppo/model`, or `--stage`'s) and
the reference (the SFT export, or that stage's `policy_path`) each sample one response per prompt
with the same random stream, with the stage's settings by default (`response_length` new tokens,
`temperature`, prompts cut to their last `max_prompt_length` tokens, responses cut after the first
eos). With N responses y_i to prompts x_i:

    reward      mean_i RM(x_i, y_i)                     the run's reward model (when it has one), normalised
    win rate    mean_i [s(y_i) > s(y'_i)] + 0.5 [s(y_i) = s(y'_i)]    policy y vs SFT y'; ties count half
    KL          mean_i sum_t (log pi(y_it | x_i, y_i<t) - log pi_ref(y_it | x_i, y_i<t))
                over the policy's own response tokens (k1, unbiased for KL(pi || pi_ref); nats per
                sequence; log-probs of softmax(logits / temperature), the distribution sampled)
    gold        mean_i gold(x_i, y_i), and the win rate by gold: synthetic data only (omitted otherwise)
    length      mean_i |y_i| in tokens, the stop token included when one was sampled
    distinct-n  |unique n-grams| / |n-grams| over all responses together (whitespace words)

Writes `RUN_DIR/eval.json`, prints a table and rewrites the policy's model card (`README.md`) with
the numbers. A missing run directory or export is one `error:` line on stderr and exit status 1.
Heavy imports (torch, transformers) happen inside the functions, so such errors come back at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from rlhf.errors import UserError
from rlhf.evaluation.held_out import N_SAMPLES, rollout
from rlhf.evaluation.metrics import distinct_n, mean, win_rate


# ----- a run -----

def _cfg_get(config, *keys, default=None):
    node = config
    for k in keys:
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(k)
    return default if node is None else node


def held_out(config, n: int) -> tuple[list[str], Callable | None, str]:
    """The first `n` validation prompts of the run's data config, its gold function (or None), its name."""
    if config is None or _cfg_get(config, "data", "_target_") is None:
        raise UserError("the run has no config.yaml with a data config: cannot tell which prompts are held out")
    from hydra.utils import instantiate

    from rlhf.data import DataError

    try:
        source = instantiate(config.data)
        splits = source.load()
    except (DataError, UserError, OSError, ValueError) as e:
        raise UserError(f"cannot load the run's held-out data ({config.data._target_}): {e}") from None
    except Exception as e:  # hydra wraps import/constructor errors, `datasets` raises its own
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load the run's held-out data ({config.data._target_}): {msg}") from None
    if not splits.val:
        raise UserError(f"the run's data ({config.data._target_}) has no validation split to evaluate on")
    return [p.prompt for p in splits.val[:n]], getattr(source, "gold", None), str(config.data._target_).rsplit(".", 1)[-1]


def evaluate_run(run_dir: str | Path, prompts: int = 200, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int = 0, batch_size: int = 32, device: str = "cpu",
                 artifacts=None, policy=None, stage: str | None = None) -> dict:
    """All metrics of the module docstring for `run_dir`, as the dict `eval.json` holds.

    `artifacts` reuses a loaded `RunArtifacts`; `policy` replaces the run's policy (e.g.
    `artifacts.reference`, which must give KL 0 and win rates 0.5).
    """
    from rlhf.deploy.runs import RunArtifacts

    start = time.time()
    art = artifacts or RunArtifacts(run_dir, device=device, stage=stage)
    cfg, scfg = art.config, {art.stage: art.stage_cfg}
    if max_new_tokens is None:
        max_new_tokens = int(_cfg_get(scfg, art.stage, "response_length", default=16))
    if temperature is None:
        temperature = float(_cfg_get(scfg, art.stage, "temperature", default=1.0))
    max_prompt_length = _cfg_get(scfg, art.stage, "max_prompt_length")
    if prompts <= 0 or max_new_tokens <= 0 or temperature <= 0:
        raise UserError(f"--prompts, --max-new-tokens and --temperature must be > 0 "
                        f"(got {prompts}, {max_new_tokens}, {temperature})")
    texts_in, gold, data_name = held_out(cfg, prompts)

    tok = art.tokenizer
    stop_id = tok.eos_token_id if _cfg_get(scfg, art.stage, "stop_token", default="eos") == "eos" else None
    pol = policy if policy is not None else art.policy
    ref = art.reference
    common = dict(max_new_tokens=max_new_tokens, temperature=temperature, stop_id=stop_id,
                  max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed, device=art.device)
    # The same seed for both: common random numbers, so identical policies give identical samples.
    after = rollout(pol, tok, texts_in, reference=ref, **common)
    before = rollout(ref, tok, texts_in, **common)
    result = {
        "run_dir": str(art.run_dir), "stage": art.stage,
        "policy_dir": str(art.policy_dir) if policy is None else "(given policy)",
        "reference_dir": str(art.reference_dir),
        "reward_model_dir": str(art.reward_dir) if art.reward_dir else None,
        "data": data_name, "split": "val",
        "prompts": len(texts_in), "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
        "kl_to_sft": mean(after["kl"]),
    }
    if art.reward_dir is not None:  # a DPO run, or one rewarded by functions only, has none
        r_after = _score(art, texts_in, after["texts"], batch_size)
        r_before = _score(art, texts_in, before["texts"], batch_size)
        result.update(reward_policy=mean(r_after), reward_sft=mean(r_before), rm_win_rate=win_rate(r_after, r_before))
    if gold is not None:
        g_after = [float(gold(p, t)) for p, t in zip(texts_in, after["texts"])]
        g_before = [float(gold(p, t)) for p, t in zip(texts_in, before["texts"])]
        result.update(gold_policy=mean(g_after), gold_sft=mean(g_before), gold_win_rate=win_rate(g_after, g_before))
    result.update(
        length_policy=mean(after["lengths"]), length_sft=mean(before["lengths"]),
        distinct_1_policy=distinct_n(after["texts"], 1), distinct_1_sft=distinct_n(before["texts"], 1),
        distinct_2_policy=distinct_n(after["texts"], 2), distinct_2_sft=distinct_n(before["texts"], 2),
        seconds=round(time.time() - start, 1),
        samples=[{"prompt": p[-200:], "policy": a, "sft": b}
                 for p, a, b in list(zip(texts_in, after["texts"], before["texts"]))[:N_SAMPLES]],
    )
    return result


def _score(art, prompts: list[str], texts: list[str], batch_size: int) -> list[float]:
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        out += art.score(prompts[i:i + batch_size], texts[i:i + batch_size])
    return out


# ----- output -----

def format_table(result: dict) -> str:
    """The metrics as an aligned plain-text table: policy and SFT side by side, then single numbers."""
    from rlhf.deploy.model_card import METRIC_LABELS

    paired = [m for m in ("reward", "gold", "length", "distinct_1", "distinct_2") if f"{m}_policy" in result]
    single = [k for k in ("rm_win_rate", "gold_win_rate", "kl_to_sft") if k in result]
    rows = [(METRIC_LABELS[m], _num(result[f"{m}_policy"]), _num(result.get(f"{m}_sft"))) for m in paired]
    rows += [(METRIC_LABELS[k], _num(result[k]), "") for k in single]
    header = ("metric", "policy", "sft")
    w0 = max(len(r[0]) for r in [header, *rows])
    w = [max(len(r[i]) for r in [header, *rows]) for i in (1, 2)]
    line = lambda r: f"{r[0]:<{w0}}  {r[1]:>{w[0]}}  {r[2]:>{w[1]}}".rstrip()  # noqa: E731
    title = (f"{result.get('prompts')} held-out prompts ({result.get('data')} {result.get('split')}), "
             f"{result.get('max_new_tokens')} new tokens, temperature {result.get('temperature')}, "
             f"seed {result.get('seed')}")
    return "\n".join([title, line(header), "-" * len(line(header)), *map(line, rows)])


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}"


def update_model_card(run_dir: Path, policy_dir: Path, config, result: dict, stage: str) -> Path:
    """Rewrite the policy export's README.md with the run's metrics and this evaluation."""
    from omegaconf import OmegaConf

    from rlhf.deploy.model_card import write_model_card

    metrics: dict = {}
    try:
        metrics = json.loads((run_dir / "summary.json").read_text())["stages"][stage]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    config = OmegaConf.to_container(config, resolve=True) if config is not None else {}
    ev = {k: v for k, v in result.items() if k not in ("samples", "seconds") and not k.endswith("_dir")}
    return write_model_card(policy_dir, stage, config, metrics, ev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.evaluation", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run directory written by `python train.py`")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts (default 200; fewer if the split is smaller)")
    ap.add_argument("--stage", default=None, help="the policy to evaluate: a stage of the run that produces one "
                    "(default: its last, e.g. ppo, grpo or dpo)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the stage's response_length")
    ap.add_argument("--temperature", type=float, default=None, help="default: the stage's temperature")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for policy and SFT (default 0)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--no-card", action="store_true", help="do not rewrite the policy's model card")
    args = ap.parse_args(argv)
    try:
        if not args.run_dir.is_dir():  # before importing torch: a typo fails at once
            raise UserError(f"run directory {args.run_dir} does not exist")
        for name, v in (("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens),
                        ("--temperature", args.temperature), ("--batch-size", args.batch_size)):
            if v is not None and v <= 0:
                raise UserError(f"{name} must be > 0, got {v}")
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would bury the table
        from rlhf.deploy.runs import RunArtifacts

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        art = RunArtifacts(args.run_dir, device=device, stage=args.stage)
        result = evaluate_run(args.run_dir, args.prompts, args.max_new_tokens, args.temperature, args.seed,
                              args.batch_size, artifacts=art)
        out = args.run_dir / "eval.json"
        tmp = out.with_name("eval.json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
        card = None if args.no_card else update_model_card(args.run_dir, art.policy_dir, art.config, result, art.stage)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.run_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"evaluation of {art.policy_dir} against {art.reference_dir}")
    print(format_table(result))
    print(f"\nwrote {out}" + (f"\nmodel card {card}" if card else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
