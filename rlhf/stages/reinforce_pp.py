"""REINFORCE++: REINFORCE with PPO's tricks and no critic; the baseline is the whitened global batch.

    python train.py algo=reinforce_pp                                          # SFT -> RM -> REINFORCE++
    python train.py algo=reinforce_pp reinforce_pp.advantage_estimator=reinforce_pp_baseline \
        reinforce_pp.num_generations=4                                         # REINFORCE++-baseline

Follows Hu 2025 ("REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and
Reward Models") as OpenRLHF and verl implement it: the per-token KL penalty in the reward, the
discounted return of each token, advantages whitened over the whole (global) batch instead of a
critic or a per-prompt group, and PPO's token-level clipped surrogate. As parts: reinforce_pp,
clipped, token_mean, KL in the reward.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class ReinforcePPConfig(OnlineConfig):
    num_generations: int = 1  # responses per prompt (>= 2 for reinforce_pp_baseline's group mean)
    num_ppo_epochs: int = 2  # passes over each rollout batch
    num_mini_batches: int = 2  # optimizer steps per pass; must divide batch_size
    kl_coef: float = 0.05  # per-token KL penalty in the reward (the root kl_coef overrides it)
    advantage_estimator: str = "reinforce_pp"

    @property
    def epochs(self) -> int:
        return self.num_ppo_epochs

    @property
    def generations_per_prompt(self) -> int:
        return self.num_generations


class ReinforcePPModule(OnlineRLModule):
    name = "reinforce_pp"
    Config = ReinforcePPConfig
    title = "REINFORCE++ policy"
    description = ("REINFORCE++: per-token KL penalty (`kl_coef`) to the frozen SFT policy in the reward, "
                   "discounted returns whitened over the global batch as advantages (no value model), "
                   "PPO's clipped surrogate.")
    paper = "Hu 2025 (REINFORCE++), as OpenRLHF and verl"
