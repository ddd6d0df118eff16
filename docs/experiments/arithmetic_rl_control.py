"""Arithmetic: does any update from the verifier, or from the true answers, improve an SFT policy?

    python train.py data=arithmetic 'data.ops="+-"' algo=grpo seed=0        # gives RUN/sft/model
    python docs/experiments/arithmetic_rl_control.py RUN/sft/model --mode grpo --lr 3e-4
    python docs/experiments/arithmetic_rl_control.py RUN/sft/model --mode sft --lr 3e-4   # the control

An experiment of docs/tasks.md (issue 22), outside the stages so that every choice is in view: a
plain group-baseline policy gradient (Williams 1992, with GRPO's group normalisation, Shao et al.
2024) on the task's training problems, rewarded by the task's verifier, against the same loop
trained by cross-entropy on the true answers of the same prompts (`--mode sft`). The true answers
carry everything the verifier can tell, so the control bounds what the reward can teach this model
from these problems with this optimizer. Modes: `grpo` (group-normalised advantages), `dr_grpo`
(group mean subtracted only, Liu et al. 2025), `positive` (only the responses above their group's
mean: rejection-sampling fine-tuning), `sft`. Every `--every` updates it prints the mean
teacher-forced probability of the correct answer and the greedy accuracy, on training problems and
on the held-out ones (all four phrasings of each). With `--sft-pairs N`, for an SFT policy trained
on `data.max_pairs=N` demonstrations (`python train.py data=arithmetic 'data.ops="+-"'
data.max_pairs=N stage=sft seed=0`), the training problems those demonstrations covered and the ones
they did not are reported apart: the loop still prompts with all of them, as reinforcement learning
from verifiable rewards prompts with problems nobody labelled.
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.arithmetic import TEMPLATES, Arithmetic, evaluate, problem_of, verify
from rlhf.data.pairs import ASSISTANT, HUMAN
from rlhf.models.sampling import response_logprobs, sample

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("policy", help="an SFT export of the task (a Hugging Face model directory)")
p.add_argument("--mode", choices=("grpo", "dr_grpo", "positive", "sft"), default="grpo")
p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--warmup", type=int, default=0, help="updates of linear learning-rate warm-up")
p.add_argument("--updates", type=int, default=60)
p.add_argument("--prompts", type=int, default=16, help="prompts per update")
p.add_argument("--group", type=int, default=8, help="responses per prompt")
p.add_argument("--ops", default="+-", help="the task's data.ops")
p.add_argument("--seed", type=int, default=0, help="the task's seed (its split) and the loop's")
p.add_argument("--every", type=int, default=20)
p.add_argument("--sft-pairs", type=int, default=None,
               help="the SFT run's data.max_pairs: report the training problems its demonstrations covered apart")
args = p.parse_args()

torch.manual_seed(args.seed)
rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed + 1)
model = AutoModelForCausalLM.from_pretrained(args.policy)
tok = AutoTokenizer.from_pretrained(args.policy)
tok.padding_side, tok.pad_token = "left", tok.eos_token
eos, R = tok.eos_token_id, 6  # response tokens: room for any answer of the one-digit task and its stop token
train, held_out = Arithmetic(seed=args.seed, ops=args.ops).problems()


def prompt(expression: str, phrasing: int) -> str:
    return f"{HUMAN} {TEMPLATES[phrasing % len(TEMPLATES)].format(expression)}{ASSISTANT}"


def batch_logprobs(prompts: list[str], responses: torch.Tensor, rmask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [B, R] of the responses after the left-padded prompts (0 where masked)."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = torch.cat([enc.input_ids, responses], 1), torch.cat([enc.attention_mask, rmask.long()], 1)
    return response_logprobs(model, ids, mask, enc.input_ids.shape[1], responses) * rmask


def answers(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The true answers with their stop token, as responses [B, R] and their mask."""
    toks = [tok(f" {evaluate(problem_of(q))}").input_ids + [eos] for q in prompts]
    return (torch.tensor([t + [eos] * (R - len(t)) for t in toks]),
            torch.tensor([[True] * len(t) + [False] * (R - len(t)) for t in toks]))


def texts(responses: torch.Tensor) -> list[str]:
    return [tok.decode([t for t in r.tolist() if t != eos]) for r in responses]


@torch.no_grad()
def report(prompts: list[str]) -> str:
    model.eval()
    p_correct = batch_logprobs(prompts, *answers(prompts)).sum(1).exp().mean().item()
    enc = tok(prompts, return_tensors="pt", padding=True)
    greedy, _ = sample(model, enc.input_ids, enc.attention_mask, R, 0.0, eos, eos, tokens_only=True)
    accuracy = sum(map(verify, prompts, texts(greedy))) / len(prompts)
    return f"P(correct) {p_correct:.3f}, greedy {accuracy:.3f}"


held_out_eval = [prompt(e, k) for e in held_out for k in range(len(TEMPLATES))]
evals = {"training": [prompt(e, i) for i, e in enumerate(train[:120])]}
if args.sft_pairs is not None:  # the problems of the SFT run's demonstrations, drawn as that run drew them
    shown = {problem_of(pair.prompt) for pair in Arithmetic(seed=args.seed, ops=args.ops, max_pairs=args.sft_pairs).load().train}
    evals = {"training, in the SFT data": [prompt(e, i) for i, e in enumerate(train) if e in shown][:120],
             "training, not in it": [prompt(e, i) for i, e in enumerate(train) if e not in shown][:120]}
evals["held-out"] = held_out_eval


def report_all() -> str:
    return " | ".join(f"{name} ({len(prompts)}) {report(prompts)}" for name, prompts in evals.items())


opt = (torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-5, weight_decay=0.0) if args.optimizer == "adamw"
       else torch.optim.SGD(model.parameters(), lr=args.lr))
print(f"{args.mode} {args.optimizer} lr {args.lr}, update 0: {report_all()}", flush=True)
rewards, start = [], time.perf_counter()
for update in range(1, args.updates + 1):
    prompts = [q for q in (prompt(rng.choice(train), rng.randrange(4)) for _ in range(args.prompts))
               for _ in range(args.group)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    model.eval()
    responses, _ = sample(model, enc.input_ids, enc.attention_mask, R, 1.0, eos, eos, generator=gen, tokens_only=True)
    is_stop = (responses == eos).long()
    rmask = (is_stop.cumsum(1) - is_stop) == 0  # up to and including the first stop token
    reward = torch.tensor([float(verify(q, t)) for q, t in zip(prompts, texts(responses))])
    rewards.append(reward.mean().item())
    groups = reward.view(args.prompts, args.group)
    centred = groups - groups.mean(1, keepdim=True)
    advantage = {"grpo": centred / (groups.std(1, keepdim=True) + 1e-4), "dr_grpo": centred,
                 "positive": (centred / (groups.std(1, keepdim=True) + 1e-4)).clamp(min=0),
                 "sft": torch.ones_like(groups)}[args.mode].reshape(-1)
    if args.mode == "sft":
        responses, rmask = answers(prompts)
    model.train()
    lp = batch_logprobs(prompts, responses, rmask)
    loss = -(lp.sum(1) / rmask.sum(1) * advantage).mean()  # per-token mean in each response, as GRPO's loss
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, update / args.warmup) if args.warmup else args.lr
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if update % args.every == 0:
        print(f"  update {update}: sampled reward (last {args.every}) {sum(rewards[-args.every:]) / args.every:.3f}, "
              f"{report_all()}, {time.perf_counter() - start:.0f} s", flush=True)
