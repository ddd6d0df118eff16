"""A TensorBoard custom-scalars layout for policy stages: the panels of `python -m analysis`'s
health figure (gold vs proxy, KL, entropy, response length, clip fraction), each with its training
and held-out (`eval/*`) curves on one chart. Opens under TensorBoard's "Custom Scalars" tab.
"""
from __future__ import annotations

import pytorch_lightning as pl

LAYOUT = {
    "health": {
        "gold vs proxy reward": ["Multiline", ["objective/scores", "objective/gold_scores", "eval/reward", "eval/gold"]],
        "KL to the reference": ["Multiline", ["objective/kl", "eval/kl"]],
        "entropy": ["Multiline", ["objective/entropy", "policy/entropy_avg"]],
        "response length": ["Multiline", ["objective/response_length", "eval/response_length"]],
        "clip fraction": ["Multiline", ["policy/clipfrac_avg", "value/clipfrac_avg"]],
    },
}


class TensorBoardLayout(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank != 0 or not getattr(pl_module, "evaluates_policy", False):
            return
        for lg in trainer.loggers:
            if isinstance(lg, pl.loggers.TensorBoardLogger):
                lg.experiment.add_custom_scalars(LAYOUT)
