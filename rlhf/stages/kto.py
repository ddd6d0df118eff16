"""KTO: Kahneman-Tversky optimisation on desirable / undesirable responses, offline.

    python train.py algo=kto                       # SFT -> KTO, on the preference pairs
    python train.py algo=kto kto.undesirable_weight=1.33 kto.beta=0.2
    python train.py algo=kto kto.unpaired_path=kto.jsonl   # TRL's unpaired format (rlhf/data/unpaired.py)

Follows Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization") as
TRL's KTOTrainer implements it (loss_type "kto"): each response is scored on its own against the
frozen start policy, v = beta * (log pi / pi_ref - z0) for a desirable one and beta * (z0 - ...)
for an undesirable one, where the reference point z0 is the batch's KL estimate from MISMATCHED
prompt / completion pairs (completions shifted by one within the batch, as TRL), clamped at 0 and
detached. Built from the preference pairs: each pair gives its chosen response as desirable and
its rejected one as undesirable (TRL's `unpair_preference_dataset`); or, with `unpaired_path`, from
a file of examples labelled one at a time, in any proportion, batched so that every batch holds
both kinds in the file's ratio (the held-out evaluation still uses the run's prompts). The reference log-probs of
the matched responses are computed once before training, as DPO's; the mismatched ones change
with each batch and run every step. Metric names are TRL's. Shared machinery:
`rlhf/stages/preference.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from rlhf.algorithms.kto import kto_loss, kto_reference_point
from rlhf.errors import ConfigError
from rlhf.models.lora import reference_policy
from rlhf.stages.preference import PreferenceConfig, PreferenceModule, sequence_logps


@dataclass
class KTOConfig(PreferenceConfig):
    lr: float = 4e-4  # AdamW peak learning rate (the root `lr` overrides it)
    max_steps: int = 100  # optimizer steps (trainer.max_steps overrides)
    beta: float = 0.2  # implicit KL strength (root kl_coef overrides); the paper's and TRL's 0.1 leaves the reference mid-run here
    desirable_weight: float = 1.0  # lambda_D: weight of the desirable (chosen) responses' losses
    undesirable_weight: float = 1.0  # lambda_U: weight of the undesirable (rejected) responses' losses
    unpaired_path: str | None = None  # a .jsonl of {"prompt", "completion", "label"} rows (TRL's format); null: the pairs

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("desirable_weight", "undesirable_weight")


log = logging.getLogger(__name__)


def examples(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's responses one per row (ids, attention mask, labels): an unpaired batch as it is, a
    batch of pairs as its B chosen then its B rejected responses."""
    if "label" in batch:
        return batch["input_ids"], batch["attention_mask"], batch["labels"]
    return (torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
            torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
            torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))


def mismatched(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's KL sequences: with its responses one per row (`examples`), row r's prompt followed
    by row (r - 1)'s completion (TRL shifts completions by one within the batch); ids, attention mask
    and labels (the completion only), right-padded to one width."""
    ids, mask, labels = examples(batch)
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
    description = ("KTO on desirable and undesirable responses (the preference pairs' chosen and rejected ones, or "
                   "the labelled rows of `kto.unpaired_path`): "
                   "each response's log-ratio to the frozen start policy is pushed above (or below) a KL reference "
                   "point estimated from mismatched prompt / completion pairs, at strength `beta`. No reward model, "
                   "no sampling during training.")
    paper = "Ethayarajh et al. 2024 (KTO); TRL's KTOTrainer"
    kl_field = "beta"  # the KL strength: the root kl_coef sets it
    headline = ("kto_reward_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final",
                "best_step", "best_metric")

    @classmethod
    def preflight(cls, conf: KTOConfig, plan, cfg) -> None:
        if conf.unpaired_path is not None:
            cls.read_unpaired(conf)

    @classmethod
    def read_unpaired(cls, conf: KTOConfig):
        """The file's examples; refused when its smaller class cannot meet the larger in every batch."""
        from rlhf.data.unpaired import read_unpaired_file

        rows = read_unpaired_file(conf.unpaired_path)
        n_d = sum(ex.label for ex in rows)
        small, large = sorted((n_d, len(rows) - n_d))
        if math.ceil(large / small) > conf.batch_size - 1:
            raise ConfigError(f"kto.unpaired_path={conf.unpaired_path}: {n_d} desirable and {len(rows) - n_d} "
                              f"undesirable examples; a batch of kto.batch_size={conf.batch_size} cannot hold one of "
                              f"each (needs batch_size >= {math.ceil(large / small) + 1}; or rebalance the file)")
        return rows

    @classmethod
    def training_data(cls, conf: KTOConfig, splits):
        if conf.unpaired_path is None:
            return cls.data_mode, splits
        rows = cls.read_unpaired(conf)
        held_out = {p.prompt for p in splits.val}
        seen = sum(ex.prompt in held_out for ex in rows)
        if seen:  # the evaluation would then measure recall of training prompts, not generalisation
            log.warning("kto.unpaired_path=%s: %d examples use held-out evaluation prompts", conf.unpaired_path, seen)
        return "unpaired", dataclasses.replace(splits, unpaired=rows)

    def _logps(self, model, batch) -> dict[str, torch.Tensor]:
        if "label" not in batch:
            return super()._logps(model, batch)
        total, count = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return {"logps": total, "tokens": count}

    @torch.no_grad()
    def reference_logps(self, batch) -> tuple[torch.Tensor, ...]:
        if "label" not in batch:
            return super().reference_logps(batch)
        with reference_policy(self.policy, self.ref_policy) as ref:
            return (self._logps(ref, batch)["logps"],)

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
        if "label" in batch:  # unpaired: desirable and undesirable rows in any proportion
            good = batch["label"]
            pc, pr, ref_c, ref_r = out["logps"][good], out["logps"][~good], ref[0][good], ref[0][~good]
        else:
            (pc, pr), (ref_c, ref_r) = (out["chosen"], out["rejected"]), ref
        losses, rc, rr = kto_loss(pc, pr, ref_c, ref_r, kl, c.beta, c.desirable_weight, c.undesirable_weight)
        m = {"kl": kl, "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
             "rewards/margins": rc.mean() - rr.mean(), "logps/chosen": pc.detach().mean(),
             "logps/rejected": pr.detach().mean()}
        if "label" not in batch:  # pairs known here: DPO's accuracy
            m["rewards/accuracies"] = (rc > rr).float().mean()
        return losses.nanmean(), m
