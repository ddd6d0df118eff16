"""Writes the analysis dashboard and `report.md` into the run directory when an RL stage ends."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class AnalysisReport(pl.Callback):
    """After `fit` of a stage whose metrics.csv has the reference schema (its `csv_columns` declares
    it: the online RL stages), run `analysis.write_report` on the run dir.

    A failing report never fails training: the run's logs are the product, the report a view.
    """

    def __init__(self, stage_dir: str, window: int = 50, lang: str = "en"):
        self.stage_dir = Path(stage_dir)
        self.window = window
        self.lang = lang
        self.report: Path | None = None

    def on_fit_end(self, trainer, pl_module):
        from analysis.load import REQUIRED_COLUMNS

        if trainer.global_rank != 0 or not set(REQUIRED_COLUMNS) <= set(getattr(pl_module, "csv_columns", None) or ()):
            return
        from analysis import AnalysisError, write_report

        csv = self.stage_dir / "metrics.csv"
        try:
            # A short run gets a window it can fill; the notebook's 50 stays the default.
            rows = max(sum(1 for _ in csv.open()) - 1, 1)
            self.report = write_report(csv, out_dir=self.stage_dir.parent / "report",
                                       window=max(1, min(self.window, rows // 2 or 1)), lang=self.lang)
            print(f"analysis report: {self.report}")
        except (AnalysisError, OSError, ValueError) as e:
            log.warning("analysis report not written: %s", e)
