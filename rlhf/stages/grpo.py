"""GRPO: group-relative policy optimisation, no value model.

    python train.py algo=grpo                                   # SFT -> reward model -> GRPO
    python train.py algo=grpo reward.fn=my_module.my_function   # SFT -> GRPO on a reward function

Follows Shao et al. 2024 ("DeepSeekMath") as TRL's GRPOTrainer implements it: `num_generations`
responses per prompt, advantages normalised within each group (`scale_rewards`), a clipped
per-token surrogate, the KL to the reference as a loss term (k3 estimator, `beta`; 0 loads no
reference model), and `loss_type` grpo | dr_grpo (Liu et al. 2025) | dapo (Yu et al. 2025).
Rollout, reward and bookkeeping: `rlhf/stages/online.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms.grpo import LOSS_TYPES, SCALE_REWARDS, group_advantages, grpo_loss
from rlhf.models.sampling import response_logprobs
from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class GRPOConfig(OnlineConfig):
    lr: float = 3e-4  # AdamW learning rate (the root `lr` overrides it)
    batch_size: int = 32  # responses per update: batch_size / num_generations prompts
    num_generations: int = 4  # responses sampled per prompt (the group)
    num_iterations: int = 2  # passes over each rollout batch (mu in the paper; 1: ratios stay 1)
    num_mini_batches: int = 2  # optimizer steps per pass; must divide batch_size
    beta: float = 0.05  # weight of the k3 KL to the reference in the loss (root kl_coef overrides); 0: no reference
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO): what advantages are divided by
    loss_type: str = "grpo"  # grpo: mean per sequence | dr_grpo: sum / (B * response_length) | dapo: per token
    cliprange: float = 0.2  # ratio clip (epsilon); the low side
    cliprange_high: float | None = None  # DAPO's clip-higher; null: the same as cliprange

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("num_iterations", "num_mini_batches", "cliprange")
        self.check_positive("beta", allow_zero=True)
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_mini_batches={self.num_mini_batches}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.cliprange_high is not None and self.cliprange_high < self.cliprange:
            raise ValueError(f"cliprange_high={self.cliprange_high} is below cliprange={self.cliprange}")

    @property
    def generations_per_prompt(self) -> int:
        return self.num_generations


class GRPOModule(OnlineRLModule):
    name = "grpo"
    Config = GRPOConfig
    title = "GRPO policy"
    description = ("GRPO: several responses per prompt, each rewarded relative to its group's mean (no value model), "
                   "a clipped surrogate and a k3 KL penalty (`beta`) to the frozen SFT policy it started from.")
    paper = "Shao et al. 2024 (DeepSeekMath), as TRL's GRPOTrainer"
    kl_field = "beta"

    def __init__(self, cfg: GRPOConfig, model, inputs):
        super().__init__(cfg, model, inputs)
        self.optimizer_steps_per_batch = cfg.num_iterations * cfg.num_mini_batches

    @property
    def uses_reference(self) -> bool:
        return self.cfg.beta > 0

    def update(self, roll: dict) -> tuple[dict, dict]:
        c = self.cfg
        ids, mask, Q, responses = roll["ids"], roll["mask"], roll["context_length"], roll["responses"]
        resp_mask, old, ref = roll["resp_mask"], roll["logprobs"], roll["ref_logprobs"]
        advantages = group_advantages(roll["scores"], c.num_generations, c.scale_rewards)

        def step(mb):
            new = response_logprobs(self.policy, ids[mb], mask[mb], Q, responses[mb], c.temperature)
            loss, st = grpo_loss(new, old[mb], ref[mb] if ref is not None else None, advantages[mb], resp_mask[mb],
                                 c.cliprange, c.cliprange_high, c.beta, c.loss_type, max_response_length=c.response_length)
            self.checked_backward(loss)
            return new, {"loss": loss, **st}

        avg = self.minibatch_steps(roll, c.num_iterations, c.num_mini_batches, step)
        std_in_group = roll["scores"].view(-1, c.num_generations).std(dim=1)
        m = {"loss/policy_avg": avg["loss"], "policy/clipfrac_avg": avg["clipfrac"], "policy/ratio": avg["ratio"],
             "objective/kl_coef": c.beta, "objective/reward_std_in_group": std_in_group.mean(),
             "objective/frac_reward_zero_std": (std_in_group == 0).float().mean(),
             "policy/logprob_gap": avg["logprob_gap"], "policy/logprob_gap_max": avg["logprob_gap_max"]}
        if c.beta > 0:
            m["policy/kl_k3"] = avg["kl"]
        return m, {"policy_loss": "loss/policy_avg", "value_loss": "", "clipfrac": "policy/clipfrac_avg",
                   "logprob_gap_max": "policy/logprob_gap_max", "kl_coef": "objective/kl_coef"}
