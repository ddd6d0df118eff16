"""Stage 3, PPO: optimise the policy against the reward, with a KL penalty to a frozen reference
copy of the starting policy.

    python train.py                      # SFT -> reward model -> PPO
    python train.py stage=ppo reward.model_path=RUN/rm/model ppo.policy_path=RUN/sft/model

Follows TRL's PPOTrainer and "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024):
per-token KL penalty, reward-model score at the last token, GAE with a value model initialised from
the reward model, whitened advantages, clipped policy and value losses, EOS truncation with a
missing-EOS penalty, dropout off, linear LR anneal. As parts (`rlhf/algorithms/parts.py`): gae,
clipped, token_mean, KL in the reward; the loop is `rlhf/stages/online.py`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class PPOConfig(OnlineConfig):
    num_ppo_epochs: int = 4  # passes over each rollout batch
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty (the root kl_coef overrides it)
    value_model: str | None = "separate"  # separate: a copy of the reward model; shared: head on the policy

    @property
    def epochs(self) -> int:
        return self.num_ppo_epochs

    @property
    def mini_batch_size(self) -> int:
        return self.batch_size // self.num_mini_batches


class PPOModule(OnlineRLModule):
    name = "ppo"
    Config = PPOConfig
    title = "PPO policy"
    description = ("PPO (TRL-style, \"The N+ Implementation Details of RLHF with PPO\") against the reward, with a "
                   "per-token KL penalty (`kl_coef`) to the frozen SFT policy it started from, and a value model.")
    paper = "Schulman et al. 2017; Ouyang et al. 2022; Huang et al. 2024 (N+ details)"
