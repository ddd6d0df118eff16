"""Write PNG figures and a Markdown ``report.md`` for a run or a sweep.

Default output folder: the run (or sweep) directory itself, or the CSV's folder.
A run gets ``dashboard.png``, ``moving_average.png`` and a metrics table; a sweep
gets ``sweep_reward_vs_kl.png``, ``sweep_final_reward.png`` and a per-run table
ranked by :func:`analysis.sweep.rank_runs`, plus the failed jobs; a sweep over
several seeds also gets ``seeds.png`` and the mean and 95% confidence interval of
each configuration (:mod:`analysis.seeds`). Warnings (duplicated/out-of-order
steps, NaN/inf, KL spikes, suspected collapse) are listed.

Run health: every report has an "Alarms" section (:func:`analysis.alarms.detect`, first step
per alarm, and the detectors skipped for missing columns; the length rules on ``eval.csv``'s points,
:func:`analysis.alarms.detect_eval`, for a stage whose log has no sampled lengths) and a run gets ``health.png``. With an
``eval.csv`` beside the training log a run also gets an "Over-optimisation" section and
``overoptimisation.png`` (:func:`analysis.overoptimisation.analyse`); a sweep gets ``frontier.png``,
the KL-reward frontier per configuration over seeds.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import health_plots, plots
from .alarms import EVAL_RULES, detect, detect_eval, has_lengths
from .errors import AnalysisError
from .load import is_sweep_dir, load_eval, load_run, load_sweep
from .metrics import compute_metrics, metric_warnings
from .overoptimisation import analyse, frontier_groups, sweep_frontier
from .seeds import (comparison_table, config_label, config_metrics, has_seeds, seed_column, seed_curves, seed_table,
                    shown_metrics)
from .sweep import rank_runs, sweep_table, varying_params

DESCRIPTIONS = {
    "num_steps": "rows after de-duplication",
    "policy_loss_reduction_pct": "(pl[0] - pl[-1]) / pl[0] * 100",
    "reward_improvement": "rs[-1] - rs[0]",
    "training_stability": "1 / (1 + var(pl)), notebook score (unit-dependent)",
    "final_policy_loss_ma": "last value of the window moving average of policy loss",
    "final_reward_score_ma": "last value of the window moving average of reward",
    "policy_loss_relative_noise": "std(diff(pl)) / sqrt(2) / mean(|pl|)",
    "policy_loss_stability": "1 / (1 + relative noise of pl), scale-free, 1 = smooth",
    "reward_stability": "1 / (1 + relative noise of reward)",
    "reward_per_kl": "(mean(rs[-w:]) - mean(rs[:w])) / mean(kl[-w:])",
    "collapse_suspected": "reward trend t <= -2 and KL trend t >= 2 over the last window",
    "kl_spike_count": "rows where the kl_spike alarm's rule holds (far above the trailing median, then back)",
    "nan_count": "NaN values in the four metric columns",
    "inf_count": "inf values in the four metric columns",
}
OVEROPT_DESCRIPTIONS = {
    "n_points": "evaluations in eval.csv",
    "baseline_step": "the start policy's evaluation: gains are relative to it",
    "final_step": "last evaluation",
    "final_kl": "KL to the reference at the last evaluation (nats, summed per response)",
    "alpha": "Gao fit R(d) = d (alpha - beta ln d), d = sqrt(KL), R = gold gain over the start",
    "beta": "Gao fit: beta > 0 means the gold reward peaks and then falls",
    "alpha_se": "standard error of alpha (least squares)",
    "beta_se": "standard error of beta (least squares)",
    "gold_peak_kl": "KL at the fitted peak d* = exp(alpha / beta - 1)",
    "gold_peak_kl_ci": "95% interval of that KL (delta method on ln d*, Student t)",
    "gold_peak_gain": "fitted gold gain at the peak, beta * d*",
    "gold_noise": "residual SD of the gold fit",
    "observed_peak_kl": "KL at the evaluation with the highest gold reward",
    "observed_peak_step": "step of that evaluation",
    "observed_peak_gain": "gold gain at that evaluation",
    "gold_gain_end": "gold gain at the last evaluation",
    "proxy_gain_end": "proxy (reward-model) gain at the last evaluation",
    "proxy_gold_gap_end": "proxy gain minus gold gain at the last evaluation",
    "past_peak": "last evaluation beyond d*'s 95% interval, or gold fallen from its best by more than 2 x noise",
    "proxy_alpha": "the same fit of the proxy gain",
    "proxy_beta": "the same fit of the proxy gain (about 0 or below: no proxy peak)",
    "proxy_peak_kl": "KL at the proxy fit's peak, if it has one",
}
SWEEP_COLUMNS = ("final_reward_score", "final_kl_divergence", "reward_per_kl", "policy_loss_reduction_pct",
                 "policy_loss_stability", "collapse_suspected", "kl_spike_count")


def fmt(v) -> str:
    """Format a metric value for tables: 6 significant digits, yes/no, n/a for missing."""
    if v is None or v is pd.NA:
        return "n/a"
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()  # numpy scalar -> Python
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (list, tuple)):  # an interval
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return out


def default_out_dir(path: Path, out_dir=None) -> Path:
    """``out_dir`` if given, else the input directory (or the CSV's folder); created if missing."""
    out = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_warnings(df: pd.DataFrame, metrics: dict) -> list[str]:
    """Loader warnings (``df.attrs['warnings']``) followed by :func:`metric_warnings`."""
    return list(df.attrs.get("warnings", [])) + metric_warnings(metrics)


def eval_for(source) -> tuple[pd.DataFrame | None, str | None]:
    """``(eval frame, None)`` from the ``eval.csv`` beside a log, or ``(None, why it is skipped)``."""
    if source is None:
        return None, "over-optimisation skipped: the log has no source path to look for eval.csv beside"
    try:
        ev = load_eval(source)
    except AnalysisError as exc:
        return None, f"over-optimisation skipped: {' '.join(str(exc).split())}"
    return ev, None if ev is not None else "over-optimisation skipped: no eval.csv beside the training log"


def run_health(df: pd.DataFrame, eval_df: pd.DataFrame | None, eval_skip: str | None = None) -> dict:
    """``{"alarms": [Alarm dicts], "skipped": [lines], "overoptimisation": dict}`` (the last only
    with ``eval_df``); ``skipped`` also holds ``eval_skip`` and the over-optimisation's own lines."""
    alarms, skipped = detect(df)
    if eval_df is not None and not has_lengths(df) and "response_length" in eval_df.columns:
        # A stage that does not sample while training: its lengths are the evaluation points'.
        more, why = detect_eval(eval_df)
        skipped = [s for s in skipped if s.split(" ", 1)[0] not in EVAL_RULES] + why
        alarms = alarms + more
    out = {"alarms": [a.to_dict() for a in alarms], "skipped": list(skipped)}
    if eval_df is not None:
        out["overoptimisation"] = analyse(eval_df)
        out["skipped"] += out["overoptimisation"]["skipped"]
    elif eval_skip:
        out["skipped"].append(eval_skip)
    return out


def alarm_lines(health: dict) -> list[str]:
    """Markdown: the alarms as a table (or "None."), then the skipped analyses."""
    rows = [[a["name"], a["step"], a["value"], a["threshold"], a["message"]] for a in health["alarms"]]
    lines = _md_table(["alarm", "first step", "value", "threshold", "message"], rows) if rows else ["None."]
    if health["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in health["skipped"]]
    return lines


def overopt_lines(oo: dict) -> list[str]:
    rows = [[k, v, OVEROPT_DESCRIPTIONS.get(k, "")] for k, v in oo.items() if k not in ("skipped", "past_peak_reason")]
    lines = _md_table(["measure", "value", "definition"], rows)
    if oo.get("past_peak_reason"):
        lines += ["", f"Past the peak: {fmt(oo['past_peak'])} ({oo['past_peak_reason']})."]
    return lines


def write_run_report(df: pd.DataFrame, metrics: dict, out_dir: Path, window: int = 50, lang: str = "en",
                     eval_df: pd.DataFrame | None = None, health: dict | None = None) -> Path:
    """Figures + ``report.md`` for one loaded run; returns the report path.

    ``eval_df`` defaults to the ``eval.csv`` beside ``df.attrs['source']``; ``health`` to
    :func:`run_health` of the two (pass both to reuse what the caller computed)."""
    out_dir = Path(out_dir)
    eval_skip = None
    if eval_df is None:
        eval_df, eval_skip = eval_for(df.attrs.get("source"))
    if health is None:
        health = run_health(df, eval_df, eval_skip)
    plots.dashboard(df, out_dir / "dashboard.png", lang=lang, window=window)
    plots.moving_average_figure(df, out_dir / "moving_average.png", window=window, lang=lang)
    health_plots.health(df, out_dir / "health.png", window=window, lang=lang)
    warnings = run_warnings(df, metrics)
    lines = [
        "# RLHF run report", "",
        f"Source: `{df.attrs.get('source', '?')}` ({df.attrs.get('source_kind', '?')}), "
        f"{metrics['num_steps']} steps ({metrics['first_step']} to {metrics['last_step']}), window {window}.", "",
        "## Warnings", "",
    ]
    lines += [f"- {w}" for w in warnings] or ["None."]
    lines += ["", "## Alarms", ""] + alarm_lines(health)
    if "overoptimisation" in health:
        health_plots.overoptimisation(eval_df, health["overoptimisation"], out_dir / "overoptimisation.png", lang)
        lines += ["", "## Over-optimisation", "", f"From `{eval_df.attrs.get('source', 'eval.csv')}`.", ""]
        lines += overopt_lines(health["overoptimisation"])
        lines += ["", "![Over-optimisation](overoptimisation.png)"]
    lines += ["", "## Metrics", ""]
    lines += _md_table(["metric", "value", "definition"], [[k, v, DESCRIPTIONS.get(k, "")] for k, v in metrics.items()])
    lines += ["", "## Figures", "", "![Training dashboard](dashboard.png)", "",
              "![Moving averages](moving_average.png)", "", "![Run health](health.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def seed_lines(seeds: pd.DataFrame) -> list[str]:
    """Markdown for a :func:`analysis.seeds.seed_table`: the definition, then a table per configuration."""
    lines = ["Mean over seeds and 95% confidence interval, `mean ± t(0.975, n-1) · sd / sqrt(n)` with the "
             "sample SD (n/a with one seed), per configuration of the overrides other than the seed. "
             "Metrics: each job's `summary.json` numbers, then the ranking's log metrics "
             "(`python -m analysis --json` gives every numeric one).", ""]
    skipped = seeds.attrs.get("skipped", {})
    if skipped:
        lines += ["Left out (no readable summary.json): " + ", ".join(f"job {r}" for r in skipped) + ".", ""]
    if seeds.empty:
        return lines + ["No job to aggregate.", ""]
    params, metrics = seeds.attrs.get("varying", seeds.attrs.get("params", [])), shown_metrics(seeds)
    lines += ["### Comparison", "", *comparison_table(seeds), ""]
    for _, row in seeds.iterrows():
        lines += [f"### {config_label(row, params)}", "",
                  f"{row['n_seeds']} seed(s): {', '.join(map(fmt, row['seeds']))} "
                  f"(jobs {', '.join(map(str, row['runs']))}).", ""]
        stats = config_metrics(row, metrics)
        lines += _md_table(["metric", "mean", "± 95% CI", "low", "high", "n"],
                           [[m, s["mean"], s["ci95"], s["lo"], s["hi"], s["n"]] for m, s in stats.items()])
        lines.append("")
    return lines


def sweep_health(df: pd.DataFrame, ranked: pd.DataFrame, window: int = 50) -> dict:
    """Per-run :func:`run_health` of a :func:`analysis.load_sweep` frame (``eval.csv`` looked up in
    each job folder) and the KL-reward frontier: ``{"runs": {run: health}, "bands": DataFrame,
    "frontier": {"kind", "source", "skipped"}}`` (see :func:`analysis.overoptimisation.sweep_frontier`)."""
    root = Path(df.attrs.get("source", "."))
    drop = ["run", *df.attrs.get("override_keys", [])]
    runs, health = {}, {}
    for run, g in df.groupby("run", sort=False):
        log = g.drop(columns=[c for c in drop if c in g.columns]).reset_index(drop=True)
        ev, why = eval_for(root / str(run))
        health[run] = run_health(log, ev, why)
        runs[run] = (ev, log)
    params = list(ranked.attrs.get("params", []))
    groups = frontier_groups(list(runs), ranked.set_index("run")[params], seed_column(ranked), root)
    bands, meta = sweep_frontier(runs, groups, window)
    return {"runs": health, "bands": bands, "frontier": meta}


def write_sweep_report(df: pd.DataFrame, ranked: pd.DataFrame, out_dir: Path, window: int = 50,
                       lang: str = "en", seeds: pd.DataFrame | None = None, health: dict | None = None) -> Path:
    """Figures + ``report.md`` for a sweep; ``ranked`` comes from :func:`rank_runs`,
    ``seeds`` (optional) from :func:`analysis.seeds.seed_table`: adds ``seeds.png`` and a section;
    ``health`` defaults to :func:`sweep_health` (alarms per run, ``frontier.png``)."""
    out_dir = Path(out_dir)
    health = health if health is not None else sweep_health(df, ranked, window)
    health_plots.frontier(health["bands"], health["frontier"], out_dir / "frontier.png", lang=lang)
    draw_seeds = seeds is not None and not seeds.empty
    if draw_seeds:
        plots.seed_bands(seed_curves(df, seeds, window), out_dir / "seeds.png", window=window, lang=lang)
    params = varying_params(ranked) or list(ranked.attrs.get("params", []))
    plots.sweep_reward_vs_kl(df, out_dir / "sweep_reward_vs_kl.png", window=window, lang=lang,
                             table=ranked, params=params)
    plots.sweep_final_reward(ranked, out_dir / "sweep_final_reward.png", params=varying_params(ranked), lang=lang)
    failed = ranked.attrs.get("failed_jobs", {})
    max_kl = ranked.attrs.get("max_kl")
    bound = f"final_kl_divergence <= {max_kl:g}" if max_kl is not None else "no KL bound"
    verb = "maximise" if ranked.attrs.get("maximize", True) else "minimise"
    lines = [
        "# RLHF sweep report", "",
        f"Source: `{df.attrs.get('source', '?')}`: {len(ranked)} run(s) analysed, {len(failed)} failed; "
        f"window {window}.", "",
        f"Objective: {verb} `{ranked.attrs.get('objective')}` among runs with {bound}.", "",
        "## Ranking", "",
    ]
    cols = ["rank", "run"] + list(ranked.attrs.get("params", [])) + list(SWEEP_COLUMNS)
    rows = [[r[c] if c != "rank" or not pd.isna(r[c]) else "-" for c in cols] for _, r in ranked.iterrows()]
    lines += _md_table(cols, rows)
    if seeds is not None:
        lines += ["", "## Over seeds", ""] + seed_lines(seeds)
    lines += ["", "## Failed jobs", ""]
    lines += [f"- job {name}: {why}" for name, why in failed.items()] or ["None."]
    lines += ["", "## Warnings", ""]
    warn = [f"- run {run}: {w}" for run, ws in ranked.attrs.get("warnings", {}).items() for w in ws]
    lines += warn or ["None."]
    lines += ["", "## Alarms", ""]
    for run, h in health["runs"].items():
        lines += [f"### Run {run}", ""] + alarm_lines(h) + [""]
    oo = {run: h["overoptimisation"] for run, h in health["runs"].items() if "overoptimisation" in h}
    meta = health["frontier"]
    lines += ["## Over-optimisation", "",
              f"KL-reward frontier: {meta['kind']} gain over the start policy against sqrt(KL), per configuration "
              f"the mean over seeds with the min-max band (source: {meta['source']}).", ""]
    lines += [f"- {line}" for line in meta["skipped"]] + ([""] if meta["skipped"] else [])
    if oo:
        keys = ["alpha", "beta", "gold_peak_kl", "observed_peak_kl", "proxy_gold_gap_end", "past_peak"]
        lines += _md_table(["run", *keys], [[run, *(o[k] for k in keys)] for run, o in oo.items()]) + [""]
    lines += ["![KL-reward frontier](frontier.png)"]
    lines += ["", "## Figures", "", "![Reward vs KL per run](sweep_reward_vs_kl.png)", "",
              "![Final reward by hyperparameter](sweep_final_reward.png)", ""]
    if draw_seeds:
        lines += ["![Mean over seeds with 95% confidence band](seeds.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def write_report(path, out_dir=None, window: int = 50, lang: str = "en", max_kl: float | None = None,
                 objective: str = "final_reward_score") -> Path:
    """Load ``path`` (CSV, run directory or multirun directory), then write figures and ``report.md``.

    ``max_kl`` and ``objective`` only matter for a sweep (see :func:`analysis.sweep.rank_runs`).
    Returns the path of ``report.md``.
    """
    path = Path(path)
    plots.check_lang(lang)  # fail on a bad language or missing CJK font before any work
    if is_sweep_dir(path):
        df, _failed = load_sweep(path)
        table = sweep_table(df, window)
        ranked = rank_runs(table, objective=objective, max_kl=max_kl)
        seeds = seed_table(table, path) if has_seeds(table) else None
        return write_sweep_report(df, ranked, default_out_dir(path, out_dir), window, lang, seeds=seeds)
    df = load_run(path)
    return write_run_report(df, compute_metrics(df, window), default_out_dir(path, out_dir), window, lang)
