"""Results over seeds: the mean and a Student-t confidence interval per configuration of a sweep.

A configuration is one set of override values other than ``seed``:
``python train.py -m seed=0,1,2 lr=1e-4,3e-4`` has two configurations of three
seeds each. For the values ``x_1..x_n`` of a metric over a configuration's seeds
(NaN = missing, left out of ``n``)::

    mean   = sum(x) / n
    sd     = sqrt(sum((x - mean)^2) / (n - 1))            # sample SD, ddof=1
    half   = t_{(1 + level) / 2, n - 1} * sd / sqrt(n)    # level 0.95: t_{0.975, n-1}
    lo, hi = mean - half, mean + half

``half`` is NaN for ``n = 1``: one seed says nothing about the spread (0 would
claim it is exact). The metrics are the numbers at the top level of each job's
``summary.json`` (:func:`analysis.load.read_summary`) and the numeric
:func:`analysis.compute_metrics` values of :func:`analysis.sweep.sweep_table`.
Jobs without a readable ``summary.json`` are left out with a warning, so that every
metric of a configuration counts the same jobs. The KL bound of the ranking does
not filter seeds: dropping the seeds that drifted would bias the mean.

:func:`seed_curves` applies the same interval step by step to each job's
``window``-step moving average of the logged columns.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .load import read_summary

log = logging.getLogger(__name__)

SEED_KEY = "seed"
LEVEL = 0.95
CURVE_COLUMNS = ("reward_score", "kl_divergence", "policy_loss", "value_loss", "gold_score")
# compute_metrics keys that describe the log or the settings, not a result worth averaging
NOT_RESULTS = {"first_step", "last_step", "window", "kl_spike_k", "first_nonfinite_step"}
# log metrics printed beside the summary numbers (the sweep table's); seed_table and --json keep all
SHOWN_LOG_METRICS = ("final_reward_score", "final_kl_divergence", "reward_per_kl", "policy_loss_reduction_pct",
                     "policy_loss_stability", "kl_spike_count")


def _t_quantile(q: float, dof: np.ndarray) -> np.ndarray:
    from scipy.stats import t  # imported here: scipy.stats costs about a second and only seed sweeps need it

    return t.ppf(q, dof)


def interval(x, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, half_width, n)`` along the last axis of ``x`` (see the module docstring).

    NaN entries are missing values; a row with fewer than 2 of the others gets a
    NaN half width (and a NaN mean with none).
    """
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    n = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(axis=-1) / n
        dev = np.where(ok, x - mean[..., None], 0.0)
        sd = np.sqrt((dev * dev).sum(axis=-1) / (n - 1))
        dof = np.where(n >= 2, n - 1, np.nan)
        half = np.where(n >= 2, _t_quantile((1.0 + level) / 2.0, dof) * sd / np.sqrt(n), np.nan)
    return mean, half, n


def confidence_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """``(mean, half_width)`` of ``values`` over seeds; the interval is ``mean ± half_width``.

    ``[1, 2, 3]`` gives ``(2.0, 4.303 * 1 / sqrt(3) = 2.484)``; one value gives a NaN half width.
    """
    mean, half, _n = interval(np.asarray(values, dtype=float).reshape(1, -1), level)
    return float(mean[0]), float(half[0])


def seed_column(table: pd.DataFrame) -> str | None:
    """The override column holding the seed (``override.seed`` if the log had a ``seed`` column), or None."""
    params = table.attrs.get("params", [])
    return next((c for c in (SEED_KEY, f"override.{SEED_KEY}") if c in params), None)


def has_seeds(table: pd.DataFrame) -> bool:
    """True when a sweep table's ``seed`` override takes more than one value."""
    col = seed_column(table)
    return col is not None and table[col].dropna().astype(str).nunique() > 1


def _log_metrics(table: pd.DataFrame, skip: set[str]) -> list[str]:
    return [c for c in table.columns if c not in skip and c not in NOT_RESULTS
            and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]


