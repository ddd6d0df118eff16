"""Tensor math for PPO-based RLHF.

Follows TRL's PPOTrainer and "The N+ Implementation Details of RLHF with PPO:
A Case Study on TL;DR Summarization" (Huang et al., 2024). Everything here is
pure tensor code with no model or trainer state, so it can be unit-tested on
hand-computed examples. Tensors are batch-first: [batch, response_len].
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.core import _as_weights, kl_penalty, last_index, masked_mean


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    mask = mask.bool()
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    # The reward model only scores the full sequence, so the score is a sparse
    # terminal reward on the last real token. Rows without any valid token get
    # no score (there is nowhere meaningful to put it).
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_any = mask.any(dim=1).to(rewards.dtype)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype) * has_any
    return rewards, kl, non_score_reward


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Values/rewards past the end of the response are zeroed first, so the
    bootstrap value after the last real token is 0 (episode terminates there).
    """
    w = _as_weights(mask, values)
    values = values * w
    rewards = rewards * w
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advs_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advs_reversed.append(lastgaelam)
    advantages = torch.stack(advs_reversed[::-1], dim=1) * w
    returns = (advantages + values) * w
    return advantages, returns


def policy_loss(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate, token mean: the registered parts `clipped` + `token_mean` (what `algo=ppo` runs)."""
    from types import SimpleNamespace

    from rlhf.algorithms import parts

    mask = mask.bool()
    losses, stats = parts.clipped_surrogate(new_logprobs, old_logprobs, advantages, mask,
                                            SimpleNamespace(cliprange=cliprange, cliprange_high=None))
    return parts.token_mean(losses, mask, None), stats


def value_loss(
    vpred: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict]:
    vpredclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf_losses2 > vf_losses1).to(vpred.dtype), mask)}
    return loss, stats


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient from Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences"."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps: int) -> None:
        # Clipping the error bounds the per-update change so one noisy KL
        # estimate cannot blow the coefficient up or collapse it.
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # Only the learned coefficient is state; target/horizon come from config
        # so a resumed run may deliberately change them.
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
