"""Unit tests for rlhf.algorithms.grpo and .rloo against hand-computed numbers and plain-Python loops
(the references below never call back into the code under test)."""

import math
import statistics

import pytest
import torch

from rlhf.algorithms.grpo import group_advantages, grpo_loss, k3_kl
from rlhf.algorithms.rloo import leave_one_out_advantages, rloo_loss, sequence_rewards

F64 = torch.float64
EPS = 1e-4


def close(a, b, tol=1e-10):
    return torch.allclose(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=tol, rtol=0)


# ------------------------------------------------------------ GRPO advantages

# Group 0 = (1, 2, 3): mean 2, unbiased std 1. Group 1 = (5, 5, 5): mean 5, std 0.
# Whole batch: mean 3.5, squared deviations sum 15.5, unbiased var 15.5 / 5 = 3.1.
R = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=F64)


def test_group_advantages_group_mode_hand_computed():
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0]
    assert close(group_advantages(R, 3, "group"), expected)


def test_group_advantages_batch_mode_hand_computed():
    s = math.sqrt(3.1)
    expected = [-1 / (s + EPS), 0.0, 1 / (s + EPS), 0.0, 0.0, 0.0]
    assert close(group_advantages(R, 3, "batch"), expected)


def test_group_advantages_none_mode_hand_computed():
    assert close(group_advantages(R, 3, "none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_group_advantages_groups_are_consecutive_rows():
    # Interleaved grouping would pair (0, 10) and give non-zero advantages.
    assert close(group_advantages(torch.tensor([0.0, 0.0, 10.0, 10.0]), 2, "none"), [0.0] * 4)


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_group_advantages_match_loop(mode):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(20, generator=g, dtype=F64)
    vals = rewards.tolist()
    batch_std = statistics.stdev(vals)
    expected = []
    for start in range(0, 20, 4):
        group = vals[start : start + 4]
        mean = sum(group) / 4
        denom = {"group": statistics.stdev(group) + EPS, "batch": batch_std + EPS, "none": 1.0}[mode]
        expected += [(r - mean) / denom for r in group]
    assert close(group_advantages(rewards, 4, mode), expected)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="unknown scale_rewards 'bogus'"):
        group_advantages(R, 3, "bogus")
    with pytest.raises(ValueError, match="divisible by num_generations=4"):
        group_advantages(R, 4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        group_advantages(R, 1)


# ------------------------------------------------------------ GRPO loss

LENGTHS = [1, 4, 2, 3]  # unequal, so the three normalisations disagree
B, T = 4, 5


# new - old per token (0.7 = padding). Token clips at cliprange 0.2: row 0 t0 (ratio 1.35, A > 0),
# row 1 t1 (0.67, A < 0), row 3 t2 (0.74, A < 0); row 1 t3 (1.22, A < 0) is outside but not clipped.
# Sequence ratios exp(row sum): 1.35, 0.95, 1.28, 1.11, so RLOO clips rows 0 and 2 only.
DELTA = [
    [0.3, 0.7, 0.7, 0.7, 0.7],
    [0.1, -0.4, 0.05, 0.2, 0.7],
    [0.1, 0.15, 0.7, 0.7, 0.7],
    [-0.1, 0.5, -0.3, 0.7, 0.7],
]


def _grpo_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    new = old + torch.tensor(DELTA, dtype=F64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])
    return new, old, ref, adv, mask


def _grpo_loop(new, old, ref, adv, mask, low, high, beta, loss_type, max_len=None):
    """Independent reference: explicit loops over sequences and valid tokens."""
    per_seq_sums, per_seq_counts = [], []
    for b in range(new.shape[0]):
        total, count = 0.0, 0
        for t in range(new.shape[1]):
            if not mask[b][t]:
                continue
            r = math.exp(float(new[b, t]) - float(old[b, t]))
            a = float(adv[b])
            term = -min(r * a, min(max(r, 1 - low), 1 + high) * a)
            if beta > 0:
                d = float(ref[b, t]) - float(new[b, t])
                term += beta * (math.exp(d) - d - 1)
            total += term
            count += 1
        per_seq_sums.append(total)
        per_seq_counts.append(count)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(per_seq_sums, per_seq_counts)) / len(per_seq_sums)
    if loss_type == "dr_grpo":
        return sum(per_seq_sums) / (len(per_seq_sums) * (max_len or new.shape[1]))
    return sum(per_seq_sums) / sum(per_seq_counts)


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("high", [None, 0.28])
def test_grpo_loss_normalisations_match_loop_and_differ(beta, high):
    new, old, ref, adv, mask = _grpo_inputs()
    losses = {}
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        loss, _ = grpo_loss(new, old, ref, adv, mask, 0.2, high, beta, loss_type)
        expected = _grpo_loop(new, old, ref, adv, mask, 0.2, high if high is not None else 0.2, beta, loss_type)
        assert close(loss, expected), loss_type
        losses[loss_type] = float(loss)
    assert abs(losses["grpo"] - losses["dr_grpo"]) > 1e-3
    assert abs(losses["grpo"] - losses["dapo"]) > 1e-3
    assert abs(losses["dr_grpo"] - losses["dapo"]) > 1e-3


