"""Tensor math of Direct Preference Optimization (Rafailov et al. 2023) and two of its variants.

    python train.py algo=dpo            # the stage that uses it: rlhf/stages/dpo.py

Follows TRL's DPOTrainer (`_compute_loss`, TRL 1.12): the same logits, losses and implicit
rewards, so curves compare with TRL runs. Pure tensor code, batch-first; no model or trainer state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards beta * log(pi / pi_ref) of chosen and rejected; each [B].

    The log-probs are sums over each response's tokens. With log-ratios rho = log pi - log pi_ref:
      sigmoid  -(1 - ls) log s(beta d) - ls log s(-beta d),  d = rho_w - rho_l     DPO eq. 7; ls > 0 is
               the conservative DPO of Mitchell 2023, for labels flipped with probability ls
      ipo      (d' - 1 / (2 beta))^2,  d' = rho_w / n_w - rho_l / n_l   Azar et al. 2023 eq. 17 on the
               per-token log-ratios (`chosen_tokens` n_w, `rejected_tokens` n_l, required): as TRL, so
               the fixed target margin does not depend on the responses' lengths
      hinge    relu(1 - beta d)                 SLiC / RSO (Zhao et al. 2023; Liu et al. 2023)
    The rewards are beta * rho from the summed log-probs for every loss type (TRL logs these for IPO
    too), detached: they are for logging, and for accuracy = mean[chosen > rejected].
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type=ipo needs chosen_tokens and rejected_tokens (per-token log-ratios)")
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
