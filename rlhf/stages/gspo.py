"""GSPO: GRPO with the importance ratio and its clipping at the level of whole responses.

    python train.py algo=gspo                 # SFT -> reward model -> GSPO

Follows Zheng et al. 2025 ("Group Sequence Policy Optimization") as TRL's GRPOTrainer implements it
(`importance_sampling_level="sequence"`; the paper clips at 3e-4 / 4e-4, here 0.02 / 0.03): group-relative
advantages, the length-normalised sequence ratio exp(mean_t log r_t) clipped per response, each
response weighing the same. As parts: grpo, gspo, seq_mean_token_mean, KL in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.stages.grpo import GRPOConfig, GRPOModule


@dataclass
class GSPOConfig(GRPOConfig):
    policy_loss: str = "gspo"
    # The sequence ratio's clip. The paper's 3e-4 / 4e-4 suit a large model's small steps; at this
    # task's learning rate they clip most tokens (measured in docs/algorithms.md, the settings table).
    cliprange: float = 0.02  # low side
    cliprange_high: float | None = 0.03  # high side


class GSPOModule(GRPOModule):
    name = "gspo"
    Config = GSPOConfig
    title = "GSPO policy"
    description = ("GSPO: GRPO's group-relative advantages with a length-normalised sequence-level importance ratio, "
                   "clipped per response, and a k3 KL penalty (`beta`) to the frozen SFT policy.")
    paper = "Zheng et al. 2025 (GSPO), as TRL's GRPOTrainer with importance_sampling_level=sequence"
