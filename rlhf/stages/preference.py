"""What the offline preference stages share (DPO, KTO, ORPO, SimPO): the policy, the frozen reference
and its cached log-probs, sequence log-probs of chosen and rejected, metrics, validation,
checkpoints, export and the held-out evaluation.

    python train.py algo=dpo     # or kto, orpo, simpo: each is a subclass of PreferenceModule

A subclass supplies its config (extending `PreferenceConfig`) and `objective(batch, out, ref)`: the
loss of one batch of preference pairs and its metrics, named as TRL names them. Each training step:

    1. log-probs   one policy forward over chosen + rejected, the LM head only on labelled tokens:
                   summed log-probs and token counts of each response, the chosen NLL
    2. reference   (`uses_reference`: DPO, KTO) the frozen start policy's summed log-probs of the
                   pair, from a table computed once before the first step (TRL's precompute_ref_log_probs)
    3. objective   the algorithm's loss and metrics; AdamW with warm-up then linear decay
    4. bookkeeping the reference-schema CSV row (policy_loss = the loss, reward_score = rewards/margins)

At the end the policy is exported and compared on held-out prompts with the baseline: the start
policy, or (ORPO, trained from the base model) the SFT policy the other algorithms start from.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from rlhf.algorithms.core import logprobs_from_logits
from rlhf.models.causal_lm import ModelConfig, freeze, head_fp32, load_causal_lm, lower_matmul_weights
from rlhf.models.lora import reference_policy
from rlhf.models.sampling import _HeadLogProbs, backbone_hidden
from rlhf.models.tokenizer import load_tokenizer
from rlhf.stages.base import Inputs, Stage
from rlhf.stages.common import StageConfig, adamw_with_schedule, configure_gradient_clipping, export_hf
from rlhf.stages.guards import check_finite


@dataclass
class PreferenceConfig(StageConfig):
    lr: float = 2e-4  # AdamW peak learning rate (the root `lr` overrides it)
    weight_decay: float = 0.0  # AdamW decay on weight matrices (never biases/norms)
    warmup_steps: int = 10  # linear warm-up steps, then linear decay to 0 at max_steps
    batch_size: int = 16  # preference pairs per optimizer step
    max_steps: int = 150  # optimizer steps (trainer.max_steps overrides)
    max_prompt_length: int = 64  # prompt tokens kept (the last ones)
    max_response_length: int = 48  # response tokens kept (the first ones), eos included as in SFT
    beta: float = 0.1  # the algorithm's temperature / strength (see its stage)
    val_every: int = 50  # validation every N steps
    val_batches: int = 10  # validation batches per check
    policy_path: str | None = None  # start policy (HF dir); default: this run's SFT export
    eval_prompts: int = 200  # held-out prompts for the before/after evaluation
    response_length: int = 16  # tokens sampled per response at evaluation
    temperature: float = 1.0  # sampling temperature at evaluation
    stop_token: str | None = "eos"  # evaluation responses end after the first one; null: no truncation

    def __post_init__(self):
        self.check_positive("lr", "batch_size", "max_steps", "max_prompt_length", "max_response_length", "beta",
                            "val_every", "val_batches", "eval_prompts", "response_length", "temperature")
        self.check_positive("weight_decay", "warmup_steps", allow_zero=True)
        if self.stop_token not in ("eos", None):
            raise ValueError(f"stop_token must be eos or null, got {self.stop_token!r}")


def sequence_logps(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens (labels != -100, predicted from the previous
    position) and their number, each [N]. The LM head (fp32) runs only where a label exists, fused
    with the log-softmax (`_HeadLogProbs`) when it is a plain linear layer: prompt and padding
    logits over the vocabulary would be most of the work."""
    labels = labels[:, 1:]
    keep = labels != -100
    hidden = backbone_hidden(model, ids, mask)[:, :-1][keep]
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        logp = _HeadLogProbs.apply(hidden, head.weight, labels[keep], 1.0, False)[0]
    else:
        logp = logprobs_from_logits(head_fp32(head, hidden)[None], labels[keep][None])[0]
    total = logp.new_zeros(ids.shape[0]).index_add(0, keep.nonzero()[:, 0], logp)
    return total, keep.sum(1)


