"""CISPO: GRPO's group advantages on a REINFORCE loss weighted by clipped, detached importance ratios.

    python train.py algo=cispo                # SFT -> reward model -> CISPO

Follows MiniMax-M1 (MiniMax 2025, "Scaling Test-Time Compute Efficiently with Lightning Attention")
as TRL's GRPOTrainer implements it (`loss_type="cispo"`; its epsilon_high, here `epsilon_max` 2.0): each token's term is
-sg(min(r_t, epsilon_max)) * A * log pi_t, so clipping bounds a token's weight without dropping its
gradient, aggregated over all tokens. As parts: grpo, cispo, token_mean, KL in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.stages.grpo import GRPOConfig, GRPOModule


@dataclass
class CISPOConfig(GRPOConfig):
    policy_loss: str = "cispo"
    loss_agg_mode: str = "token_mean"
    # Upper bound of the detached importance weight (TRL's epsilon_high for cispo). ScaleRL's 5.0 let
    # the KL spike mid-run on this task (docs/algorithms.md, the settings table); 2.0 learns as well without it.
    epsilon_max: float = 2.0


class CISPOModule(GRPOModule):
    name = "cispo"
    Config = CISPOConfig
    title = "CISPO policy"
    description = ("CISPO: GRPO's group-relative advantages on a REINFORCE loss whose importance weights are "
                   "clipped and detached, never dropping a token's gradient, with a k3 KL penalty (`beta`).")
    paper = "MiniMax 2025 (MiniMax-M1, CISPO), as TRL's GRPOTrainer with loss_type=cispo"
