"""Lightning callbacks of the project: per-step CSV logs, held-out evaluation with the best policy,
run-health alarms, RNG state in checkpoints and end-of-stage reports."""
from callbacks.analysis_report import AnalysisReport
from callbacks.health import HealthMonitor
from callbacks.held_out_eval import HeldOutEval
from callbacks.metrics_csv import MetricsCSV
from callbacks.progress import UpdatesProgressBar
from callbacks.rng_state import RNGState
from callbacks.tb_layout import TensorBoardLayout

__all__ = ["AnalysisReport", "HealthMonitor", "HeldOutEval", "MetricsCSV", "RNGState", "TensorBoardLayout",
           "UpdatesProgressBar"]