class PreferenceModule(Stage):
    """The shared stage; subclasses set name, Config, the class fields below and `objective`."""
    data_mode = "pairs"
    needs = ("policy",)
    produces = "policy"
    # The reference schema, so that sweeps load these runs beside the online ones: policy_loss is the
    # loss, reward_score the implicit reward margin (rewards/margins); nothing is sampled during
    # training, so there is no value loss and no sampled KL to log.
    csv_columns = ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score", "learning_rate",
                   "batch_size", "timestamp"]
    evaluates_policy = True
    uses_reference: ClassVar[bool] = True  # a frozen reference in the loss (its log-probs cached); False: reference-free

    def __init__(self, cfg: PreferenceConfig, model: ModelConfig, inputs: Inputs):
        super().__init__()
        self.strict_loading = False  # checkpoints omit the frozen reference
        self.cfg, self.model_cfg = cfg, model
        self.start_path = self.start_policy(inputs)
        self.baseline_path = inputs.policy if inputs.policy is not None else self.start_path
        self.tokenizer = load_tokenizer(self.start_path or inputs.policy or model.tokenizer)
        self.policy = load_causal_lm(model, self.start_path)
        # The reference (in the loss) and the evaluation's baseline: a frozen copy of the start policy,
        # or with LoRA the policy with its adapter off (no second copy). Reference-free stages keep a
        # copy only when the baseline could not be loaded again (random weights); `finish` loads it.
        same = self.baseline_path == self.start_path
        keep = same and not model.lora and (self.uses_reference or self.start_path is None)
        self.ref_policy = freeze(copy.deepcopy(self.policy)) if keep else None
        self.stop_id = self.tokenizer.eos_token_id if cfg.stop_token == "eos" else None
        self.gold, self.verify = inputs.gold, inputs.verify
        self.score = None  # no reward model: the evaluation reports gold and KL only
        # [n_train, 2] reference (chosen, rejected) summed log-probs by pair index ([n_train, 1] for unpaired
        # examples); filled once in on_fit_start.
        self.ref_logps: torch.Tensor | None = None

    def start_policy(self, inputs: Inputs) -> str | None:
        """The HF directory training starts from (None: the model config's weights)."""
        return inputs.policy

    # ----- log-probs -----
    def _logps(self, model, batch) -> dict[str, torch.Tensor]:
        """Under `model`, one forward over chosen and rejected together: summed log-probs "chosen" and
        "rejected" [B], their token counts "chosen_tokens" / "rejected_tokens" [B], and "nll", the
        chosen responses' mean per-token negative log-likelihood over the batch's tokens."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        total, count = sequence_logps(model, ids, mask, labels)
        (pc, pr), (nc, nr) = total.chunk(2), count.chunk(2)
        return {"chosen": pc, "rejected": pr, "chosen_tokens": nc, "rejected_tokens": nr,
                "nll": -pc.sum() / nc.sum().clamp(min=1)}

    @torch.no_grad()
    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with reference_policy(self.policy, self.ref_policy) as ref:
            out = self._logps(ref, batch)
        return out["chosen"], out["rejected"]

    def compute_reference_cache(self) -> torch.Tensor:
        """Reference log-probs of every training pair, [n_train, 2] (chosen, rejected; an unpaired
        example's alone: [n_train, 1]), in one pass without gradients.

        Each rank computes every world-th pair and a sum over ranks assembles the table, so under
        DDP the pass costs 1/world of the whole. It runs in the precision of training: under
        bf16-mixed the policy's log-probs at step 0 then equal the cached ones.
        """
        dm, trainer = self.trainer.datamodule, self.trainer
        table = torch.zeros(len(dm.train_dataset), 1 if dm.mode == "unpaired" else 2, device=self.device)
        was_training = self.policy.training
        self.policy.eval()
        with trainer.precision_plugin.forward_context():
            for batch in dm.ordered_loader("train", trainer.global_rank, trainer.world_size):
                batch = trainer.strategy.batch_to_device(batch)
                table[batch["index"]] = torch.stack(self.reference_logps(batch), 1).float()
        self.policy.train(was_training)
        if trainer.world_size > 1:
            table = trainer.strategy.reduce(table, reduce_op="sum")
        return table

    def on_fit_start(self):
        if hasattr(self.gold, "to"):  # a reward model playing gold scores on the training device
            self.gold.to(self.device)
        # Under bf16-mixed the frozen reference's matmuls run in bf16 anyway: hold its weights in bf16.
        if self.trainer.precision == "bf16-mixed" and self.ref_policy is not None:
            lower_matmul_weights(self.ref_policy)
        if not self.uses_reference:
            return
        n = len(self.trainer.datamodule.train_dataset)
        if self.ref_logps is not None and len(self.ref_logps) == n:  # restored from a checkpoint
            self.ref_logps = self.ref_logps.to(self.device)
        else:
            self.ref_logps = self.compute_reference_cache()
        check_finite(self, self.name.upper(), step=0, reference_logps=self.ref_logps)

    # ----- the step -----
    def objective(self, batch, out: dict, ref: tuple | None) -> tuple[torch.Tensor, dict]:
        """The loss of one batch and its metrics (TRL's names, detached scalars), from the policy's
        `_logps` `out` and, when `uses_reference`, the reference's (chosen, rejected) summed log-probs."""
        raise NotImplementedError

    def _step(self, batch, ref) -> tuple[torch.Tensor, dict]:
        return self.objective(batch, self._logps(self.policy, batch), ref)

    def training_step(self, batch, batch_idx):
        ref = None
        if self.uses_reference:
            ref = tuple(self.ref_logps[batch["index"]].unbind(1))
        loss, m = self._step(batch, ref)
        check_finite(self, self.name.upper(), loss=loss.detach())
        lr = self.lr_schedulers().get_last_lr()[0]
        self.log_dict(m)
        self.log("lr", lr)
        row = {"policy_loss": loss.item(), "value_loss": "", "kl_divergence": "",
               "reward_score": m["rewards/margins"].item(), "learning_rate": lr,
               "batch_size": batch["index"].shape[0] * self.trainer.world_size}
        names = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                 "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
        row.update({names.get(k, k.replace("/", "_")): v.item() for k, v in m.items()})
        self.csv_row = row
        return loss

    def validation_step(self, batch, batch_idx):
        # Validation pairs are few and change with val_batches: their reference runs here, not from a cache.
        ref = self.reference_logps(batch) if self.uses_reference else None
        _, m = self._step(batch, ref)
        self.log_dict({f"val/{k}": v for k, v in m.items()}, sync_dist=True)

    configure_gradient_clipping = configure_gradient_clipping  # trainer.gradient_clip_val with a fused AdamW

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.trainer, self.cfg.lr, self.cfg.weight_decay,
                                   self.cfg.warmup_steps, self.trainer.max_steps)

    # ----- checkpoints -----
    def on_save_checkpoint(self, checkpoint):
        # The reference is rebuilt from the start policy's export; its log-prob table travels instead
        # (a few floats per pair), so a resumed run does not recompute it.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ref_policy.")}
        if self.ref_logps is not None:
            checkpoint["reference_logps"] = self.ref_logps.cpu()

    def on_load_checkpoint(self, checkpoint):
        self.ref_logps = checkpoint.get("reference_logps")  # summed log-probs (older "dpo_ref_logps": recomputed)

    # ----- after training -----
    def ensure_reference(self) -> None:
        """The baseline to evaluate against, when training kept none: loaded from its export (with
        LoRA the adapter-off policy is the baseline only when training started from it)."""
        if self.ref_policy is None and not (self.model_cfg.lora and self.baseline_path == self.start_path):
            self.ref_policy = freeze(load_causal_lm(self.model_cfg, self.baseline_path)).to(self.device)

    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        """Export the policy; sample it and the baseline on held-out prompts (gold reward, win rate, KL)."""
        from rlhf.evaluation.held_out import compare_policies

        out = export_hf(self.policy, self.tokenizer, Path(stage_dir) / "model")
        self.ensure_reference()
        with self.trainer.precision_plugin.forward_context():  # the precision training ran in
            result = compare_policies(self, dm, self.cfg.eval_prompts)  # its own prompt loader
        acc = self.trainer.callback_metrics.get("val/rewards/accuracies")
        return {**result, "model_dir": str(out), "metrics_csv": str(Path(stage_dir) / "metrics.csv"),
                f"{self.name}_reward_accuracy": float(acc) if acc is not None else None}
