"""Unit tests for rlhf.algorithms.core and .ppo against hand-computed numbers and plain-Python loops."""

import math

import pytest
import torch

from rlhf.algorithms.core import (
    INVALID_LOGPROB,
    entropy_from_logits,
    kl_penalty,
    last_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    truncate_after_stop,
)
from rlhf.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    gae,
    policy_loss,
    value_loss,
)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ---------------------------------------------------------------- masked stats

X = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
M = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
# valid values: 1, 2, 3, 4 -> mean 2.5, biased var 1.25, unbiased var 5/3


def test_masked_mean_bool_and_float_mask():
    assert close(masked_mean(X, M), 2.5)
    assert close(masked_mean(X, M.float()), 2.5)
    assert close(masked_mean(X, M, dim=1), [1.5, 3.5])
    assert close(masked_mean(X, M, dim=0)[:2], [2.0, 3.0])


def test_masked_mean_ignores_inf_outside_mask():
    x = torch.tensor([[1.0, float("inf")], [3.0, float("nan")]])
    m = torch.tensor([[1, 0], [1, 0]])
    assert close(masked_mean(x, m), 2.0)


def test_masked_var_bessel():
    assert close(masked_var(X, M), 5.0 / 3.0)
    assert close(masked_var(X, M, unbiased=False), 1.25)


def test_masked_whiten():
    w = masked_whiten(X, M)
    sd = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = torch.tensor([[(1 - 2.5) / sd, (2 - 2.5) / sd, 0.0], [(3 - 2.5) / sd, (4 - 2.5) / sd, 0.0]])
    assert close(w, expected)
    assert close(masked_mean(w, M), 0.0)
    assert close(masked_var(w, M), 1.0, tol=1e-4)
    assert w[0, 2] == 0 and w[1, 2] == 0

    w2 = masked_whiten(X, M, shift_mean=False)
    assert close(w2[M], expected[M] + 2.5)
    assert close(masked_mean(w2, M), 2.5)
    assert w2[0, 2] == 0 and w2[1, 2] == 0


# ---------------------------------------------------------------- logits

