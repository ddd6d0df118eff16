"""GRPO: group-relative policy optimisation, no value model.

    python train.py algo=grpo                                   # SFT -> reward model -> GRPO
    python train.py algo=grpo reward.fn=my_module.my_function   # SFT -> GRPO on a reward function

Follows Shao et al. 2024 ("DeepSeekMath") as TRL's GRPOTrainer implements it: `num_generations`
responses per prompt, advantages normalised within each group (`scale_rewards`), a clipped
per-token surrogate, the KL to the reference as a loss term (k3 estimator, `beta`; 0 loads no
reference model), and `loss_agg_mode` seq_mean_token_mean (TRL's grpo) | seq_mean_token_sum_norm
(dr_grpo, Liu et al. 2025) | token_mean (dapo, Yu et al. 2025). As parts: grpo, clipped,
seq_mean_token_mean, KL in the loss. Rollout, reward and bookkeeping: `rlhf/stages/online.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class GRPOConfig(OnlineConfig):
    batch_size: int = 32  # responses per update: batch_size / num_generations prompts
    num_generations: int = 4  # responses sampled per prompt (the group)
    # Passes over each rollout batch (mu in the paper). With one pass and one minibatch every ratio
    # stays 1; with more minibatches the later ones already see an updated policy.
    num_iterations: int = 2
    num_mini_batches: int = 2  # optimizer steps per pass; must divide batch_size
    beta: float = 0.05  # weight of the KL to the reference in the loss (root kl_coef overrides); 0: no reference
    advantage_estimator: str = "grpo"
    loss_agg_mode: str = "seq_mean_token_mean"
    kl_in: str = "loss"
    kl_estimator: str = "k3"

    @property
    def epochs(self) -> int:
        return self.num_iterations

    @property
    def kl_coef_name(self) -> str:
        return "beta"

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
