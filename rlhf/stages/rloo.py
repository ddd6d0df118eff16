"""RLOO: REINFORCE with a leave-one-out baseline, no value model.

    python train.py algo=rloo                 # SFT -> reward model -> RLOO

Follows Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs") as TRL's RLOOTrainer implements it: `rloo_k` responses
per prompt, the per-token KL to the reference folded into each response's reward, each response
baselined by the mean reward of the prompt's other k-1, and a clipped surrogate on the
sequence-level ratio. Rollout, reward and bookkeeping: `rlhf/stages/online.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms import core
from rlhf.algorithms.rloo import leave_one_out_advantages, rloo_loss, sequence_rewards
from rlhf.models.sampling import response_logprobs
from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class RLOOConfig(OnlineConfig):
    lr: float = 3e-4  # AdamW learning rate (the root `lr` overrides it)
    batch_size: int = 32  # responses per update: batch_size / rloo_k prompts
    rloo_k: int = 4  # responses sampled per prompt
    num_ppo_epochs: int = 2  # passes over each rollout batch
    num_mini_batches: int = 2  # optimizer steps per pass; must divide batch_size
    kl_coef: float = 0.05  # per-token KL penalty folded into the reward (the root kl_coef overrides it)
    kl_estimator: str = "k1"  # k1: log p/q (unbiased, can be < 0); k3: (r-1) - log r (>= 0)
    cliprange: float = 0.2  # clip of the sequence-level ratio
    normalize_advantage: bool = True  # whiten the advantages over the batch (TRL's `normalize_advantage`)

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("num_ppo_epochs", "num_mini_batches", "cliprange")
        self.check_positive("kl_coef", allow_zero=True)
        if self.rloo_k < 2:
            raise ValueError(f"rloo_k must be >= 2 (the baseline is the other responses' mean), got {self.rloo_k}")
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_mini_batches={self.num_mini_batches}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")

    @property
    def generations_per_prompt(self) -> int:
        return self.rloo_k


class RLOOModule(OnlineRLModule):
    name = "rloo"
    Config = RLOOConfig
    title = "RLOO policy"
    description = ("RLOO: REINFORCE with k responses per prompt, each baselined by the mean reward of the others "
                   "(no value model), the per-token KL (`kl_coef`) to the frozen SFT policy folded into the reward.")
    paper = "Ahmadian et al. 2024 (Back to Basics), as TRL's RLOOTrainer"

    def __init__(self, cfg: RLOOConfig, model, inputs):
        super().__init__(cfg, model, inputs)
        self.optimizer_steps_per_batch = cfg.num_ppo_epochs * cfg.num_mini_batches

    def update(self, roll: dict) -> tuple[dict, dict]:
        c = self.cfg
        ids, mask, Q, responses = roll["ids"], roll["mask"], roll["context_length"], roll["responses"]
        resp_mask, old = roll["resp_mask"], roll["logprobs"]
        rewards, kl = sequence_rewards(roll["scores"], old, roll["ref_logprobs"], resp_mask, c.kl_coef, c.kl_estimator)
        advantages = leave_one_out_advantages(rewards, c.rloo_k)
        if c.normalize_advantage:
            advantages = core.masked_whiten(advantages, torch.ones_like(advantages, dtype=torch.bool),
                                            all_reduce=self.sum_over_ranks)

        def step(mb):
            new = response_logprobs(self.policy, ids[mb], mask[mb], Q, responses[mb], c.temperature)
            loss, st = rloo_loss(new, old[mb], advantages[mb], resp_mask[mb], c.cliprange)
            self.checked_backward(loss)
            return new, {"loss": loss, **st}

        avg = self.minibatch_steps(roll, c.num_ppo_epochs, c.num_mini_batches, step)
        m = {"loss/policy_avg": avg["loss"], "policy/clipfrac_avg": avg["clipfrac"], "policy/ratio": avg["ratio"],
             "policy/approxkl_avg": avg["approxkl"], "objective/kl": kl.mean(), "objective/kl_coef": c.kl_coef,
             "objective/rlhf_reward": rewards.mean(), "policy/logprob_gap": avg["logprob_gap"],
             "policy/logprob_gap_max": avg["logprob_gap_max"]}
        return m, {"policy_loss": "loss/policy_avg", "value_loss": "", "kl_divergence": "objective/kl",
                   "clipfrac": "policy/clipfrac_avg", "approxkl": "policy/approxkl_avg",
                   "logprob_gap_max": "policy/logprob_gap_max", "kl_coef": "objective/kl_coef"}
