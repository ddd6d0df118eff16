"""ORPO: odds-ratio preference optimisation from the base model, in place of SFT then preference tuning.

    python train.py algo=orpo                      # SFT (the comparison baseline) -> ORPO from the base model
    python train.py algo=orpo orpo.beta=0.2 orpo.init_path=/models/base

Follows Hong et al. 2024 ("ORPO: Monolithic Preference Optimization without Reference Model") as
TRL's ORPOTrainer implements it: loss = NLL of the chosen response + beta * -logsigmoid(log odds
ratio of chosen over rejected), the odds from the mean per-token log-probs (`odds_ratio_loss`). It
trains the BASE model (the model config's weights, or `init_path`) with no reference model; the
SFT export the other algorithms start from (`policy_path`, default this run's SFT stage) is only
the baseline of the end-of-stage evaluation, so ORPO is compared with the same seed's SFT policy
like every other algorithm. The NLL is over the response tokens, as this project's SFT (TRL's
ORPOTrainer also counts the prompt's). Metric names are TRL's (`logps/*` are mean per-token
log-probs). Shared machinery: `rlhf/stages/preference.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms.orpo import odds_ratio_loss
from rlhf.stages.preference import PreferenceConfig, PreferenceModule


@dataclass
class ORPOConfig(PreferenceConfig):
    lr: float = 1e-3  # AdamW peak learning rate (the root `lr` overrides it); from the base model, as SFT
    warmup_steps: int = 20  # linear warm-up steps, then linear decay to 0 at max_steps
    max_steps: int = 200  # optimizer steps (trainer.max_steps overrides)
    beta: float = 1.0  # lambda: weight of the odds-ratio term beside the NLL (the paper's 0.1 learns too slowly here)
    policy_path: str | None = None  # the evaluation baseline (HF dir); default: this run's SFT export
    init_path: str | None = None  # the model trained (HF dir); default: the model config's weights (the base model)


class ORPOModule(PreferenceModule):
    name = "orpo"
    Config = ORPOConfig
    title = "ORPO policy"
    description = ("ORPO on the preference pairs, from the base model and without a reference model: the chosen "
                   "responses' NLL plus `beta` times a logistic loss on the log odds ratio of chosen over rejected "
                   "(mean per-token log-probs). Compared at the end with the SFT policy of the same run.")
    paper = "Hong et al. 2024 (ORPO); TRL's ORPOTrainer"
    needs = ()  # trains from the base model ...
    uses = ("policy",)  # ... and takes the SFT policy, when there is one, as its evaluation baseline
    kl_field = None  # no KL to a reference in its objective: the root kl_coef does not apply
    uses_reference = False
    headline = ("orpo_reward_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final",
                "best_step", "best_metric")

    def start_policy(self, inputs):
        return self.cfg.init_path

    def objective(self, batch, out, ref):
        c = self.cfg
        pc = out["chosen"] / out["chosen_tokens"].clamp(min=1)
        pr = out["rejected"] / out["rejected_tokens"].clamp(min=1)
        losses, rc, rr, log_odds_ratio, log_odds_chosen = odds_ratio_loss(pc, pr, c.beta)
        m = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (rc > rr).float().mean(),
             "rewards/margins": (rc - rr).mean(), "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
             "nll_loss": out["nll"].detach(), "log_odds_ratio": log_odds_ratio.detach(),
             "log_odds_chosen": log_odds_chosen.detach()}
        return out["nll"] + losses.mean(), m
