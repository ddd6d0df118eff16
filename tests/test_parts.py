"""The registered parts of online RL (rlhf/algorithms/parts.py): each new estimator and loss against a
formula written here with plain loops, GSPO and CISPO against TRL's own GRPOTrainer loss, and the
composition checks that refuse a choice of parts that cannot run."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf.algorithms import parts
from rlhf.algorithms.core import kl_penalty
from rlhf.stages import stages
from rlhf.stages.online import OnlineRLModule

F64 = torch.float64
LENGTHS = [5, 3, 4, 1]
B, T = 4, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    new = old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    return new, old, ref, mask, adv


def _cfg(**kw):
    base = dict(cliprange=0.2, cliprange_high=None, epsilon_max=5.0, response_length=T, gamma=1.0, lam=0.95,
                scale_rewards="group", normalize_advantage=True, loss_agg_mode="token_mean")
    return SimpleNamespace(**{**base, **kw})


def test_every_part_names_its_paper():
    for table in (parts.ADVANTAGE_ESTIMATORS, parts.POLICY_LOSSES, parts.LOSS_AGGREGATIONS):
        for name, part in table.items():
            assert re_year(part.paper), (name, part.paper)


def re_year(text: str) -> bool:
    import re

    return re.search(r"(19|20)\d\d", text) is not None


def test_online_algorithms_are_named_compositions_of_registered_parts():
    online = {n: c for n, c in stages().items() if issubclass(c, OnlineRLModule)}
    assert {"ppo", "grpo", "rloo", "reinforce_pp", "gspo", "cispo"} <= set(online)
    for name, cls in online.items():
        c = cls.Config()
        assert c.advantage_estimator in parts.ADVANTAGE_ESTIMATORS and c.policy_loss in parts.POLICY_LOSSES, name
        assert c.optimizer_steps_per_update == c.epochs * c.num_mini_batches >= 1, name


# ----------------------------------------------------------------------------- estimators
def test_reinforce_pp_is_the_whitened_discounted_return():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    _, _, _, mask, _ = _inputs()
    rewards = torch.where(mask, rewards, 0.0)
    gamma = 0.9
    x = parts.AdvantageInputs(rewards, rewards.sum(1), mask, 1, None, None)
    adv = parts.ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(x, _cfg(gamma=gamma)).token
    returns = []
    for b in range(B):
        row = []
        for t in range(T):
            row.append(sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, LENGTHS[b])) if t < LENGTHS[b] else None)
        returns.append(row)
    flat = [v for row in returns for v in row if v is not None]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1))
    for b in range(B):
        for t in range(T):
            expected = (returns[b][t] - mean) / math.sqrt(std**2 + 1e-8) if t < LENGTHS[b] else 0.0
            assert math.isclose(float(adv[b, t]), expected, abs_tol=1e-9), (b, t)


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_whitens_over_tokens():
    seq = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=F64)  # two groups of two: means 2 and 2
    _, _, _, mask, _ = _inputs()
    x = parts.AdvantageInputs(torch.zeros(B, T, dtype=F64), seq, mask, 2, None, None)
    adv = parts.ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"].fn(x, _cfg()).token
    centred = [-1.0, 1.0, -2.0, 2.0]
    flat = [centred[b] for b in range(B) for _ in range(LENGTHS[b])]  # every token of a response
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1))
    for b in range(B):
        for t in range(T):
            expected = (centred[b] - mean) / math.sqrt(std**2 + 1e-8) if t < LENGTHS[b] else 0.0
            assert math.isclose(float(adv[b, t]), expected, abs_tol=1e-9)


# ----------------------------------------------------------------------------- losses, by formula
def test_gspo_clips_the_length_normalised_sequence_ratio():
    new, old, _, mask, adv = _inputs()
    new = new.clone().requires_grad_()
    cfg = _cfg(cliprange=0.02, cliprange_high=0.03, loss_agg_mode="seq_mean_token_mean")
    tok_adv = adv.unsqueeze(1) * mask
    loss = parts.aggregate(parts.POLICY_LOSSES["gspo"].fn(new, old, tok_adv, mask, cfg)[0], mask, cfg)
    expected = 0.0
    for b in range(B):
        s = math.exp(sum(float(new[b, t] - old[b, t]) for t in range(LENGTHS[b])) / LENGTHS[b])
        a = float(adv[b])
        expected += -min(s * a, min(max(s, 0.98), 1.03) * a) / B
    assert math.isclose(float(loss), expected, rel_tol=1e-12)
    loss.backward()  # d/d log pi_t = -A s / |y| inside the clip range, 0 outside
    for b in range(B):
        s = math.exp(sum(float(new[b, t] - old[b, t]) for t in range(LENGTHS[b])) / LENGTHS[b])
        a = float(adv[b])
        inside = (0.98 <= s <= 1.03) or (s > 1.03 and a < 0) or (s < 0.98 and a > 0)
        for t in range(LENGTHS[b]):
            assert math.isclose(float(new.grad[b, t]), -a * s / LENGTHS[b] / B if inside else 0.0, abs_tol=1e-12)


def test_cispo_keeps_every_gradient_and_bounds_the_weight():
    new, old, _, mask, adv = _inputs()
    new = new.clone().requires_grad_()
    cfg = _cfg(epsilon_max=1.1)
    loss, st = parts.POLICY_LOSSES["cispo"].fn(new, old, adv.unsqueeze(1) * mask, mask, cfg)
    parts.aggregate(loss, mask, cfg).backward()
    n = sum(LENGTHS)
    for b in range(B):
        for t in range(LENGTHS[b]):
            r = math.exp(float(new[b, t] - old[b, t]))
            assert math.isclose(float(new.grad[b, t]), -min(r, 1.1) * float(adv[b]) / n, rel_tol=1e-12)
    assert (new.grad[~mask] == 0).all()


def test_loss_aggregations_by_loop():
    g = torch.Generator().manual_seed(2)
    loss = torch.randn(B, T, generator=g, dtype=F64)
    _, _, _, mask, _ = _inputs()
    rows = [[float(loss[b, t]) for t in range(LENGTHS[b])] for b in range(B)]
    cfg = _cfg()
    assert math.isclose(float(parts.LOSS_AGGREGATIONS["token_mean"].fn(loss, mask, cfg)),
                        sum(map(sum, rows)) / sum(LENGTHS), rel_tol=1e-12)
    assert math.isclose(float(parts.LOSS_AGGREGATIONS["seq_mean_token_mean"].fn(loss, mask, cfg)),
                        sum(sum(r) / len(r) for r in rows) / B, rel_tol=1e-12)
    assert math.isclose(float(parts.LOSS_AGGREGATIONS["seq_mean_token_sum_norm"].fn(loss, mask, cfg)),
                        sum(map(sum, rows)) / (B * T), rel_tol=1e-12)


# ----------------------------------------------------------------------------- against TRL's GRPOTrainer
def _trl_loss(new, old, ref, mask, adv, loss_type, level, eps_low, eps_high, beta):
    """TRL 1.12's `GRPOTrainer._compute_loss`, run on given log-probs through a stand-in trainer."""
    trl = pytest.importorskip("trl")
    acc = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x,
                          num_processes=1, sync_gradients=True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (new, torch.zeros_like(new), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), accelerator=acc,
        max_completion_length=new.shape[1])
    m = mask.long()
    inputs = {"prompt_ids": torch.zeros(B, 0, dtype=torch.long), "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": m.sum()}
    return trl.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("algo,loss_type,level,low,high", [("gspo", "grpo", "sequence", 0.02, 0.03),
                                                          ("cispo", "cispo", "token", 0.2, 1.1),
                                                          ("grpo", "grpo", "token", 0.2, 0.28)])
