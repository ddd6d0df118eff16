"""Analyse RLHF training logs: load runs and sweeps, compute metrics, draw figures, write reports.

Public API::

    from analysis import load_run, load_sweep, compute_metrics, write_report, AnalysisError

    df = load_run("outputs/runs/2024-05-01/12-00-00")   # or a metrics.csv, or TensorBoard events
    metrics = compute_metrics(df, window=50)            # flat dict, formulas in analysis.metrics
    write_report("outputs/multirun/2024-05-01/12-00-00", max_kl=6.0)

Command line: ``python -m analysis PATH [--window 50] [--out DIR] [--json] [--lang en|zh] [--max-kl X]``.
"""
from .errors import AnalysisError
from .load import load_run, load_sweep
from .metrics import compute_metrics
from .report import write_report

__all__ = ["AnalysisError", "compute_metrics", "load_run", "load_sweep", "write_report"]
