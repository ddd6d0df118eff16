"""Lightning callbacks of the project: per-step CSV logs and end-of-stage reports."""
from callbacks.analysis_report import AnalysisReport
from callbacks.metrics_csv import MetricsCSV

__all__ = ["AnalysisReport", "MetricsCSV"]
