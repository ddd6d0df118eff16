"""Analyse RLHF training logs: load runs and sweeps, compute metrics, draw figures, write reports.

Public API::

    from analysis import load_run, load_sweep, compute_metrics, write_report, AnalysisError

    df = load_run("outputs/runs/2024-05-01/12-00-00")   # or a metrics.csv, or TensorBoard events
    metrics = compute_metrics(df, window=50)            # flat dict, formulas in analysis.metrics
    write_report("outputs/multirun/2024-05-01/12-00-00", max_kl=6.0)

    # a sweep over seeds: mean and 95% CI per configuration of the other overrides
    df, _failed = load_sweep(sweep_dir)
    seeds = seed_table(sweep_table(df), sweep_dir)     # <m>_mean, <m>_ci95, <m>_lo, <m>_hi, <m>_n
    mean, half = confidence_interval([1.0, 2.0, 3.0])  # (2.0, 2.484): Student t, sample SD

Command line: ``python -m analysis PATH [--window 50] [--out DIR] [--json] [--lang en|zh] [--max-kl X]``.
"""
from .errors import AnalysisError
from .load import load_run, load_sweep
from .metrics import compute_metrics
from .report import write_report
from .seeds import confidence_interval, seed_curves, seed_table
from .sweep import sweep_table

__all__ = ["AnalysisError", "compute_metrics", "confidence_interval", "load_run", "load_sweep", "seed_curves",
           "seed_table", "sweep_table", "write_report"]
