"""`metrics.csv`: one row per training step, flushed as it goes, in a schema notebooks already read.

The PPO stage writes the reference schema
`step, policy_loss, value_loss, kl_divergence, reward_score, learning_rate, batch_size, timestamp`
first, extra columns after. A killed run keeps every row written so far; a resumed run appends
(the analysis package sorts and de-duplicates steps, last write wins).
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class MetricsCSV(pl.Callback):
    """Writes `pl_module.csv_row` (a dict the module sets in `training_step`) after every batch.

    A module with a `csv_columns` list (PPO) fixes the leading columns; otherwise `columns` does.

    columns: the leading columns, in order; the module's other keys follow, sorted, then the
    `timestamp` column last unless `columns` places it. `step` is the 1-based number of
    training batches done (one PPO update, or one optimizer step in SFT/RM).
    """

    def __init__(self, path: str, columns: list[str] | None = None):
        self.path = Path(path)
        self.columns = list(columns or ["step"])
        self._header: list[str] | None = None
        self._written: dict | None = None

    def _open_header(self, row: dict) -> list[str]:
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                return next(csv.reader(f))
        lead = list(getattr(self, "_module_columns", None) or self.columns)
        extra = sorted(k for k in row if k not in lead and k != "timestamp")
        header = lead + extra + ([] if "timestamp" in lead else ["timestamp"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(header)
        return header

    def _drop_rows_from(self, step: int) -> None:
        """On resume, rows from `step` on were written after the checkpoint and are about to be
        written again: drop them so the file has each step once."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < step]
        if len(keep) < len(rows):
            tmp = self.path.with_suffix(".csv.tmp")
            with tmp.open("w", newline="") as f:
                csv.writer(f).writerows(keep)
            os.replace(tmp, self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = getattr(pl_module, "csv_row", None)
        if not row or row is self._written or trainer.global_rank != 0:
            return
        self._written = row  # the module's row stays readable by other callbacks (health alarms)
        # Lightning bumps this counter after on_train_batch_end, so +1 gives 1-based steps.
        row = {"step": trainer.fit_loop.epoch_loop._batches_that_stepped + 1, **row,
               "timestamp": time.strftime(TIME_FORMAT)}
        if self._header is None:
            self._drop_rows_from(row["step"])
            self._module_columns = getattr(pl_module, "csv_columns", None)  # a stage may fix its schema
            self._header = self._open_header(row)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in self._header])


def _fmt(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v
