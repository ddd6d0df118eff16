"""DPO: fit the policy to preference pairs directly, offline, with no reward model and no sampling.

    python train.py algo=dpo                       # SFT -> DPO
    python train.py algo=dpo dpo.loss_type=ipo dpo.beta=0.5

Follows Rafailov et al. 2023 ("Direct Preference Optimization") as TRL's DPOTrainer implements it:
the start policy (the SFT export) is also the frozen reference, whose sequence log-probs of every
training pair are computed once before the first step (TRL's `precompute_ref_log_probs`), so a
step costs one policy forward and backward over chosen + rejected. Metric names are TRL's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.algorithms.core import logprobs_from_logits
from rlhf.algorithms.dpo import LOSS_TYPES, dpo_loss
from rlhf.errors import ConfigError
from rlhf.models.causal_lm import ModelConfig, freeze, head_fp32, load_causal_lm, lower_matmul_weights
from rlhf.models.lora import reference_policy
from rlhf.models.sampling import backbone_hidden
from rlhf.models.tokenizer import load_tokenizer
from rlhf.stages.base import Inputs, Stage
from rlhf.stages.common import StageConfig, adamw_with_schedule, configure_gradient_clipping, export_hf
from rlhf.stages.guards import check_finite

EVAL_BATCH = 32  # prompts per sampling batch in the end-of-stage evaluation


@dataclass
class DPOConfig(StageConfig):
    lr: float = 2e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decay on weight matrices (never biases/norms)
    warmup_steps: int = 10  # linear warm-up steps, then linear decay to 0 at max_steps
    batch_size: int = 16  # preference pairs per optimizer step
    max_steps: int = 150  # optimizer steps (trainer.max_steps overrides)
    max_prompt_length: int = 64  # prompt tokens kept (the last ones)
    max_response_length: int = 48  # response tokens kept (the first ones), eos included as in SFT
    # Defaults: on the synthetic task sigmoid at beta 0.1 drives both log-probs down until the policy
    # degenerates (KL ~37 nats, gold win rate 0.56); IPO's bounded target at beta 0.5 learns (README).
    beta: float = 0.5  # strength of the implicit KL to the reference: rewards are beta * log(pi / pi_ref)
    loss_type: str = "ipo"  # sigmoid (DPO), ipo (Azar et al. 2023) or hinge (SLiC / RSO)
    label_smoothing: float = 0.0  # sigmoid only: assumed probability that a label is flipped (cDPO)
    rpo_alpha: float = 0.0  # weight of the chosen responses' NLL added to the loss (RPO; TRL's rpo_alpha)
    val_every: int = 50  # validation every N steps
    val_batches: int = 10  # validation batches per check
    policy_path: str | None = None  # start policy and reference (HF dir); default: this run's SFT export
    eval_prompts: int = 200  # held-out prompts for the before/after evaluation
    response_length: int = 16  # tokens sampled per response at evaluation
    temperature: float = 1.0  # sampling temperature at evaluation
    stop_token: str | None = "eos"  # evaluation responses end after the first one; null: no truncation

    def __post_init__(self):
        self.check_positive("lr", "batch_size", "max_steps", "max_prompt_length", "max_response_length", "beta",
                            "val_every", "val_batches", "eval_prompts", "response_length", "temperature")
        self.check_positive("weight_decay", "warmup_steps", "label_smoothing", "rpo_alpha", allow_zero=True)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type=sigmoid only, got loss_type={self.loss_type}")
        if self.stop_token not in ("eos", None):
            raise ValueError(f"stop_token must be eos or null, got {self.stop_token!r}")


class DPOModule(Stage):
    name = "dpo"
    Config = DPOConfig
    title = "DPO policy"
    description = ("Direct Preference Optimization on the preference pairs, offline: the policy's log-prob margin "
                   "of chosen over rejected, relative to the frozen start policy's, fit with a logistic (or IPO / "
                   "hinge) loss at strength `beta`. No reward model, no sampling during training.")
    paper = "Rafailov et al. 2023 (DPO); Azar et al. 2023 (IPO); Mitchell 2023 (cDPO); TRL's DPOTrainer"
    data_mode = "pairs"
    needs = ("policy",)
    produces = "policy"
    kl_field = "beta"  # the KL coefficient of the objective DPO solves: the root kl_coef sets it
    headline = ("dpo_reward_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final",
                "best_step", "best_metric")
    # The reference schema, so that sweeps load a DPO run beside the online ones: policy_loss is the
    # DPO loss, reward_score the implicit reward margin beta * (log-ratio chosen - log-ratio rejected);
    # DPO samples nothing during training, so it has no value loss and no sampled KL to log.
    csv_columns = ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score", "learning_rate",
                   "batch_size", "timestamp"]
    evaluates_policy = True

    def ensure_reference(self) -> None:
        """The frozen reference is always kept (or is the policy with its LoRA adapter off)."""

    def __init__(self, cfg: DPOConfig, model: ModelConfig, inputs: Inputs):
        super().__init__()
        self.strict_loading = False  # checkpoints omit the frozen reference
        self.cfg, self.model_cfg = cfg, model
        self.tokenizer = load_tokenizer(inputs.policy or model.tokenizer)
        self.policy = load_causal_lm(model, inputs.policy)
        # With LoRA the reference is the policy with its adapter off: no second copy.
        self.ref_policy = None if model.lora else freeze(copy.deepcopy(self.policy))
        self.stop_id = self.tokenizer.eos_token_id if cfg.stop_token == "eos" else None
        self.gold = inputs.gold
        self.score = None  # no reward model: the evaluation reports gold and KL only
        # [n_train, 2] reference (chosen, rejected) log-probs by pair index; filled once in on_fit_start.
        self.ref_logps: torch.Tensor | None = None

    @classmethod
    def preflight(cls, conf, plan, cfg) -> None:
        if conf.policy_path is not None and not (Path(conf.policy_path) / "config.json").is_file():
            raise ConfigError(f"dpo.policy_path '{conf.policy_path}' has no config.json (not a saved model)")

    # ----- log-probs -----
    def _logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence log-probs of the chosen and the rejected responses under `model`, each [B], and the
        chosen responses' per-token NLL (mean over the batch's tokens, RPO's term).

        One forward over chosen and rejected together, and the LM head (in fp32) only where a label
        exists: the prompt's and the padding's logits over the vocabulary would be most of the work.
        IPO takes the per-token mean, as TRL does: its fixed target margin 1 / (2 beta) must not
        depend on the responses' lengths.
        """
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
        keep = labels != -100
        hidden = backbone_hidden(model, ids, mask)[:, :-1][keep]
        logp = logprobs_from_logits(head_fp32(model.get_output_embeddings(), hidden)[None], labels[keep][None])[0]
        total = logp.new_zeros(ids.shape[0]).index_add(0, keep.nonzero()[:, 0], logp)
        count = keep.sum(1)
        n = ids.shape[0] // 2
        nll = -total[:n].sum() / count[:n].sum().clamp(min=1)
        if self.cfg.loss_type == "ipo":
            total = total / count.clamp(min=1)
        return (*total.chunk(2), nll)

    @torch.no_grad()
    def _reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with reference_policy(self.policy, self.ref_policy) as ref:
            return self._logps(ref, batch)[:2]

    def compute_reference_cache(self) -> torch.Tensor:
        """Reference log-probs of every training pair, [n_train, 2], in one pass without gradients.

        Each rank computes every world-th pair and a sum over ranks assembles the table, so under
        DDP the pass costs 1/world of the whole. It runs in the precision of training: under
        bf16-mixed the policy's log-probs at step 0 then equal the cached ones, and the loss starts at log 2.
        """
        dm, trainer = self.trainer.datamodule, self.trainer
        table = torch.zeros(len(dm.train_dataset), 2, device=self.device)
        was_training = self.policy.training
        self.policy.eval()
        with trainer.precision_plugin.forward_context():
            for batch in dm.ordered_loader("train", trainer.global_rank, trainer.world_size):
                batch = trainer.strategy.batch_to_device(batch)
                table[batch["index"]] = torch.stack(self._reference_logps(batch), 1).float()
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
        n = len(self.trainer.datamodule.train_dataset)
        if self.ref_logps is not None and len(self.ref_logps) == n:  # restored from a checkpoint
            self.ref_logps = self.ref_logps.to(self.device)
        else:
            self.ref_logps = self.compute_reference_cache()
        check_finite(self, "DPO", step=0, reference_logps=self.ref_logps)

    # ----- the DPO step -----
    def _step(self, batch, ref_chosen, ref_rejected) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        pc, pr, nll = self._logps(self.policy, batch)
        losses, rc, rr = dpo_loss(pc, pr, ref_chosen, ref_rejected, c.beta, c.loss_type, c.label_smoothing)
        dpo = losses.mean()
        m = {"loss/dpo": dpo.detach(), "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
             "rewards/accuracies": (rc > rr).float().mean(), "rewards/margins": (rc - rr).mean(),
             "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        if not c.rpo_alpha:
            return dpo, m
        return dpo + c.rpo_alpha * nll, {**m, "nll_loss": nll.detach()}

    def training_step(self, batch, batch_idx):
        ref = self.ref_logps[batch["index"]]
        loss, m = self._step(batch, ref[:, 0], ref[:, 1])
        check_finite(self, "DPO", loss=loss.detach())
        lr = self.lr_schedulers().get_last_lr()[0]
        self.log_dict(m)
        self.log("lr", lr)
        self.csv_row = {"policy_loss": loss.item(), "value_loss": "", "kl_divergence": "",
                        "reward_score": m["rewards/margins"].item(), "rewards_chosen": m["rewards/chosen"].item(),
                        "rewards_rejected": m["rewards/rejected"].item(),
                        "reward_accuracy": m["rewards/accuracies"].item(),
                        "reward_margin": m["rewards/margins"].item(), "learning_rate": lr,
                        "batch_size": batch["index"].shape[0] * self.trainer.world_size}
        return loss

    def validation_step(self, batch, batch_idx):
        # Validation pairs are few and change with val_batches: their reference runs here, not from a cache.
        ref_chosen, ref_rejected = self._reference_logps(batch)
        _, m = self._step(batch, ref_chosen, ref_rejected)
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
            checkpoint["dpo_ref_logps"] = self.ref_logps.cpu()

    def on_load_checkpoint(self, checkpoint):
        self.ref_logps = checkpoint.get("dpo_ref_logps")

    # ----- after training -----
    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        """Export the policy; sample it and the reference on held-out prompts (gold reward, win rate, KL)."""
        from rlhf.evaluation.held_out import compare_policies

        c = self.cfg
        out = export_hf(self.policy, self.tokenizer, Path(stage_dir) / "model")
        with self.trainer.precision_plugin.forward_context():  # the precision training ran in
            result = compare_policies(self, dm, c.eval_prompts)  # its own prompt loader
        acc = self.trainer.callback_metrics.get("val/rewards/accuracies")
        return {**result, "model_dir": str(out), "metrics_csv": str(Path(stage_dir) / "metrics.csv"),
                "dpo_reward_accuracy": float(acc) if acc is not None else None}