def seed_table(runs: pd.DataFrame, sweep_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per configuration of a :func:`analysis.sweep.sweep_table` (or ranked) frame.

    Columns: the non-seed override parameters, ``n_seeds``, ``seeds`` and ``runs``
    (lists, in job order), then for every metric ``<m>_mean``, ``<m>_ci95`` (half
    width), ``<m>_lo``, ``<m>_hi`` and ``<m>_n`` (seeds with a value). With
    ``sweep_dir`` the metrics include each job's ``summary.json`` numbers (a key
    that clashes with a log metric becomes ``summary.<key>``) and jobs without a
    readable one are left out with a warning; without it, only the log metrics.

    ``attrs``: ``params``, ``seed_param``, ``metrics`` (all, summary ones first),
    ``summary_metrics``, ``log_metrics``, ``skipped`` ({run: reason}) and ``level``.
    """
    params = list(runs.attrs.get("params", []))
    seed_col = seed_column(runs)
    config_params = [p for p in params if p != seed_col]
    log_metrics = _log_metrics(runs, {"run", "rank", "eligible", *params})
    # job order, not rank order: configurations and their seeds read as the sweep was launched
    order = pd.to_numeric(runs["run"], errors="coerce").fillna(np.inf).to_numpy()
    runs = runs.iloc[np.argsort(order, kind="stable")]
    summaries, skipped = {}, {}
    if sweep_dir is not None:
        for run in runs["run"]:
            try:
                summaries[run] = read_summary(Path(sweep_dir) / str(run))
            except AnalysisError as exc:
                skipped[run] = str(exc)
                log.warning(f"job {run} left out of the statistics over seeds: {exc}")
        runs = runs[~runs["run"].isin(list(skipped))]
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))
    names = [k if k not in runs.columns else f"summary.{k}" for k in keys]
    values = runs.assign(**{name: runs["run"].map(lambda r, k=k: summaries[r].get(k, np.nan)).astype(float)
                            for k, name in zip(keys, names)})
    metrics = names + log_metrics
    stats = ("mean", "ci95", "lo", "hi", "n")
    columns = config_params + ["n_seeds", "seeds", "runs"] + [f"{m}_{s}" for m in metrics for s in stats]
    # one text key per configuration: NaN (a job without that override) is a value like any other
    group_key = pd.Series([repr(tuple(map(str, t))) for t in values[config_params].itertuples(index=False)],
                          index=values.index, dtype=object)
    rows = []
    for _, g in values.groupby(group_key, sort=False):
        mean, half, n = interval(g[metrics].to_numpy(dtype=float).T)
        row = {p: g[p].iloc[0] for p in config_params}
        row.update(n_seeds=len(g), seeds=list(g[seed_col]) if seed_col else [], runs=list(g["run"]))
        for i, m in enumerate(metrics):
            row.update({f"{m}_mean": mean[i], f"{m}_ci95": half[i], f"{m}_lo": mean[i] - half[i],
                        f"{m}_hi": mean[i] + half[i], f"{m}_n": int(n[i])})
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    # labels name only what differs between configurations; a setting shared by all says nothing
    varying = [p for p in config_params if out[p].astype(str).nunique() > 1]
    out.attrs = {"params": config_params, "varying": varying, "seed_param": seed_col, "metrics": metrics, "summary_metrics": names,
                 "log_metrics": log_metrics, "skipped": skipped, "level": LEVEL}
    return out


def shown_metrics(seeds: pd.DataFrame) -> list[str]:
    """The metrics a text table or report shows: the summary numbers, then :data:`SHOWN_LOG_METRICS`."""
    logged = seeds.attrs.get("log_metrics", [])
    return list(seeds.attrs.get("summary_metrics", [])) + [m for m in SHOWN_LOG_METRICS if m in logged]


def config_metrics(row: pd.Series, metrics: list[str]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "ci95", "lo", "hi", "n"}}`` for one :func:`seed_table` row."""
    return {m: {s: row[f"{m}_{s}"] for s in ("mean", "ci95", "lo", "hi", "n")} for m in metrics}


def config_label(row: pd.Series, params: list[str]) -> str:
    """``lr=0.0001, kl_coef=0.05`` (``all runs`` when only the seed varies).

    Pass ``seeds.attrs["varying"]``: overrides every configuration shares would only add noise.
    """
    return ", ".join(f"{p}={row[p]}" for p in params) or "all runs"


# The comparison a researcher reads first, one row per configuration (algorithm x settings); a verifiable
# task adds its held-out greedy accuracy and pass@k after training (`pass@<k>_after`, every k it has).
# Time and memory are the compared stage's own where the summaries have them: in a sweep whose jobs
# share SFT and the reward model, a job's total says which job happened to train them.
COMPARISON = (("gold_win_rate", "gold win rate"), ("accuracy_after", "accuracy"), ("gold_reward_after", "gold reward"),
              ("kl_final", "KL"), ("reward_after", "reward-model score"),
              (("stage_seconds", "seconds"), "wall time (s)"), (("stage_peak_rss_mb", "peak_rss_mb"), "peak RSS (MB)"))
TASK_PARAM = "data"  # the override that picks the task: a sweep over tasks gets one table per task