def test_logprobs_from_logits_matches_log_softmax_with_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g)
    tokens = torch.randint(0, 7, (3, 4), generator=g)
    for temp in (1.0, 0.7, 2.0):
        ref = torch.log_softmax(logits / temp, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        out = logprobs_from_logits(logits, tokens, temperature=temp)
        assert out.shape == (3, 4)
        assert close(out, ref)
    # bf16 input still gives float32 log-probs close to the float32 reference
    out_bf16 = logprobs_from_logits(logits.bfloat16(), tokens)
    assert out_bf16.dtype == torch.float32
    ref = torch.log_softmax(logits.bfloat16().float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert close(out_bf16, ref, tol=1e-4)


def test_logprobs_hand_case():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    assert close(logprobs_from_logits(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    # temperature 0.5 squares the odds: probs 1/10, 9/10
    assert close(logprobs_from_logits(logits, torch.tensor([[0]]), temperature=0.5), [[math.log(0.1)]])


def test_entropy_uniform_and_hand_case():
    V = 11
    ent = entropy_from_logits(torch.full((2, 3, V), 4.2))
    assert close(ent, torch.full((2, 3), math.log(V)))
    # temperature does not change a uniform distribution
    assert close(entropy_from_logits(torch.full((1, 1, V), -1.0), temperature=0.3), [[math.log(V)]])
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert close(entropy_from_logits(logits), [[h]])
    # near-one-hot logits must not produce NaN
    sharp = torch.tensor([[[0.0, 1000.0, -1000.0]]])
    assert close(entropy_from_logits(sharp), [[0.0]])


# ---------------------------------------------------------------- KL

def test_kl_estimators_hand_numbers():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    # logr = ref - lp = [-0.5, 1.0, 0.0]
    assert close(kl_penalty(lp, ref, "k1"), [0.5, -1.0, 0.0])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]
    assert close(kl_penalty(lp, ref, "k3"), k3)
    assert kl_penalty(lp, ref, "k1").min() < 0  # k1 can be negative per token
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k9")


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(1)
    lp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_penalty(lp, ref, "k3") >= 0).all()


def test_k1_k3_monte_carlo_expectation_equals_kl():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[samples], q.log()[samples]
    assert abs(kl_penalty(lp, ref, "k1").mean().item() - true_kl) < 0.01
    assert abs(kl_penalty(lp, ref, "k3").mean().item() - true_kl) < 0.01


# ---------------------------------------------------------------- truncation / positions

def test_truncate_after_stop_cases():
    STOP, PAD = 9, 0
    r = torch.tensor([
        [5, 9, 7, 8],  # stop in the middle
        [9, 4, 9, 3],  # stop at position 0 (second stop ignored)
        [1, 2, 3, 4],  # no stop
        [1, 2, 3, 9],  # stop at last position
    ])
    out, mask, has = truncate_after_stop(r, STOP, PAD)
    assert out.tolist() == [[5, 9, 0, 0], [9, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 9]]
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [True, True, False, False],
        [True, False, False, False],
        [True, True, True, True],
        [True, True, True, True],
    ]
    assert has.tolist() == [True, True, False, True]
    assert r[0].tolist() == [5, 9, 7, 8]  # input untouched


def test_truncate_pad_equals_stop():
    EOS = 50256
    r = torch.tensor([[11, EOS, 12, 13], [11, 12, 13, 14]])
    out, mask, has = truncate_after_stop(r, EOS, EOS)
    assert out.tolist() == [[11, EOS, EOS, EOS], [11, 12, 13, 14]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert has.tolist() == [True, False]


def test_truncate_no_stop_token():
    r = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out, mask, has = truncate_after_stop(r, None, 0)
    assert out.tolist() == r.tolist()
    assert mask.all() and mask.dtype == torch.bool
    assert has.tolist() == [False, False]


def test_position_ids_left_padded():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_last_index():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert last_index(m).tolist() == [1, 3, 0, 0]


# ---------------------------------------------------------------- rewards

def test_compute_rewards_places_score_at_last_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, INVALID_LOGPROB], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([10.0, -4.0])
    beta = 0.1
    rewards, kl, nsr = compute_rewards(scores, lp, ref, mask, beta)
    # k1 = lp - ref
    assert close(kl, [[0.5, -1.0, 0.0], [1.0, 1.0, 1.0]])
    assert close(nsr, [[-0.05, 0.1, 0.0], [-0.1, -0.1, -0.1]])
    assert close(rewards, [[-0.05, 0.1 + 10.0, 0.0], [-0.1, -0.1, -0.1 - 4.0]])

    rewards3, kl3, _ = compute_rewards(scores, lp, ref, mask, beta, estimator="k3")
    k3_00 = math.exp(-0.5) - 1 + 0.5
    assert close(kl3[0, 0], k3_00) and kl3[0, 2] == 0
    assert close(rewards3[0, 0], -beta * k3_00)


# ---------------------------------------------------------------- GAE

def gae_reference(rewards, values, mask, gamma, lam):
    """Plain-Python GAE; episode ends at the last masked token with bootstrap value 0."""
    B, T = len(rewards), len(rewards[0])
    advs, rets = [], []
    for b in range(B):
        r = [rewards[b][t] if mask[b][t] else 0.0 for t in range(T)]
        v = [values[b][t] if mask[b][t] else 0.0 for t in range(T)]
        a = [0.0] * T
        running = 0.0
        for t in range(T - 1, -1, -1):
            nv = v[t + 1] if t + 1 < T else 0.0
            running = r[t] + gamma * nv - v[t] + gamma * lam * running
            a[t] = running
        advs.append([a[t] if mask[b][t] else 0.0 for t in range(T)])
        rets.append([a[t] + v[t] if mask[b][t] else 0.0 for t in range(T)])
    return advs, rets


def test_gae_hand_case_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go = [6, 5, 3]
    assert close(adv, [[5.5, 4.0, 1.5]])
    assert close(ret, [[6.0, 5.0, 3.0]])


def test_gae_hand_case_lam0_is_td_error():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    # delta_t = r_t + 0.5 V_{t+1} - V_t
    assert close(adv, [[1 + 0.5 - 0.5, 2 + 0.75 - 1.0, 3 - 1.5]])


def test_gae_matches_python_loop_with_early_mask_end():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    lengths = [6, 3, 1, 5]
    mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    # garbage outside the mask must not leak in
    rewards[~mask] = 123.0
    values[~mask] = -77.0
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ra, rr = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
        assert close(adv, ra)
        assert close(ret, rr)
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_early_end_hand_case():
    # length-2 response in a T=3 buffer; V after the last token is 0, not V[2]
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.5
    d1 = 1.0 + 0.0 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert close(adv, [[d0 + gamma * lam * d1, d1, 0.0]])
    assert close(ret, [[d0 + gamma * lam * d1 + 0.2, d1 + 0.4, 0.0]])


# ---------------------------------------------------------------- policy loss

def test_policy_loss_inside_clip_range():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    new = old + torch.tensor([[0.05, -0.05, 0.0]])
    A = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(new, old, A, mask, cliprange=0.2)
    ratio = [math.exp(0.05), math.exp(-0.05), 1.0]
    expected = -sum(a * r for a, r in zip([1.0, -2.0, 3.0], ratio)) / 3
    assert close(loss, expected)
    assert close(stats["clipfrac"], 0.0)
    assert close(stats["approxkl"], 0.5 * (0.05**2 + 0.05**2 + 0) / 3)
    assert close(stats["ratio"], sum(ratio) / 3)
    assert all(v.dim() == 0 for v in stats.values())


def test_policy_loss_outside_clip_range_both_signs():
    c = 0.2
    # token0: ratio 2, A>0 -> clipped (1.2) is pessimistic: loss -1.2
    # token1: ratio 2, A<0 -> unclipped is pessimistic:   loss +2
    # token2: ratio 0.5, A>0 -> unclipped is pessimistic: loss -0.5
    # token3: ratio 0.5, A<0 -> clipped (0.8) is pessimistic: loss +0.8
    # token4: padded, huge values must be ignored
    lr = [math.log(2), math.log(2), math.log(0.5), math.log(0.5), 5.0]
    old = torch.zeros(1, 5)
    new = torch.tensor([lr])
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = policy_loss(new, old, A, mask, cliprange=c)
    assert close(loss, (-1.2 + 2.0 - 0.5 + 0.8) / 4)
    assert close(stats["clipfrac"], 2 / 4)
    assert close(stats["ratio"], (2 + 2 + 0.5 + 0.5) / 4)
    assert close(stats["approxkl"], 0.5 * (4 * math.log(2) ** 2) / 4)


def test_policy_loss_gradient_zero_when_clipped():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(2.0), math.log(1.1)]], requires_grad=True)
    A = torch.tensor([[1.0, 1.0]])
    loss, _ = policy_loss(new, old, A, torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    assert new.grad[0, 0] == 0  # clipped token gives no gradient
    assert close(new.grad[0, 1], -1.1 / 2)  # d(-ratio/2)/dlogp = -ratio/2


# ---------------------------------------------------------------- value loss

def test_value_loss_clipped_and_unclipped():
    c = 0.2
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    vpred = torch.tensor([[1.1, 2.0, 2.0, 50.0]])
    R = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = value_loss(vpred, old, R, mask, c)
    # t0: inside range: (0.1)^2 both -> 0.01
    # t1: vclipped = 1.2; unclipped (2-3)^2=1, clipped (1.2-3)^2=3.24 -> 3.24 (clip wins)
    # t2: vclipped = 1.2; unclipped (2-0)^2=4, clipped 1.44 -> 4 (unclipped wins)
    expected = 0.5 * (0.01 + 3.24 + 4.0) / 3
    assert close(loss, expected)
    assert close(stats["clipfrac"], 1 / 3)


# ---------------------------------------------------------------- KL controllers

def test_fixed_kl_controller():
    k = FixedKLController(0.05)
    k.update(100.0, 10)
    assert k.value == 0.05
    k2 = FixedKLController(1.0)
    k2.load_state_dict(k.state_dict())
    assert k2.value == 0.05


def test_adaptive_kl_controller_clipped_error():
    k = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    k.update(60.0, n_steps=256)  # error 9 -> clipped to 0.2
    assert math.isclose(k.value, 0.1 * (1 + 0.2 * 256 / 10000))
    k = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    k.update(0.0, n_steps=256)  # error -1 -> clipped to -0.2
    assert math.isclose(k.value, 0.1 * (1 - 0.2 * 256 / 10000))


def test_adaptive_kl_controller_unclipped_and_direction():
    k = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    k.update(4.4, n_steps=100)  # error 0.1
    assert math.isclose(k.value, 0.2 * (1 + 0.1 * 0.1))
    k = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    k.update(torch.tensor(3.0), n_steps=100)  # below target: error -0.25 -> -0.2, decreases
    assert k.value < 0.2
    assert math.isclose(k.value, 0.2 * (1 - 0.2 * 0.1), rel_tol=1e-6)


def test_adaptive_kl_controller_state_dict_round_trip():
    k = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in (8.0, 7.0, 12.0):
        k.update(kl, n_steps=64)
    restored = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(k.state_dict())
    assert restored.value == k.value
    k.update(5.0, 64)
    restored.update(5.0, 64)
    assert restored.value == k.value
