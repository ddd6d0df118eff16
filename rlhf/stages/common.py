"""What every stage shares: config validation, AdamW with a warm-up schedule, and HF export."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from transformers import get_scheduler

from rlhf.errors import ConfigError
from rlhf.models.lora import has_lora, merge_lora


class StageConfig:
    """Mixin for stage dataclasses: build from a plain dict with a one-line error on bad keys/values."""

    @classmethod
    def from_dict(cls, d: dict, where: str):
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
        try:
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def check_positive(self, *names: str, allow_zero: bool = False) -> None:
        for n in names:
            v = getattr(self, n)
            if v is None or (v < 0 if allow_zero else v <= 0):
                raise ValueError(f"{n} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def adamw_with_schedule(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                        schedule: str = "linear"):
    """Lightning's `configure_optimizers` answer: AdamW, per-step warm-up then decay."""
    # foreach: multi-tensor kernels instead of a loop per tensor (fused is refused by Lightning with clipping under AMP).
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=True)
    sched = get_scheduler(schedule, opt, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` in safetensors with the tokenizer: loadable by plain `transformers`.

    A LoRA model is saved with its adapter merged into the weights, from a copy: the next stage
    and `from_pretrained` see a plain model, and the live one keeps its adapter (PPO's evaluation
    still needs it switched off for the reference).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