def test_grpo_loss_dr_grpo_uses_max_response_length():
    new, old, ref, adv, mask = _grpo_inputs()
    loss, _ = grpo_loss(new, old, ref, adv, mask, loss_type="dr_grpo", max_response_length=16)
    assert close(loss, _grpo_loop(new, old, ref, adv, mask, 0.2, 0.2, 0.0, "dr_grpo", max_len=16))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_ignores_garbage_at_padding_and_mask_dtype(loss_type):
    new, old, ref, adv, mask = _grpo_inputs()
    expected = _grpo_loop(new, old, ref, adv, mask, 0.2, 0.2, 0.1, loss_type)
    pad = ~mask
    # TRL fills padding with 1.0; a model can produce -inf there. Neither may leak into loss or grad.
    new = torch.where(pad, torch.full_like(new, -math.inf), new).requires_grad_()
    old = torch.where(pad, torch.full_like(old, 1.0), old)
    ref = torch.where(pad, torch.full_like(ref, math.nan), ref)
    for m in (mask, mask.long(), mask.to(F64)):
        loss, stats = grpo_loss(new, old, ref, adv, m, beta=0.1, loss_type=loss_type)
        assert close(loss, expected)
        assert all(torch.isfinite(v) for v in stats.values())
    loss.backward()
    assert torch.isfinite(new.grad).all()
    assert (new.grad[pad] == 0).all()


def test_grpo_loss_zero_length_row_is_finite_in_grpo_mode():
    new, old, ref, adv, mask = _grpo_inputs()
    mask[2] = False
    loss, stats = grpo_loss(new, old, ref, adv, mask, beta=0.1, loss_type="grpo")
    assert torch.isfinite(loss)
    # The empty row still counts in the mean over sequences, contributing 0 (as TRL).
    assert close(loss, _grpo_loop(new, old, ref, adv, mask, 0.2, 0.2, 0.1, "grpo"))
    loss, stats = grpo_loss(new, old, ref, adv, torch.zeros_like(mask), beta=0.1)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values())


def _grad_of_one_token(ratio, advantage, low=0.2, high=None):
    old = torch.zeros(1, 1, dtype=F64)
    new = torch.full((1, 1), math.log(ratio), dtype=F64, requires_grad=True)
    loss, stats = grpo_loss(new, old, None, torch.tensor([advantage], dtype=F64), torch.ones(1, 1), low, high)
    loss.backward()
    return float(new.grad), float(stats["clipfrac"])


def test_grpo_clipping_zeroes_gradient_outside_trust_region():
    # ratio 1.5 > 1.2 with A > 0: the clipped (constant) term is the min, so no gradient.
    assert _grad_of_one_token(1.5, 1.0) == (0.0, 1.0)
    # ratio 0.5 < 0.8 with A < 0: likewise clipped.
    assert _grad_of_one_token(0.5, -1.0) == (0.0, 1.0)
    # Inside the region, d/dlogp of -ratio * A is -ratio * A.
    grad, clipfrac = _grad_of_one_token(1.1, 2.0)
    assert math.isclose(grad, -2.2, rel_tol=1e-12) and clipfrac == 0.0
    # Pessimism: ratio 1.5 with A < 0 is not clipped (the unclipped loss is larger).
    grad, clipfrac = _grad_of_one_token(1.5, -1.0)
    assert math.isclose(grad, 1.5, rel_tol=1e-12) and clipfrac == 0.0


