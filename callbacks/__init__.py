"""Lightning callbacks of the project: per-step CSV logs and end-of-stage reports."""
from callbacks.metrics_csv import MetricsCSV

__all__ = ["MetricsCSV"]
