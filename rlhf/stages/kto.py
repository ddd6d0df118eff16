"""KTO: Kahneman-Tversky optimisation on desirable / undesirable responses, offline.

    python train.py algo=kto                       # SFT -> KTO, on the preference pairs
    python train.py algo=kto kto.undesirable_weight=1.33 kto.beta=0.2

Follows Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization") as
TRL's KTOTrainer implements it (loss_type "kto"): each response is scored on its own against the
frozen start policy, v = beta * (log pi / pi_ref - z0) for a desirable one and beta * (z0 - ...)
for an undesirable one, where the reference point z0 is the batch's KL estimate from MISMATCHED
prompt / completion pairs (completions shifted by one within the batch, as TRL), clamped at 0 and
detached. Built from the preference pairs: each pair gives its chosen response as desirable and
its rejected one as undesirable (TRL's `unpair_preference_dataset`). The reference log-probs of
the matched responses are computed once before training, as DPO's; the mismatched ones change
with each batch and run every step. Metric names are TRL's. Shared machinery:
`rlhf/stages/preference.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms.kto import kto_loss, kto_reference_point
from rlhf.models.lora import reference_policy
from rlhf.stages.preference import PreferenceConfig, PreferenceModule, sequence_logps


@dataclass
class KTOConfig(PreferenceConfig):
    lr: float = 4e-4  # AdamW peak learning rate (the root `lr` overrides it)
    max_steps: int = 100  # optimizer steps (trainer.max_steps overrides)
    beta: float = 0.5  # strength of the implicit KL to the reference (root kl_coef overrides)
    desirable_weight: float = 1.0  # lambda_D: weight of the desirable (chosen) responses' losses
    undesirable_weight: float = 1.0  # lambda_U: weight of the undesirable (rejected) responses' losses

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("desirable_weight", "undesirable_weight")


def mismatched(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's KL sequences: with the 2B examples laid out chosen then rejected, example r's prompt
    followed by example (r - 1)'s completion (TRL shifts completions by one within the batch); ids,
    attention mask and labels (the completion only), right-padded to one width."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    prompts = [row[(lab == -100) & (m == 1)] for row, lab, m in zip(ids, labels, mask)]
    completions = [row[lab != -100] for row, lab in zip(ids, labels)]
    completions = completions[-1:] + completions[:-1]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    out = torch.full((len(prompts), width), pad_id, dtype=ids.dtype, device=ids.device)
    out_mask, out_labels = torch.zeros_like(out), torch.full_like(out, -100)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        out[r, :len(p)], out[r, len(p):len(p) + len(c)] = p, c
        out_mask[r, :len(p) + len(c)] = 1
        out_labels[r, len(p):len(p) + len(c)] = c
    return out, out_mask, out_labels


class KTOModule(PreferenceModule):
    name = "kto"
    Config = KTOConfig
    title = "KTO policy"
    description = ("KTO on the preference pairs split into desirable (chosen) and undesirable (rejected) responses: "
                   "each response's log-ratio to the frozen start policy is pushed above (or below) a KL reference "
                   "point estimated from mismatched prompt / completion pairs, at strength `beta`. No reward model, "
                   "no sampling during training.")
    paper = "Ethayarajh et al. 2024 (KTO); TRL's KTOTrainer"
    kl_field = "beta"  # the KL strength: the root kl_coef sets it
    headline = ("kto_reward_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final",
                "best_step", "best_metric")

    @torch.no_grad()
    def kl_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of the batch's mismatched sequences under the policy and the reference
        (no gradient: z0 is detached)."""
        ids, mask, labels = mismatched(batch, self.tokenizer.pad_token_id)
        policy = sequence_logps(self.policy, ids, mask, labels)[0]
        with reference_policy(self.policy, self.ref_policy) as ref:
            return policy, sequence_logps(ref, ids, mask, labels)[0]

    def objective(self, batch, out, ref):
        c = self.cfg
        reduce = None
        if self._trainer is not None and self.trainer.world_size > 1:  # TRL: gathered over processes
            reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731
        kl = kto_reference_point(*self.kl_logps(batch), reduce=reduce)
        pc, pr = out["chosen"], out["rejected"]
        losses, rc, rr = kto_loss(pc, pr, ref[0], ref[1], kl, c.beta, c.desirable_weight, c.undesirable_weight)
        m = {"kl": kl, "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
             "rewards/margins": rc.mean() - rr.mean(), "logps/chosen": pc.detach().mean(),
             "logps/rejected": pr.detach().mean(),
             "rewards/accuracies": (rc > rr).float().mean()}  # pairs known here: DPO's accuracy
        return losses.nanmean(), m
