"""Writes the analysis dashboard and `report.md` into the run directory when the PPO stage ends."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class AnalysisReport(pl.Callback):
    """After `fit` of the stages named in `stages`, run `analysis.write_report` on the run dir.

    A failing report never fails training: the run's logs are the product, the report a view.
    """

    def __init__(self, stage_dir: str, stages: tuple[str, ...] = ("ppo",), window: int = 50, lang: str = "en"):
        self.stage_dir = Path(stage_dir)
        self.stages = tuple(stages)
        self.window = window
        self.lang = lang
        self.report: Path | None = None

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank != 0 or self.stage_dir.name not in self.stages:
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
