"""Fault guards shared by the stages: stop on a non-finite loss or reward, naming step and quantity.

A NaN does not crash PyTorch; it silently turns every weight into NaN at the next optimizer
step, and the periodic checkpoint after that would overwrite the last good one. Raising
before the step keeps the last good checkpoint and every log row written so far.
"""
from __future__ import annotations

import torch

from rlhf.errors import UserError


def check_finite(module, stage: str, step: int | None = None, **tensors: torch.Tensor) -> None:
    """Raise a one-line UserError if any of `tensors` holds NaN or inf."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            trainer = module.trainer
            if step is None:
                step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
            raise UserError(f"non-finite {name} at {stage} step {step}: stopping; earlier checkpoints and logs "
                            f"are kept in {trainer.default_root_dir}")
