"""Tensor math of Direct Preference Optimization (Rafailov et al. 2023) and two of its variants.

    python train.py algo=dpo            # the stage that uses it: rlhf/stages/dpo.py

Follows TRL's `DPOTrainer.dpo_loss`: the same logits, losses and implicit rewards, so curves
compare with TRL runs. Pure tensor code, batch-first; no model or trainer state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards beta * log(pi / pi_ref) of chosen and rejected; each [B].

    logits = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)), then
      sigmoid  -(1 - ls) log s(beta logits) - ls log s(-beta logits)   DPO eq. 7; ls > 0 is the
               conservative DPO of Mitchell 2023, for labels flipped with probability ls
      ipo      (logits - 1 / (2 beta))^2       Azar et al. 2023 eq. 17: regresses the margin to a
               target instead of pushing it to infinity, so it cannot overfit deterministic labels
      hinge    relu(1 - beta logits)           SLiC / RSO (Zhao et al. 2023; Liu et al. 2023)
    The rewards are detached: they are for logging, and for accuracy = mean[chosen > rejected].
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
