"""Tensor math for RLOO, REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

Semantics follow TRL's RLOOTrainer: the per-token KL is folded into one sequence-level reward, each
of the k samples of a prompt is baselined by the mean reward of the other k-1, and the update is a
PPO-style clipped surrogate on the whole-sequence ratio. One layout difference: TRL stacks the k
copies of the batch (row = sample * n_prompts + prompt); here each prompt's k samples are consecutive
rows, as in GRPO. Meant for the RLOO stage (`python train.py algo=rloo`); pure tensor code,
batch-first [batch, response_len].
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.core import kl_penalty


def leave_one_out_advantages(rewards: Tensor, k: int) -> Tensor:
    """advantage_i = r_i - mean_{j != i} r_j over each group of k consecutive rows."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt for a leave-one-out baseline, got k={k}")
    if rewards.dim() != 1 or rewards.numel() % k != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by k={k}, got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, k)
    # (sum - r_i) / (k - 1) is the others' mean: one pass instead of k masked means.
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def sequence_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """rewards[b] = scores[b] - kl_coef * sum_t kl[b, t] over valid tokens; returns (rewards, kl sums).

    RLOO treats the whole response as one action, so the KL penalty is summed into the scalar
    reward rather than spread over tokens as in PPO.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, ref_logprobs and mask must share one [B, T] shape, got "
            f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must have shape ({mask.shape[0]},), got {tuple(scores.shape)}")
    mask = mask.bool()
    zeros = torch.zeros_like(logprobs)
    # Padded positions become log-prob 0 on both sides, i.e. exactly zero KL under every estimator.
    kl = kl_penalty(torch.where(mask, logprobs, zeros), torch.where(mask, ref_logprobs, zeros), estimator).sum(dim=1)
    return scores.to(kl.dtype) - kl_coef * kl, kl


def rloo_loss(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate on the sequence-level ratio exp(sum_t new - sum_t old), mean over sequences: the
    registered part `clipped_sequence` (what `algo=rloo` runs), in one call."""
    if new_logprobs.shape != old_logprobs.shape or new_logprobs.shape != mask.shape or new_logprobs.dim() != 2:
        raise ValueError(
            f"new_logprobs, old_logprobs and mask must share one [B, T] shape, got "
            f"{tuple(new_logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != (mask.shape[0],):
        raise ValueError(
            f"advantages must have shape ({mask.shape[0]},) (one per sequence), got {tuple(advantages.shape)}"
        )
    from types import SimpleNamespace

    from rlhf.algorithms.parts import clipped_sequence_surrogate

    losses, stats = clipped_sequence_surrogate(new_logprobs, old_logprobs, advantages.to(new_logprobs.dtype),
                                               mask.bool(), SimpleNamespace(cliprange=cliprange))
    loss = losses.mean()
    return loss, stats
