"""RLOO: REINFORCE with a leave-one-out baseline, no value model.

    python train.py algo=rloo                 # SFT -> reward model -> RLOO

Follows Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs") as TRL's RLOOTrainer implements it: `rloo_k` responses
per prompt, the per-token KL to the reference folded into each response's reward, each response
baselined by the mean reward of the prompt's other k-1, and a clipped surrogate on the
sequence-level ratio. As parts: rloo, clipped_sequence, KL in the reward. Rollout, reward and
bookkeeping: `rlhf/stages/online.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class RLOOConfig(OnlineConfig):
    batch_size: int = 32  # responses per update: batch_size / rloo_k prompts
    rloo_k: int = 4  # responses sampled per prompt
    num_ppo_epochs: int = 2  # passes over each rollout batch
    num_mini_batches: int = 2  # optimizer steps per pass; must divide batch_size
    kl_coef: float = 0.05  # per-token KL penalty folded into the reward (the root kl_coef overrides it)
    advantage_estimator: str = "rloo"
    policy_loss: str = "clipped_sequence"

    @property
    def epochs(self) -> int:
        return self.num_ppo_epochs

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
