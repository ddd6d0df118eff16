"""Tensor math for GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models"), with the Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
Training") and DAPO (Yu et al. 2025) loss normalisations.

Semantics follow TRL's GRPOTrainer (advantage scaling, per-token clipped surrogate, k3 KL and the
"grpo" / "dr_grpo" / "dapo" aggregations). Meant for the GRPO stage (`python train.py algo=grpo`);
pure tensor code, batch-first [batch, response_len], no model or trainer state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.core import kl_penalty

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
# TRL's loss_type names -> the registered aggregations (`rlhf/algorithms/parts.py`, `loss_agg_mode`).
AGGREGATION = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean"}


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4, all_reduce=None
) -> Tensor:
    """Group-relative advantages for rewards laid out as consecutive groups of `num_generations`.

    "group": (r - group mean) / (group std + eps)  (GRPO paper, TRL default)
    "batch": (r - group mean) / (batch std + eps)  (more robust when a group's rewards are all equal)
    "none":  r - group mean                         (Dr. GRPO: std scaling biases towards easy/hard prompts)

    Groups never span processes; the batch std is over every process's rewards (`all_reduce` sums a
    tensor over data-parallel ranks), as TRL gathers the rewards before taking it.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}")
    if num_generations < 2:
        # A group of one has no baseline to compare against (and an undefined unbiased std).
        raise ValueError(f"num_generations must be >= 2 for group-relative advantages, got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        # Unbiased std, as TRL (torch.std default); eps keeps all-equal groups at exactly 0.
        std = grouped.std(dim=1).repeat_interleave(num_generations)
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (_global_std(rewards, all_reduce) + eps)
    return advantages


def _global_std(x: Tensor, all_reduce=None) -> Tensor:
    """Unbiased std of `x` over every rank's values (this rank's alone without `all_reduce`)."""
    if all_reduce is None:
        return x.std()
    x64 = x.double()
    n, total = all_reduce(torch.stack([x64.new_tensor(x.numel()), x64.sum()]))
    sq = all_reduce(((x64 - total / n) ** 2).sum())  # two passes: no cancellation
    return (sq / (n - 1)).sqrt().to(x.dtype)


def k3_kl(new_logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(ref - new) - (ref - new) - 1, always >= 0."""
    return kl_penalty(new_logprobs, ref_logprobs, "k3")


def grpo_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cliprange_low: float = 0.2,
    cliprange_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate (+ beta * k3 KL to the reference), aggregated per `loss_type` (TRL's names):
    the registered parts `algo=grpo` runs (`clipped`, the k3 KL in the loss, `AGGREGATION[loss_type]`), in one call.

    new/old/ref logprobs and mask: [B, T]; advantages: [B], one per sequence, shared by its tokens.
    `cliprange_high` > `cliprange_low` is DAPO's "clip-higher". `ref_logprobs` may be None when beta == 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if new_logprobs.shape != old_logprobs.shape or new_logprobs.shape != mask.shape or new_logprobs.dim() != 2:
        raise ValueError(
            f"new_logprobs, old_logprobs and mask must share one [B, T] shape, got "
            f"{tuple(new_logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    batch, width = mask.shape
    if advantages.shape != (batch,):
        raise ValueError(f"advantages must have shape ({batch},) (one per sequence), got {tuple(advantages.shape)}")
    if beta > 0 and (ref_logprobs is None or ref_logprobs.shape != mask.shape):
        raise ValueError(f"beta > 0 needs ref_logprobs of shape {tuple(mask.shape)}")
    if max_response_length is None:
        max_response_length = width
    if loss_type == "dr_grpo" and max_response_length < width:
        raise ValueError(f"max_response_length ({max_response_length}) is shorter than the responses ({width})")
    from types import SimpleNamespace

    from rlhf.algorithms import parts

    mask = mask.bool()
    cfg = SimpleNamespace(cliprange=cliprange_low, cliprange_high=cliprange_high, response_length=max_response_length,
                          loss_agg_mode=AGGREGATION[loss_type])
    adv = advantages.to(new_logprobs.dtype).unsqueeze(1) * mask.to(new_logprobs.dtype)
    per_token_loss, stats = parts.clipped_surrogate(new_logprobs, old_logprobs, adv, mask, cfg)
    stats.pop("approxkl")
    if beta > 0:
        zeros = torch.zeros_like(new_logprobs)
        per_token_kl = k3_kl(torch.where(mask, new_logprobs, zeros), torch.where(mask, ref_logprobs, zeros))
        per_token_loss = per_token_loss + beta * per_token_kl
        stats["kl"] = parts.token_mean_of(per_token_kl.detach(), mask)
    else:
        stats["kl"] = new_logprobs.new_zeros(())
    loss = parts.aggregate(torch.where(mask, per_token_loss, 0.0), mask, cfg)
    return loss, stats