def comparison_table(seeds: pd.DataFrame) -> list[str]:
    """Markdown: configuration | each :data:`COMPARISON` metric as ``mean ± ci95`` (n/a where absent).

    `python -m analysis SWEEP` prints it for a sweep over seeds; with `algo` among the swept
    overrides (`python train.py -m algo=ppo,grpo,rloo,dpo seed=0,1,2`) it is the algorithms table.
    A sweep over tasks (`data=synthetic,arithmetic,length_trap`) gets one table per task, each with
    the columns that task has (accuracy and pass@k only where it has a verifier).
    """
    params = seeds.attrs.get("varying", seeds.attrs.get("params", []))
    if TASK_PARAM not in params:
        return _table(seeds, params, drop_empty=False)
    lines = []
    for task, group in seeds.groupby(seeds[TASK_PARAM].astype(str), sort=False):
        lines += [f"Task `{task}`:", "", *_table(group, [p for p in params if p != TASK_PARAM], drop_empty=True), ""]
    return lines[:-1]


def _table(seeds: pd.DataFrame, params: list[str], drop_empty: bool) -> list[str]:
    passes = sorted((c[:-len("_mean")] for c in seeds.columns if c.startswith("pass@") and c.endswith("_after_mean")),
                    key=lambda m: int(m[len("pass@"):].split("_")[0]))
    wanted = [*COMPARISON[:2], *((m, m.removesuffix("_after")) for m in passes), *COMPARISON[2:]]
    cols = []
    for names, label in wanted:  # the first of a column's metrics that the summaries have
        present = [m for m in ((names,) if isinstance(names, str) else names) if f"{m}_mean" in seeds.columns]
        filled = [m for m in present if not seeds[f"{m}_mean"].isna().all()]
        if filled or (present and not drop_empty):
            cols.append(((filled or present)[0], label))
    lines = ["| " + " | ".join([", ".join(params) or "configuration", "seeds", *(lb for _, lb in cols)]) + " |",
             "|" + "---|" * (2 + len(cols))]
    for _, r in seeds.iterrows():
        cells = []
        for m, _ in cols:
            mean, half = r[f"{m}_mean"], r[f"{m}_ci95"]
            digits = 0 if m.endswith(("seconds", "peak_rss_mb")) else 3
            cells.append("n/a" if pd.isna(mean) else f"{mean:.{digits}f}" + ("" if pd.isna(half) else f" ± {half:.{digits}f}"))
        label = ", ".join(str(r[p]) for p in params) or "all runs"
        lines.append("| " + " | ".join([label, str(r["n_seeds"]), *cells]) + " |")
    return lines


def seed_curves(df: pd.DataFrame, seeds: pd.DataFrame, window: int = 50,
                columns: tuple[str, ...] = CURVE_COLUMNS) -> pd.DataFrame:
    """Mean and interval over seeds, per step, of each job's ``window``-step moving average.

    ``df`` is the :func:`analysis.load_sweep` frame, ``seeds`` a :func:`seed_table`.
    Long format: ``config`` (row of ``seeds``), ``label``, ``n_seeds``, ``metric``,
    ``step``, ``mean``, ``ci95``, ``n``. A column absent or never finite (``gold_score``
    without a gold scorer) is left out. ``n`` drops where a job stopped early; the
    moving average uses ``min_periods=1`` so the curves start at the first step.
    """
    params = list(seeds.attrs.get("varying", seeds.attrs.get("params", [])))
    frames = []
    for i, (_, row) in enumerate(seeds.iterrows()):
        jobs = df[df["run"].isin(row["runs"])]
        for col in columns:
            if col not in jobs.columns:
                continue
            y = pd.to_numeric(jobs[col], errors="coerce").astype(float)
            if not np.isfinite(y.to_numpy()).any():
                continue
            smooth = y.groupby(jobs["run"], sort=False).transform(lambda s: s.rolling(window, min_periods=1).mean())
            wide = pd.DataFrame({"step": jobs["step"], "run": jobs["run"], "v": smooth}).pivot(
                index="step", columns="run", values="v")
            mean, half, n = interval(wide.to_numpy(dtype=float))
            frames.append(pd.DataFrame({"config": i, "label": config_label(row, params), "n_seeds": row["n_seeds"],
                                        "metric": col, "step": wide.index.to_numpy(), "mean": mean, "ci95": half,
                                        "n": n}))
    if not frames:
        return pd.DataFrame(columns=["config", "label", "n_seeds", "metric", "step", "mean", "ci95", "n"])
    return pd.concat(frames, ignore_index=True)
