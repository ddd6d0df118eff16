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

    alarms, skipped = detect(df)                        # run-health alarms, first step each (analysis.alarms)
    alpha, beta = fit_gao(d, gold_gain)                 # Gao et al. 2023: R(d) = d (alpha - beta ln d)
    summary = analyse_overoptimisation(load_eval(run))  # from <stage>/eval.csv (analysis.overoptimisation)

Command line: ``python -m analysis PATH [--window 50] [--out DIR] [--json] [--lang en|zh] [--max-kl X]``.
"""
from .alarms import Alarm, Thresholds, detect
from .errors import AnalysisError
from .load import load_eval, load_run, load_sweep
from .metrics import compute_metrics
from .overoptimisation import analyse as analyse_overoptimisation
from .overoptimisation import fit_gao
from .report import write_report
from .seeds import confidence_interval, seed_curves, seed_table
from .sweep import sweep_table

__all__ = ["Alarm", "AnalysisError", "Thresholds", "analyse_overoptimisation", "compute_metrics", "confidence_interval",
           "detect", "fit_gao", "load_eval", "load_run", "load_sweep", "seed_curves", "seed_table", "sweep_table",
           "write_report"]
