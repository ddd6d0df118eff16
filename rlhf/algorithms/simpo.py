"""Tensor math of SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    python train.py algo=simpo          # the stage that uses it: rlhf/stages/simpo.py

Follows TRL's CPOTrainer with loss_type "simpo" (`cpo_loss`, TRL 1.12; `simpo_gamma` there is
`gamma` here). Pure tensor code; no model state.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and rewards from the responses' MEAN per-token log-probs (length-normalised), [B] each.

      losses = -(1 - ls) logsigmoid(beta (lp_w - lp_l) - gamma) - ls logsigmoid(-(...))   SimPO eq. 6
    (gamma: the target reward margin; ls > 0: labels flipped with that probability, as TRL).
    Rewards: beta * mean log-prob, detached (SimPO's implicit reward, without the margin).
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
