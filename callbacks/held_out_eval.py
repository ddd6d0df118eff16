"""Held-out evaluation during a policy stage, and the best policy kept beside the last.

    python train.py eval.eval_every=10                 # evaluate every 10 updates (null: only at the end)
    python train.py eval.eval_prompts=200              # prompts per evaluation point (null: the stage's eval_prompts)
    python train.py eval.best_metric=reward            # pick the best by the proxy (auto: gold when known)

At update 0 (the start policy), every `eval_every` updates and at the last, the policy samples one
response per held-out prompt (the first `eval.eval_prompts` of the stage's `eval_prompts`, or
all of them; the same prompts and random numbers each time, as the end-of-stage comparison,
which keeps the stage's own count) and logs `eval/reward` (the proxy), `eval/gold`
(when a gold is known), `eval/kl` (k1 to the reference, nats per sequence),
`eval/response_length`, `eval/distinct_2` and, on a verifiable task (`data=arithmetic`),
`eval/accuracy` (greedy decoding, the verifier's verdict) to the loggers and to `<stage>/eval.csv`, the
points `python -m analysis` draws reward over-optimisation from. A better `best_metric` than
every earlier point exports the policy to `<stage>/best_model`; the stage's results (and
summary.json) get `best_step`, `best_metric` and `best_model_dir`.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

COLUMNS = ["step", "kl", "reward", "gold", "response_length", "distinct_2"]
VERIFIED_COLUMNS = COLUMNS + ["accuracy"]  # a verifiable task's eval.csv
BEST_METRICS = ("auto", "gold", "reward")


class HeldOutEval(pl.Callback):
    def __init__(self, stage_dir: str, eval_every: int | None = None, best_metric: str = "auto",
                 eval_prompts: int | None = None):
        if eval_every is not None and eval_every <= 0:
            raise ValueError(f"eval.eval_every must be > 0 or null, got {eval_every}")
        if eval_prompts is not None and eval_prompts <= 0:
            raise ValueError(f"eval.eval_prompts must be > 0 or null, got {eval_prompts}")
        self.eval_prompts = eval_prompts
        if best_metric not in BEST_METRICS:
            raise ValueError(f"eval.best_metric must be one of {', '.join(BEST_METRICS)}, got {best_metric!r}")
        self.stage_dir = Path(stage_dir)
        self.eval_every, self.best_metric = eval_every, best_metric
        self.best: dict | None = None  # {"step", "name", "value"}
        self.points: list[dict] = []
        self._loader = None
        self.columns = COLUMNS
        self.seconds = 0.0  # spent evaluating (inside the stage's fit_seconds)

    @property
    def csv_path(self) -> Path:
        return self.stage_dir / "eval.csv"

    def _active(self, pl_module) -> bool:
        return self.eval_every is not None and getattr(pl_module, "evaluates_policy", False)

    def on_train_start(self, trainer, pl_module):
        if not self._active(pl_module):
            return
        from rlhf.evaluation.held_out import eval_loader

        pl_module.ensure_reference()
        self._loader = eval_loader(pl_module, trainer.datamodule)
        self.columns = VERIFIED_COLUMNS if getattr(pl_module, "verify", None) is not None else COLUMNS
        done = trainer.fit_loop.epoch_loop._batches_that_stepped
        if done == 0:
            if trainer.global_rank == 0 and self.csv_path.exists():
                self.csv_path.unlink()  # a fresh stage: no points from an earlier attempt
            self._evaluate(trainer, pl_module, 0)
        elif self.csv_path.exists():  # resumed: the points before the checkpoint, and the best among them
            with self.csv_path.open(newline="") as f:
                self.points = [r for r in csv.DictReader(f) if int(r["step"]) <= done]
            if trainer.global_rank == 0:  # points written after the checkpoint come again
                tmp = self.csv_path.with_suffix(".csv.tmp")
                with tmp.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(self.points)
                os.replace(tmp, self.csv_path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._active(pl_module):
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # updates done, as metrics.csv counts
        last = trainer.max_steps // pl_module.optimizer_steps_per_batch
        if step % self.eval_every == 0 or step == last or trainer.should_stop:
            self._evaluate(trainer, pl_module, step)

    def _evaluate(self, trainer, pl_module, step: int) -> None:
        from rlhf.evaluation.held_out import evaluate_policy

        if self.points and int(self.points[-1]["step"]) == step:
            return
        t0 = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            n = min(self.eval_prompts or pl_module.cfg.eval_prompts, pl_module.cfg.eval_prompts)
            m = evaluate_policy(pl_module, self._loader, n)
        self.seconds += time.perf_counter() - t0
        row = {"step": step, **m}
        self.points.append(row)
        for lg in trainer.loggers:
            lg.log_metrics({f"eval/{k}": v for k, v in m.items()}, step=step)
        name = self._metric_name(m)
        if trainer.global_rank != 0:
            return
        self._append_csv(row)
        if name is not None and math.isfinite(m[name]) and (self.best is None or m[name] > self.best["value"]):
            self.best = {"step": step, "name": f"eval/{name}", "value": m[name]}
            self._export_best(pl_module)

    def _metric_name(self, m: dict) -> str | None:
        if self.best_metric != "auto":
            return self.best_metric if self.best_metric in m else None
        return "gold" if "gold" in m else "reward" if "reward" in m else None

    def _append_csv(self, row: dict) -> None:
        new = not self.csv_path.exists()
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.columns})

    def _export_best(self, pl_module) -> None:
        """Written beside, then swapped in: a run killed mid-export keeps the previous best whole."""
        from rlhf.stages.common import export_hf

        out = self.stage_dir / "best_model"
        tmp = self.stage_dir / "best_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_hf(pl_module.policy, pl_module.tokenizer, tmp)
        (tmp / "best.txt").write_text(f"{self.best['name']}={self.best['value']:.6g} at update {self.best['step']}\n")
        old = self.stage_dir / "best_model.old"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)

    def summary(self) -> dict:
        """What the stage's results (summary.json) get."""
        if self.best is None:
            return {}
        return {"best_step": self.best["step"], "best_metric": {"name": self.best["name"], "value": self.best["value"]},
                "best_model_dir": str(self.stage_dir / "best_model"), "eval_csv": str(self.csv_path),
                "eval_points": len(self.points), "eval_seconds": round(self.seconds, 2)}

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state_dict):
        self.best = state_dict.get("best")
