"""Tensor math of ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model").

    python train.py algo=orpo           # the stage that uses it: rlhf/stages/orpo.py

Follows TRL's ORPOTrainer (`odds_ratio_loss`, TRL 1.12). Pure tensor code; no model state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (as TRL's `log1mexp`)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term from the responses' MEAN per-token log-probs (length-normalised), [B] each.

      log odds(y) = log p - log(1 - p),  p = exp(mean log-prob)         ORPO eqs. 4 and 7
      log_odds    = log odds(y_w) - log odds(y_l)
      losses      = -beta * logsigmoid(log_odds)     (added to the chosen responses' NLL)
    Returns (losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen): the rewards
    are beta * mean log-prob (detached), `log_odds_ratio` = mean logsigmoid(log_odds) and
    `log_odds_chosen` = mean log_odds, TRL's logged values. TRL returns beta * logsigmoid and
    subtracts its mean; here the sign is folded into `losses`.
    """
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    return -beta * ratio, beta * pc.detach(), beta * pr.detach(), ratio.mean(), log_odds.mean()