def test_grpo_clip_higher_is_asymmetric():
    assert _grad_of_one_token(1.25, 1.0, 0.2, None) == (0.0, 1.0)
    grad, clipfrac = _grad_of_one_token(1.25, 1.0, 0.2, 0.28)
    assert math.isclose(grad, -1.25, rel_tol=1e-12) and clipfrac == 0.0
    # The low side still uses cliprange_low.
    assert _grad_of_one_token(0.75, -1.0, 0.2, 0.28) == (0.0, 1.0)


def test_grpo_stats_against_loop():
    new, old, ref, adv, mask = _grpo_inputs()
    _, stats = grpo_loss(new, old, ref, adv, mask, beta=0.1)
    ratios, kls, clipped = [], [], []
    for b in range(B):
        for t in range(LENGTHS[b]):
            r = math.exp(float(new[b, t] - old[b, t]))
            d = float(ref[b, t] - new[b, t])
            a = float(adv[b])
            ratios.append(r)
            kls.append(math.exp(d) - d - 1)
            clipped.append((r > 1.2 and a > 0) or (r < 0.8 and a < 0))
    assert sum(clipped) == 3  # the hand-picked DELTA, so both branches are exercised
    assert close(stats["ratio"], sum(ratios) / len(ratios))
    assert close(stats["kl"], sum(kls) / len(kls))
    assert close(stats["clipfrac"], sum(clipped) / len(clipped))
    assert float(grpo_loss(new, old, ref, adv, mask, beta=0.0)[1]["kl"]) == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_beta_adds_exactly_beta_times_masked_k3(loss_type):
    new, old, ref, adv, mask = _grpo_inputs()
    base, _ = grpo_loss(new, old, ref, adv, mask, beta=0.0, loss_type=loss_type)
    with_kl, _ = grpo_loss(new, old, ref, adv, mask, beta=0.3, loss_type=loss_type)
    # The same aggregation applied to k3 alone, by loop.
    kl_sums = []
    for b in range(B):
        kl_sums.append(sum(math.exp(d) - d - 1 for d in (float(ref[b, t] - new[b, t]) for t in range(LENGTHS[b]))))
    kl_term = {
        "grpo": sum(s / n for s, n in zip(kl_sums, LENGTHS)) / B,
        "dr_grpo": sum(kl_sums) / (B * T),
        "dapo": sum(kl_sums) / sum(LENGTHS),
    }[loss_type]
    assert close(with_kl - base, 0.3 * kl_term)


def test_k3_kl_hand_computed():
    new = torch.tensor([math.log(0.5), math.log(0.2)], dtype=F64)
    ref = torch.tensor([math.log(0.25), math.log(0.2)], dtype=F64)
    # ref - new = log 0.5: 0.5 - log 0.5 - 1; identical log-probs: 0.
    assert close(k3_kl(new, ref), [0.5 + math.log(2) - 1, 0.0])


def test_grpo_loss_errors():
    new, old, ref, adv, mask = _grpo_inputs()
    with pytest.raises(ValueError, match="unknown loss_type 'bnpo2'"):
        grpo_loss(new, old, ref, adv, mask, loss_type="bnpo2")
    with pytest.raises(ValueError, match=r"advantages must have shape \(4,\)"):
        grpo_loss(new, old, ref, adv[:3], mask)
    with pytest.raises(ValueError, match="must share one"):
        grpo_loss(new, old[:, :3], ref, adv, mask)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        grpo_loss(new, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"max_response_length \(3\) is shorter"):
        grpo_loss(new, old, ref, adv, mask, loss_type="dr_grpo", max_response_length=3)


# ------------------------------------------------------------ RLOO