def test_loss_and_gradient_equal_trls(algo, loss_type, level, low, high):
    new, old, ref, mask, adv = _inputs()
    old = torch.where(mask, old, 1.0)  # padding as our rollout stores it; both sides must ignore it
    c = stages()[algo].Config(cliprange=low, cliprange_high=high if algo != "cispo" else None, epsilon_max=high)
    beta = 0.1
    ours_new = new.clone().requires_grad_()
    loss, _ = parts.POLICY_LOSSES[c.policy_loss].fn(ours_new, old, adv.unsqueeze(1) * mask, mask, c)
    zeros = torch.zeros_like(new)
    kl = kl_penalty(torch.where(mask, ours_new, zeros), torch.where(mask, ref, zeros), "k3")
    ours = parts.aggregate(torch.where(mask, loss + beta * kl, 0.0), mask, c)
    ours.backward()
    trl_new = new.clone().requires_grad_()
    theirs = _trl_loss(trl_new, old, ref, mask, adv, loss_type, level, low, high, beta)
    theirs.backward()
    assert math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
    assert torch.allclose(ours_new.grad, torch.where(mask, trl_new.grad, 0.0), atol=1e-12)


# ----------------------------------------------------------------------------- compositions refused
@pytest.mark.parametrize("algo,kw,message", [
    ("grpo", {"advantage_estimator": "gae"}, "needs a critic"),
    ("reinforce_pp", {"advantage_estimator": "grpo"}, "needs >= 2 generations per prompt"),
    ("reinforce_pp", {"policy_loss": "clipped_sequence"}, "needs one advantage per response"),
    ("rloo", {"kl_in": "loss"}, "put the KL in the reward"),
    ("grpo", {"policy_loss": "nonesuch"}, "policy_loss='nonesuch' is not registered"),
    ("grpo", {"kl_in": "everywhere"}, "kl_in must be one of"),
])
def test_a_composition_that_cannot_run_is_one_line(algo, kw, message):
    with pytest.raises(ValueError, match=message):
        stages()[algo].Config(**kw)
