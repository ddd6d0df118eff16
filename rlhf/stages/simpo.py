"""SimPO: reference-free preference optimisation on length-normalised log-probs, with a target margin.

    python train.py algo=simpo                     # SFT -> SimPO
    python train.py algo=simpo simpo.cpo_alpha=0 simpo.lr=1e-4   # the paper's loss alone

Follows Meng et al. 2024 ("SimPO: Simple Preference Optimization with a Reference-Free Reward") as
TRL's CPOTrainer implements it with loss_type "simpo" (`simpo_gamma` there is `gamma` here): the
implicit reward of a response is beta times its mean per-token log-prob under the policy, and the
loss -logsigmoid(r_w - r_l - gamma) asks for a margin of at least gamma. By default the chosen
responses' NLL is added with weight `cpo_alpha` 1 (CPO-SimPO, TRL's `cpo_alpha`): without it the
policy drifts far from the SFT policy on the synthetic task; `simpo.cpo_alpha=0` is the paper's
loss alone. No reference model during training; the end-of-stage evaluation loads the start policy (the SFT export) again as the
baseline, as GRPO with beta 0 does. Metric names are TRL's (`logps/*` are the mean per-token
log-probs). Shared machinery: `rlhf/stages/preference.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms.simpo import simpo_loss
from rlhf.stages.preference import PreferenceConfig, PreferenceModule


@dataclass
class SimPOConfig(PreferenceConfig):
    lr: float = 2e-4  # AdamW peak learning rate (the root `lr` overrides it)
    batch_size: int = 32  # preference pairs per step: 16 fell below the learning bar on some seeds (docs/algorithms.md)
    max_steps: int = 150  # optimizer steps (trainer.max_steps overrides)
    beta: float = 2.5  # reward scale: rewards are beta * mean per-token log-prob
    gamma: float = 5.0  # target reward margin (TRL's simpo_gamma); the best of 0.5-7 over three seeds here (docs/algorithms.md)
    # Default 1 (CPO-SimPO): pure SimPO (0) lengthens the responses and drifts away from the SFT policy
    # on the synthetic task (measured in docs/algorithms.md).
    cpo_alpha: float = 1.0  # weight of the chosen responses' NLL added to the loss (CPO-SimPO; TRL's cpo_alpha)

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("gamma", "cpo_alpha", allow_zero=True)


class SimPOModule(PreferenceModule):
    name = "simpo"
    Config = SimPOConfig
    title = "SimPO policy"
    description = ("SimPO on the preference pairs, reference-free: the policy's mean per-token log-prob of chosen "
                   "over rejected, scaled by `beta`, fit with a logistic loss to exceed the margin `gamma`, plus `cpo_alpha` "
                   "times the chosen responses' NLL. No "
                   "reference or reward model, no sampling during training.")
    paper = "Meng et al. 2024 (SimPO); TRL's CPOTrainer (loss_type simpo)"
    kl_field = None  # no KL to a reference in its objective: the root kl_coef does not apply
    uses_reference = False
    headline = ("simpo_reward_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final",
                "best_step", "best_metric")

    def objective(self, batch, out, ref):
        c = self.cfg
        pc = out["chosen"] / out["chosen_tokens"].clamp(min=1)
        pr = out["rejected"] / out["rejected_tokens"].clamp(min=1)
        losses, rc, rr = simpo_loss(pc, pr, c.beta, c.gamma)
        m = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (rc > rr).float().mean(),
             "rewards/margins": (rc - rr).mean(), "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        if not c.cpo_alpha:
            return losses.mean(), m
        return losses.mean() + c.cpo_alpha * out["nll"], {**m, "nll_loss": out["nll"].detach()}