def test_leave_one_out_hand_computed():
    # Others' means: 2.5, 2, 1.5.
    assert close(leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0], dtype=F64), 3), [-1.5, 0.0, 1.5])


def test_leave_one_out_matches_loop_over_others():
    k = 4
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=F64)
    vals = rewards.tolist()
    expected = []
    for i, r in enumerate(vals):
        start = i - i % k
        others = [vals[j] for j in range(start, start + k) if j != i]
        expected.append(r - sum(others) / len(others))
    assert close(leave_one_out_advantages(rewards, k), expected)


def test_leave_one_out_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="divisible by k=3"):
        leave_one_out_advantages(torch.zeros(4), 3)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sequence_rewards_match_loop(estimator):
    new, _, ref, _, mask = _grpo_inputs()
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    expected_kl = []
    for b in range(B):
        total = 0.0
        for t in range(LENGTHS[b]):
            d = float(ref[b, t] - new[b, t])
            total += -d if estimator == "k1" else math.exp(d) - d - 1
        expected_kl.append(total)
    garbage = torch.where(mask, new, torch.full_like(new, 1.0))
    rewards, kl = sequence_rewards(scores, garbage, ref, mask.long(), kl_coef=0.05, estimator=estimator)
    assert close(kl, expected_kl)
    assert close(rewards, [s - 0.05 * k for s, k in zip(scores.tolist(), expected_kl)])


def test_sequence_rewards_errors():
    new, _, ref, _, mask = _grpo_inputs()
    with pytest.raises(ValueError, match=r"scores must have shape \(4,\)"):
        sequence_rewards(torch.zeros(3), new, ref, mask, 0.1)
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        sequence_rewards(torch.zeros(4), new, ref, mask, 0.1, estimator="k9")


def test_rloo_loss_matches_loop():
    new, old, _, adv, mask = _grpo_inputs()
    losses, logratios, clipped = [], [], []
    for b in range(B):
        lr = sum(float(new[b, t]) - float(old[b, t]) for t in range(LENGTHS[b]))
        r, a = math.exp(lr), float(adv[b])
        l1, l2 = -a * r, -a * min(max(r, 0.8), 1.2)
        losses.append(max(l1, l2))
        logratios.append(lr)
        clipped.append(l2 > l1)
    padded_old = torch.where(mask, old, torch.full_like(old, 1.0))
    loss, stats = rloo_loss(new, padded_old, adv, mask, cliprange=0.2)
    assert clipped == [True, False, True, False]
    assert close(loss, sum(losses) / B)
    assert close(stats["clipfrac"], sum(clipped) / B)
    assert close(stats["ratio"], sum(math.exp(x) for x in logratios) / B)
    assert close(stats["approxkl"], 0.5 * sum(x * x for x in logratios) / B)


def test_rloo_clipping_zeroes_gradient():
    # Sequence ratio exp(0.3 + 0.2) ~ 1.65 > 1.2 with A > 0: clipped, no gradient to any token.
    old = torch.zeros(1, 3, dtype=F64)
    new = torch.tensor([[0.3, 0.2, 5.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss, stats = rloo_loss(new, old, torch.tensor([1.0], dtype=F64), mask)
    loss.backward()
    assert close(loss, -1.2) and float(stats["clipfrac"]) == 1.0
    assert (new.grad == 0).all()
    # Inside the region every valid token gets d(-A * ratio)/dlogp = -A * ratio.
    new = torch.tensor([[0.05, 0.05, 5.0]], dtype=F64, requires_grad=True)
    loss, stats = rloo_loss(new, old, torch.tensor([2.0], dtype=F64), mask)
    loss.backward()
    assert close(new.grad, [[-2 * math.exp(0.1), -2 * math.exp(0.1), 0.0]]) and float(stats["clipfrac"]) == 0.0


def test_rloo_loss_errors():
    new, old, _, adv, mask = _grpo_inputs()
    with pytest.raises(ValueError, match=r"advantages must have shape \(4,\)"):
        rloo_loss(new, old, adv[:2], mask)
    with pytest.raises(ValueError, match="must share one"):
        rloo_loss(new, old, adv, mask[:, :2])
