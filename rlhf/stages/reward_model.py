"""Stage 2, the reward model: backbone + scalar head trained on preference pairs (Bradley-Terry).

    python train.py stage=rm rm.max_steps=300

Loss `-logsigmoid(r_chosen - r_rejected - margin)` (Bradley & Terry 1952; Ouyang et al. 2022),
plus the optional centering term of Eisenstein et al. 2023 (`center_rewards_coefficient`, as in
TRL's RewardTrainer). After training the scores are normalised to mean 0 / std 1 on the training
responses, and that gain/bias is stored in the model config, so PPO sees rewards of a known scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.models.causal_lm import ModelConfig
from rlhf.models.reward import load_reward_model, reward_scores
from rlhf.stages.base import Inputs, Stage
from rlhf.stages.common import StageConfig, adamw_with_schedule, configure_gradient_clipping, export_hf
from rlhf.stages.guards import check_finite


@dataclass
class RMConfig(StageConfig):
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 20  # linear warm-up steps, then linear decay to 0
    batch_size: int = 16  # preference pairs per optimizer step
    max_steps: int = 300  # optimizer steps (trainer.max_steps overrides)
    max_prompt_length: int = 64  # prompt tokens kept (the last ones)
    max_response_length: int = 48  # response tokens kept (the first ones)
    margin: float = 0.0  # required score gap inside the Bradley-Terry loss
    center_rewards_coefficient: float = 0.0  # weight of mean((r_c + r_r)^2), keeps scores centred
    normalize_samples: int = 2048  # training responses scored to fit the mean/std normalisation
    val_every: int = 100  # validation every N steps
    val_batches: int = 20  # validation batches per check

    def __post_init__(self):
        self.check_positive("lr", "batch_size", "max_steps", "max_prompt_length", "max_response_length",
                            "val_every", "normalize_samples")
        self.check_positive("weight_decay", "warmup_steps", "margin", "center_rewards_coefficient", allow_zero=True)


class RewardModelModule(Stage):
    name = "rm"
    Config = RMConfig
    title = "reward model"
    description = ("Bradley-Terry reward model: a scalar head on the causal-LM backbone, trained with "
                   "`-logsigmoid(r_chosen - r_rejected - margin)` on preference pairs. Scores are normalised to "
                   "mean 0 / std 1 on the training responses with `reward_mean` / `reward_std` stored in "
                   "`config.json`.")
    paper = "Bradley & Terry 1952; Ouyang et al. 2022"
    data_mode = "rm"
    # InstructGPT initialises the RM from the SFT policy: its backbone already reads the domain.
    uses = ("policy",)
    produces = "reward"
    order = 1
    headline = ("rm_accuracy",)

    def __init__(self, cfg: RMConfig, model: ModelConfig, inputs: Inputs):
        super().__init__()
        self.cfg, self.model_cfg = cfg, model
        self.model = load_reward_model(model, inputs.policy, pad_token_id=inputs.pad_token_id)

    def _scores(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # One forward over chosen and rejected together (the collator pads both to one width):
        # half the kernel launches, same numbers.
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        r = reward_scores(self.model, ids, mask, normalize=False)
        n = batch["chosen_input_ids"].shape[0]
        return r[:n], r[n:]

    def _step(self, batch, prefix: str):
        r_c, r_r = self._scores(batch)
        loss = -F.logsigmoid(r_c - r_r - self.cfg.margin).mean()
        if self.cfg.center_rewards_coefficient:
            loss = loss + self.cfg.center_rewards_coefficient * ((r_c + r_r) ** 2).mean()
        acc = (r_c > r_r).float().mean()
        margin = (r_c - r_r).mean()
        sep = "" if prefix == "" else "val_"
        self.log_dict({f"rm/{sep}loss": loss, f"rm/{sep}accuracy": acc, f"rm/{sep}margin": margin},
                      prog_bar=prefix == "", sync_dist=prefix != "")  # validation: mean over DDP ranks
        return loss, acc, margin

    def training_step(self, batch, batch_idx):
        loss, acc, margin = self._step(batch, "")
        check_finite(self, "RM", loss=loss.detach())
        lr = self.lr_schedulers().get_last_lr()[0]
        self.log("lr", lr)
        self.csv_row = {"loss": loss.item(), "accuracy": acc.item(), "margin": margin.item(),
                        "learning_rate": lr, "batch_size": batch["chosen_input_ids"].shape[0]}
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    configure_gradient_clipping = configure_gradient_clipping  # trainer.gradient_clip_val with a fused AdamW

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.trainer, self.cfg.lr, self.cfg.weight_decay,
                                   self.cfg.warmup_steps, self.trainer.max_steps)

    @torch.no_grad()
    def pair_scores(self, loader, max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised scores of (chosen, rejected) over a loader."""
        self.model.eval()
        cs, rs = [], []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            c, r = self._scores(batch)
            cs.append(c)
            rs.append(r)
        c, r = torch.cat(cs), torch.cat(rs)
        mean = getattr(self.model.config, "reward_mean", 0.0)
        std = getattr(self.model.config, "reward_std", 1.0)
        return (c - mean) / std, (r - mean) / std

    def calibrate(self, loader) -> tuple[float, float]:
        """Fit gain/bias so training responses score mean 0 / std 1, and store them in the config."""
        self.model.config.reward_mean, self.model.config.reward_std = 0.0, 1.0
        c, r = self.pair_scores(loader, max_batches=max(1, self.cfg.normalize_samples // (2 * self.cfg.batch_size)))
        allr = torch.cat([c, r]).double()
        mean, std = allr.mean().item(), allr.std().clamp_min(1e-6).item()
        self.model.config.reward_mean, self.model.config.reward_std = mean, std
        return mean, std

    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        """Normalise, export, and measure held-out accuracy.

        On synthetic data the chosen response is the one the gold function prefers, so this is
        accuracy against the gold labels; on HH-RLHF it is against the human labels.
        """
        mean, std = self.calibrate(dm.train_dataloader())
        c, r = self.pair_scores(dm.val_dataloader())
        out = export_hf(self.model, tokenizer, Path(stage_dir) / "model")
        return {"rm_accuracy": (c > r).float().mean().item(), "rm_val_pairs": int(c.numel()),
                "reward_mean": mean, "reward_std": std, "model_dir": str(out),
                "metrics_csv": str(Path(stage_dir) / "metrics.csv")}

