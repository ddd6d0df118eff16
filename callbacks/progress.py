"""A progress bar that counts updates: one bar step per training batch, whatever the optimizer does.

Lightning's bar sizes itself from `max_steps - global_step`, which counts optimizer steps; an online
stage takes epochs x minibatches of those per update, so its bar would show 40/160 and stop at 25%.
"""
from __future__ import annotations

from pytorch_lightning.callbacks import TQDMProgressBar


class UpdatesProgressBar(TQDMProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        per = getattr(trainer.lightning_module, "optimizer_steps_per_batch", 1)
        if trainer.max_epochs == -1 and trainer.max_steps and trainer.max_steps > 0:
            remaining = (trainer.max_steps - trainer.global_step) // max(per, 1)
            return min(trainer.num_training_batches, remaining)
        return super().total_train_batches
