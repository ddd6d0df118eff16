"""Stage 1, supervised fine-tuning: next-token loss on prompt + chosen response, response tokens only.

    python train.py stage=sft sft.max_steps=500

Follows the SFT step of Ouyang et al. 2022 (InstructGPT); the loss mask on the prompt is the
usual choice for preference data, where the prompt is not the model's to imitate.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.models.causal_lm import ModelConfig, load_causal_lm
from rlhf.models.sampling import backbone_hidden
from rlhf.stages.base import Inputs, Stage
from rlhf.stages.common import StageConfig, adamw_with_schedule, configure_gradient_clipping, export_hf
from rlhf.stages.guards import check_finite


@dataclass
class SFTConfig(StageConfig):
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 20  # linear warm-up steps, then linear decay to 0 at max_steps
    batch_size: int = 16  # sequences per optimizer step
    max_steps: int = 300  # optimizer steps (trainer.max_steps overrides)
    max_prompt_length: int = 64  # prompt tokens kept (the last ones)
    max_response_length: int = 48  # response tokens kept (the first ones)
    val_every: int = 100  # validation every N steps
    val_batches: int = 10  # validation batches per check

    def __post_init__(self):
        self.check_positive("lr", "batch_size", "max_steps", "max_prompt_length", "max_response_length", "val_every")
        self.check_positive("weight_decay", "warmup_steps", allow_zero=True)


class SFTModule(Stage):
    name = "sft"
    Config = SFTConfig
    title = "SFT policy"
    description = ("Supervised fine-tuning: next-token cross-entropy on prompt + chosen response, loss on the "
                   "response tokens only.")
    paper = "Ouyang et al. 2022 (InstructGPT), the SFT step"
    data_mode = "sft"
    produces = "policy"
    order = 0
    headline = ("sft_val_loss",)

    def __init__(self, cfg: SFTConfig, model: ModelConfig, inputs: Inputs):
        super().__init__()
        self.cfg, self.model_cfg = cfg, model
        self.model = load_causal_lm(model, inputs.policy)

    def _loss(self, batch) -> torch.Tensor:
        """Mean next-token cross-entropy over response tokens.

        The LM head runs only where a label exists: with a 50k vocabulary, logits for prompt and
        padding positions would be most of the step's work and all of its memory.
        """
        hidden = backbone_hidden(self.model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits.float(), labels[keep])

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        check_finite(self, "SFT", loss=loss.detach())
        self.log("sft/loss", loss, prog_bar=True)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        self.csv_row = {"loss": loss.item(), "learning_rate": self.lr_schedulers().get_last_lr()[0],
                        "batch_size": batch["input_ids"].shape[0]}
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("sft/val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    configure_gradient_clipping = configure_gradient_clipping  # trainer.gradient_clip_val with a fused AdamW

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.trainer, self.cfg.lr, self.cfg.weight_decay,
                                   self.cfg.warmup_steps, self.trainer.max_steps)

    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        """Export the policy in HF format; headline numbers for summary.json."""
        val = self.trainer.callback_metrics.get("sft/val_loss")
        return {"sft_val_loss": float(val) if val is not None else None,
                "model_dir": str(export_hf(self.model, tokenizer, Path(stage_dir) / "model")),
                "metrics_csv": str(Path(stage_dir) / "metrics.csv")}
