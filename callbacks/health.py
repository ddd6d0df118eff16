"""Run-health alarms applied live: the detectors of `analysis.alarms` on a stage's metrics as it trains.

    python train.py callbacks.health.on_alarm=stop    # end the stage cleanly at the first alarm

Each update's metrics row (the one `metrics.csv` gets) is appended to the rows so far and the
detectors run on them; an alarm fires once, at its first step, with the same name, step and
message `python -m analysis` reports afterwards from the CSV. `warn` logs it; `stop` also ends
the stage after that update: the export and evaluation still run, `summary.json` says why it
stopped, and no checkpoint is written from the alarmed update on, so the last checkpoint is the
last healthy one. Every rank sees the same (all-reduced) rows, so under DDP all ranks stop together.

A stage that does not sample while training (DPO and the rest of the preference family) logs no
response lengths; its length rules judge the held-out evaluation points (`HeldOutEval`'s, the rows
of `eval.csv`; `analysis.alarms.detect_eval`) as they come, the last at the end of training.
"""
from __future__ import annotations

import logging

import pytorch_lightning as pl

log = logging.getLogger(__name__)

ACTIONS = ("warn", "stop")


class HealthMonitor(pl.Callback):
    def __init__(self, on_alarm: str = "warn", metrics_csv: str | None = None):
        if on_alarm not in ACTIONS:
            raise ValueError(f"callbacks.health.on_alarm must be warn or stop, got {on_alarm!r}")
        self.on_alarm = on_alarm
        self.rows: list[dict] = []
        self.alarms: list[dict] = []  # as analysis --json lists them
        self.stopped: dict | None = None
        self._last_row = None
        self._eval_points_judged = 0  # held-out points the length rules have seen (offline stages)
        self.metrics_csv = metrics_csv  # a resumed stage starts from the rows written before its checkpoint

    def on_train_start(self, trainer, pl_module):
        import pandas as pd

        done = trainer.fit_loop.epoch_loop._batches_that_stepped
        if done and self.metrics_csv and not self.rows:
            try:
                old = pd.read_csv(self.metrics_csv)
            except (OSError, ValueError):
                return
            self.rows = old[old["step"] <= done].drop(columns=["timestamp"], errors="ignore").to_dict("records")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = getattr(pl_module, "csv_row", None)
        if not row or row is self._last_row:
            return
        self._last_row = row
        # The same 1-based step metrics.csv writes (Lightning bumps its counter after this hook).
        self.rows.append({**row, "step": trainer.fit_loop.epoch_loop._batches_that_stepped + 1})
        from analysis.alarms import detect

        frame = _frame(self.rows)
        alarms, _ = detect(frame)
        self._record(trainer, alarms + self._eval_alarms(trainer, frame))

    def on_train_end(self, trainer, pl_module):
        if self.rows:  # the last evaluation point comes after this callback's last batch hook
            self._record(trainer, self._eval_alarms(trainer, _frame(self.rows)))

    def _eval_alarms(self, trainer, frame) -> list:
        """The length rules on the held-out evaluation points so far, when the rows have no lengths
        (judged again only when a point has come since)."""
        from analysis.alarms import detect_eval, has_lengths

        from callbacks.held_out_eval import HeldOutEval

        if has_lengths(frame):
            return []
        ev = next((cb for cb in trainer.callbacks if isinstance(cb, HeldOutEval)), None)
        if ev is None or len(ev.points) <= self._eval_points_judged:
            return []
        self._eval_points_judged = len(ev.points)
        points = _frame(ev.points)
        return detect_eval(points)[0] if "response_length" in points.columns else []

    def _record(self, trainer, alarms) -> None:
        seen = {a["name"] for a in self.alarms}
        for a in alarms:
            if a.name in seen:
                continue
            record = {"name": a.name, "step": int(a.step), "value": _plain(a.value), "threshold": _plain(a.threshold),
                      "message": a.message}
            self.alarms.append(record)
            if trainer.global_rank == 0:
                log.warning("alarm %s at step %d: %s", a.name, a.step, a.message)
            if self.on_alarm == "stop" and self.stopped is None:
                self.stopped = record
                trainer.should_stop = True
                for ckpt in trainer.checkpoint_callbacks:  # keep the last healthy checkpoint as it is
                    _stop_saving(ckpt)

    def summary(self) -> dict:
        """What the stage's results (summary.json) get."""
        out = {"alarms": list(self.alarms)}
        if self.stopped is not None:
            out["stopped_by_alarm"] = self.stopped
        return out

    def state_dict(self):
        return {"alarms": self.alarms}

    def load_state_dict(self, state_dict):
        self.alarms = list(state_dict.get("alarms", []))


def _stop_saving(ckpt) -> None:
    ckpt._every_n_train_steps = 0
    ckpt._every_n_epochs = 0
    ckpt._train_time_interval = None
    ckpt.save_last = False
    ckpt.save_top_k = 0


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows).apply(pd.to_numeric, errors="coerce")


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
