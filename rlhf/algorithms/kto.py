"""Tensor math of KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

    python train.py algo=kto            # the stage that uses it: rlhf/stages/kto.py

Follows TRL's KTOTrainer (`_compute_loss`, loss_type "kto", TRL 1.12). Pure tensor code; no model state.
"""
from __future__ import annotations

import torch
from torch import Tensor


def kto_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor, reduce=None) -> Tensor:
    """z0: the batch's KL estimate, mean[log pi(y'|x) - log pi_ref(y'|x)] over mismatched (x, y')
    (summed log-probs), averaged over ranks by `reduce` when given, then clamped at 0 and detached:
    no gradient flows through the reference point. Scalar."""
    kl = (kl_logps - ref_kl_logps).mean().detach()
    return (reduce(kl) if reduce is not None else kl).clamp(min=0)


def kto_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, kl: Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example losses (desirable first, then undesirable) and the rewards beta * log(pi / pi_ref).

      desirable    w_d (1 - s(beta (rho - z0)))        KTO eq. 7 (TRL's form: lambda - v(x, y) with
      undesirable  w_u (1 - s(beta (z0 - rho)))        lambda = w scaled out of the value)
    with rho the summed log-ratio of the response and z0 = `kl` (`kto_reference_point`). The batch
    loss is the mean over all of them (TRL: nanmean of the concatenation). Either side may be empty.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
