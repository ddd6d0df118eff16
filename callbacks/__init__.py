"""Lightning callbacks of the project: per-step CSV logs and end-of-stage reports."""
from callbacks.analysis_report import AnalysisReport
from callbacks.metrics_csv import MetricsCSV
from callbacks.rng_state import RNGState

__all__ = ["AnalysisReport", "MetricsCSV", "RNGState"]
