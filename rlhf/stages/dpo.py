"""DPO: fit the policy to preference pairs directly, offline, with no reward model and no sampling.

    python train.py algo=dpo                       # SFT -> DPO
    python train.py algo=dpo dpo.loss_type=sigmoid dpo.beta=0.1

Follows Rafailov et al. 2023 ("Direct Preference Optimization") as TRL's DPOTrainer implements it:
the start policy (the SFT export) is also the frozen reference, whose summed log-probs of every
training pair are computed once before the first step (TRL's `precompute_ref_log_probs`), so a
step costs one policy forward and backward over chosen + rejected. Metrics and their units are
TRL's: `rewards/*` = beta * (summed policy log-prob - summed reference log-prob), `logps/*` sums,
for every loss type (IPO's loss alone uses per-token log-ratios). Shared machinery:
`rlhf/stages/preference.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms.dpo import LOSS_TYPES, dpo_loss
from rlhf.stages.preference import PreferenceConfig, PreferenceModule


@dataclass
class DPOConfig(PreferenceConfig):
    lr: float = 2e-4  # AdamW peak learning rate (the root `lr` overrides it)
    # Defaults: on the synthetic task sigmoid at beta 0.1 drives both log-probs down until the policy
    # degenerates (KL ~37 nats, gold win rate 0.56); IPO's bounded target at beta 0.5 learns (docs/algorithms.md).
    beta: float = 0.5  # strength of the implicit KL to the reference: rewards are beta * log(pi / pi_ref)
    loss_type: str = "ipo"  # sigmoid (DPO), ipo (Azar et al. 2023) or hinge (SLiC / RSO)
    label_smoothing: float = 0.0  # sigmoid only: assumed probability that a label is flipped (cDPO)
    rpo_alpha: float = 0.0  # weight of the chosen responses' NLL added to the loss (RPO; TRL's rpo_alpha)

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("label_smoothing", "rpo_alpha", allow_zero=True)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type=sigmoid only, got loss_type={self.loss_type}")


class DPOModule(PreferenceModule):
    name = "dpo"
    Config = DPOConfig
    title = "DPO policy"
    description = ("Direct Preference Optimization on the preference pairs, offline: the policy's log-prob margin "
                   "of chosen over rejected, relative to the frozen start policy's, fit with a logistic (or IPO / "
                   "hinge) loss at strength `beta`. No reward model, no sampling during training.")
    paper = "Rafailov et al. 2023 (DPO); Azar et al. 2023 (IPO); Mitchell 2023 (cDPO); TRL's DPOTrainer"
    kl_field = "beta"  # the KL coefficient of the objective DPO solves: the root kl_coef sets it
    headline = ("dpo_reward_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final",
                "best_step", "best_metric")

    def objective(self, batch, out, ref):
        c = self.cfg
        pc, pr = out["chosen"], out["rejected"]
        losses, rc, rr = dpo_loss(pc, pr, ref[0], ref[1], c.beta, c.loss_type, c.label_smoothing,
                                  out["chosen_tokens"], out["rejected_tokens"])
        dpo = losses.mean()
        m = {"loss/dpo": dpo.detach(), "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
             "rewards/accuracies": (rc > rr).float().mean(), "rewards/margins": (rc - rr).mean(),
             "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        if not c.rpo_alpha:
            return dpo, m
        return dpo + c.rpo_alpha * out["nll"], {**m, "nll_loss": out["nll"].detach()}
