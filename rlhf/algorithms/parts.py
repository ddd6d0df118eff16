"""Online RL as parts: advantage estimators, policy losses and loss aggregations, each one registered
function with its paper, and the KL placements. An online algorithm is a named choice of them
(`rlhf/stages/online.py` runs any choice; `rlhf/stages/<algo>.py` names one):

    algorithm     advantage_estimator      policy_loss        loss_agg_mode             kl_in
    ppo           gae (critic)             clipped            token_mean                reward (k1)
    grpo          grpo                     clipped            seq_mean_token_mean       loss (k3)
    rloo          rloo                     clipped_sequence   (per sequence)            reward (k1)
    reinforce_pp  reinforce_pp             clipped            token_mean                reward (k1)
    gspo          grpo                     gspo               seq_mean_token_mean       loss (k3)
    cispo         grpo                     cispo              token_mean                loss (k3)

    python train.py algo=grpo grpo.policy_loss=cispo grpo.loss_agg_mode=token_mean   # any other choice

As verl's `core_algos.py` (`register_adv_est`, `register_policy_loss`): a new estimator or loss is
one decorated function here and its test. Pure tensor code, batch-first [batch, response_len].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from rlhf.algorithms.core import masked_whiten
from rlhf.algorithms.grpo import group_advantages
from rlhf.algorithms.ppo import gae
from rlhf.algorithms.rloo import leave_one_out_advantages

KL_PLACEMENTS = ("reward", "loss", "none")  # per token in the reward | k-estimator in the loss | no KL
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class Part:
    fn: Callable
    paper: str
    needs_critic: bool = False  # estimators: reads a value model's predictions
    needs_groups: bool = False  # estimators: compares several responses to one prompt
    per_sequence: bool = False  # estimators: one advantage per response | losses: needs one


ADVANTAGE_ESTIMATORS: dict[str, Part] = {}
POLICY_LOSSES: dict[str, Part] = {}
LOSS_AGGREGATIONS: dict[str, Part] = {}


def _register(table: dict, name: str, **flags):
    def deco(fn):
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = Part(fn, (fn.__doc__ or "").strip().splitlines()[0], **flags)
        return fn
    return deco


def register_adv_est(name: str, *, needs_critic=False, needs_groups=False, per_sequence=False):
    return _register(ADVANTAGE_ESTIMATORS, name, needs_critic=needs_critic, needs_groups=needs_groups,
                     per_sequence=per_sequence)


def register_policy_loss(name: str, *, per_sequence=False):
    return _register(POLICY_LOSSES, name, per_sequence=per_sequence)


def register_loss_agg(name: str):
    return _register(LOSS_AGGREGATIONS, name)


# ----------------------------------------------------------------------------- data between the parts
@dataclass
class AdvantageInputs:
    """What an estimator reads, from one scored rollout (all [B] or [B, T], masks bool)."""
    token_rewards: Tensor  # per token: -kl_coef * KL (KL in the reward), plus the score at the last token
    sequence_rewards: Tensor  # per response: score - kl_coef * summed KL
    mask: Tensor  # response tokens up to and including the stop token
    group_size: int  # responses per prompt, consecutive rows
    values: Tensor | None  # the critic's V(s_t), zero at padding; None without a critic
    all_reduce: Callable | None  # sums a tensor over data-parallel ranks (global whitening)


@dataclass
class Advantages:
    token: Tensor  # [B, T], 0 at padding
    sequence: Tensor | None = None  # [B] when the estimator gives one advantage per response
    returns: Tensor | None = None  # [B, T] the critic's regression targets

    def __getitem__(self, idx) -> "Advantages":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Advantages(self.token[idx], pick(self.sequence), pick(self.returns))


def _per_sequence(adv: Tensor, mask: Tensor) -> Advantages:
    return Advantages(token=adv.unsqueeze(1) * mask.to(adv.dtype), sequence=adv)


# ----------------------------------------------------------------------------- advantage estimators
@register_adv_est("gae", needs_critic=True)
def gae_advantages(x: AdvantageInputs, cfg) -> Advantages:
    """GAE (Schulman et al. 2016) on per-token rewards with a critic, whitened over the batch (PPO, Ouyang et al. 2022)."""
    adv, returns = gae(x.token_rewards, x.values, x.mask, cfg.gamma, cfg.lam)
    return Advantages(token=masked_whiten(adv, x.mask, all_reduce=x.all_reduce), returns=returns)


@register_adv_est("grpo", needs_groups=True, per_sequence=True)
def grpo_advantages(x: AdvantageInputs, cfg) -> Advantages:
    """Group-relative (Shao et al. 2024, DeepSeekMath): reward minus its group's mean, over the group's std (`scale_rewards`)."""
    adv = group_advantages(x.sequence_rewards, x.group_size, cfg.scale_rewards, all_reduce=x.all_reduce)
    return _per_sequence(adv, x.mask)


@register_adv_est("rloo", needs_groups=True, per_sequence=True)
def rloo_advantages(x: AdvantageInputs, cfg) -> Advantages:
    """Leave-one-out (Ahmadian et al. 2024, Back to Basics): reward minus the mean of the group's others, whitened if `normalize_advantage`."""
    adv = leave_one_out_advantages(x.sequence_rewards, x.group_size)
    if cfg.normalize_advantage:
        adv = masked_whiten(adv, torch.ones_like(adv, dtype=torch.bool), all_reduce=x.all_reduce)
    return _per_sequence(adv, x.mask)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} within each response (0 past its end)."""
    w = mask.to(token_rewards.dtype)
    running = torch.zeros_like(token_rewards[:, 0])
    out = torch.zeros_like(token_rewards)
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * w[:, t]
        out[:, t] = running
    return out


@register_adv_est("reinforce_pp")
def reinforce_pp_advantages(x: AdvantageInputs, cfg) -> Advantages:
    """REINFORCE++ (Hu 2025): per-token discounted return of the KL-penalised reward, whitened over the global batch."""
    returns = discounted_returns(x.token_rewards, x.mask, cfg.gamma)
    return Advantages(token=masked_whiten(returns, x.mask, all_reduce=x.all_reduce))


@register_adv_est("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_baseline_advantages(x: AdvantageInputs, cfg) -> Advantages:
    """REINFORCE++-baseline (Hu 2025): response reward minus its group's mean, on every token, whitened over the global batch."""
    grouped = x.sequence_rewards.view(-1, x.group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    tokens = centred.unsqueeze(1) * x.mask.to(centred.dtype)
    return Advantages(token=masked_whiten(tokens, x.mask, all_reduce=x.all_reduce))


# ----------------------------------------------------------------------------- policy losses
# Each returns (loss per token [B, T], or per response [B]; stats: clipfrac, approxkl, ratio). Inputs
# are zeroed at padding first: padded log-probs may be garbage (INVALID_LOGPROB, -inf), and a NaN
# there would poison the backward pass even through a later torch.where.
# The stats in PER_LEVEL are per token, or per response for a `per_sequence` loss (its action is the
# whole response): metrics.csv then names them `<stat>_seq` and the alarms use sequence limits.
PER_LEVEL = ("clipfrac", "approxkl")


def token_mean_of(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the valid tokens; 0 (not NaN) when there are none."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1).to(x.dtype)


def _zero_pad(new: Tensor, old: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    zeros = torch.zeros_like(new)
    return torch.where(mask, new, zeros), torch.where(mask, old, zeros)


@register_policy_loss("clipped")
def clipped_surrogate(new: Tensor, old: Tensor, adv: Tensor, mask: Tensor, cfg) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), with DAPO's clip-higher (Yu et al. 2025, `cliprange_high`)."""
    new, old = _zero_pad(new, old, mask)
    low, high = cfg.cliprange, cfg.cliprange if cfg.cliprange_high is None else cfg.cliprange_high
    logratio = new - old
    ratio = torch.exp(logratio)
    # Pessimistic min: moving the ratio past the trust region in the favoured direction earns nothing.
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - low) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
        stats = {"clipfrac": token_mean_of(clipped.to(ratio.dtype), mask),
                 "approxkl": 0.5 * token_mean_of(logratio**2, mask), "ratio": token_mean_of(ratio, mask)}
    return loss, stats


@register_policy_loss("gspo")
def gspo_loss(new: Tensor, old: Tensor, adv: Tensor, mask: Tensor, cfg) -> tuple[Tensor, dict]:
    """GSPO (Zheng et al. 2025): the length-normalised sequence ratio exp(mean_t log r_t), clipped per response.

    Written per token as the paper's GSPO-token and TRL's `importance_sampling_level="sequence"`:
    s_t = sg(s) * pi_t / sg(pi_t) has the value s and the gradient s * grad log pi_t, so with equal
    advantages along a response it is GSPO exactly, and any per-token advantage still applies.
    """
    new, old = _zero_pad(new, old, mask)
    w = mask.to(new.dtype)
    seq_logratio = ((new - old) * w).sum(1) / w.sum(1).clamp(min=1)
    log_s = new - new.detach() + seq_logratio.detach().unsqueeze(1)
    s = torch.exp(log_s)
    low, high = cfg.cliprange, cfg.cliprange if cfg.cliprange_high is None else cfg.cliprange_high
    loss = -torch.min(s * adv, torch.clamp(s, 1.0 - low, 1.0 + high) * adv)
    with torch.no_grad():
        clipped = ((s < 1.0 - low) & (adv < 0)) | ((s > 1.0 + high) & (adv > 0))
        stats = {"clipfrac": token_mean_of(clipped.to(s.dtype), mask),
                 "approxkl": 0.5 * token_mean_of((new - old) ** 2, mask), "ratio": token_mean_of(s, mask)}
    return loss, stats


@register_policy_loss("cispo")
def cispo_loss(new: Tensor, old: Tensor, adv: Tensor, mask: Tensor, cfg) -> tuple[Tensor, dict]:
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by the detached importance ratio clipped at `epsilon_max`.

    loss_t = -sg(min(r_t, epsilon_max)) * A_t * log pi_t, as TRL's `loss_type="cispo"` (its epsilon_high):
    no token's gradient is dropped by clipping, only its weight bounded.
    """
    new, old = _zero_pad(new, old, mask)
    logratio = new - old
    ratio = torch.exp(logratio)
    weight = torch.clamp(ratio, max=cfg.epsilon_max).detach()
    loss = -weight * adv * new
    with torch.no_grad():
        stats = {"clipfrac": token_mean_of(((ratio > cfg.epsilon_max) & (adv > 0)).to(ratio.dtype), mask),
                 "approxkl": 0.5 * token_mean_of(logratio**2, mask), "ratio": token_mean_of(ratio, mask)}
    return loss, stats


@register_policy_loss("clipped_sequence", per_sequence=True)
def clipped_sequence_surrogate(new: Tensor, old: Tensor, adv: Tensor, mask: Tensor, cfg) -> tuple[Tensor, dict]:
    """RLOO's surrogate (Ahmadian et al. 2024, as TRL's RLOOTrainer): the whole response is one action, ratio exp(sum_t log r_t), clipped.

    Per response [B]; its stats are per response too (approx-KL grows with the response's length).
    """
    new, old = _zero_pad(new, old, mask)
    logratio = (new - old).sum(dim=1)
    ratio = torch.exp(logratio)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    loss = torch.max(pg_losses, pg_losses2)
    with torch.no_grad():
        stats = {"clipfrac": (pg_losses2 > pg_losses).to(ratio.dtype).mean(), "ratio": ratio.mean(),
                 "approxkl": 0.5 * (logratio**2).mean()}
    return loss, stats


# ----------------------------------------------------------------------------- loss aggregation
@register_loss_agg("token_mean")
def token_mean(loss: Tensor, mask: Tensor, cfg) -> Tensor:
    """Every valid token in the minibatch weighs the same (PPO; DAPO, Yu et al. 2025; TRL's loss_type=dapo)."""
    return token_mean_of(loss, mask)


@register_loss_agg("seq_mean_token_mean")
def seq_mean_token_mean(loss: Tensor, mask: Tensor, cfg) -> Tensor:
    """Mean over each response's tokens, then over responses (GRPO, Shao et al. 2024; TRL's loss_type=grpo)."""
    w = mask.to(loss.dtype)
    return (torch.where(mask, loss, 0.0).sum(dim=1) / w.sum(dim=1).clamp(min=1)).mean()


@register_loss_agg("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, cfg) -> Tensor:
    """Sum over tokens / (responses x response_length), a constant (Dr. GRPO, Liu et al. 2025; TRL's loss_type=dr_grpo)."""
    return torch.where(mask, loss, 0.0).sum() / (mask.shape[0] * cfg.response_length)


def aggregate(loss: Tensor, mask: Tensor, cfg) -> Tensor:
    """The minibatch's scalar loss: per-response losses are averaged, per-token ones by `loss_agg_mode`."""
    if loss.dim() == 1:
        return loss.mean()
    return LOSS_AGGREGATIONS[cfg.loss_agg_mode].fn(loss, mask, cfg)


def check_composition(cfg, group_size: int) -> None:
    """One line (ValueError) for a choice of parts that cannot run, before any model is built."""
    for key, table in (("advantage_estimator", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                       ("loss_agg_mode", LOSS_AGGREGATIONS)):
        if getattr(cfg, key) not in table:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not registered; expected one of {', '.join(table)}")
    if cfg.kl_in not in KL_PLACEMENTS:
        raise ValueError(f"kl_in must be one of {', '.join(KL_PLACEMENTS)}, got {cfg.kl_in!r}")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {cfg.kl_estimator!r}")
    est, loss = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator], POLICY_LOSSES[cfg.policy_loss]
    if est.needs_critic and cfg.value_model is None:
        raise ValueError(f"advantage_estimator={cfg.advantage_estimator} needs a critic: set value_model=separate or shared")
    if est.needs_groups and group_size < 2:
        raise ValueError(f"advantage_estimator={cfg.advantage_estimator} compares responses to one prompt: it needs "
                         f">= 2 generations per prompt, got {group_size}")
    if loss.per_sequence and not est.per_sequence:
        raise ValueError(f"policy_loss={cfg.policy_loss} needs one advantage per response; "
                         f"advantage_estimator={cfg.advantage_estimator} gives one per token")
    if loss.per_sequence and cfg.kl_in == "loss":
        raise ValueError(f"policy_loss={cfg.policy_loss} is per response: put the KL in the reward (kl_in=reward)")
