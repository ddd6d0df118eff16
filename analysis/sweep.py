"""Per-run metrics for a Hydra sweep and a ranking by an objective under a KL bound.

Default objective: maximise ``final_reward_score`` among runs with
``final_kl_divergence <= max_kl`` (no bound when ``max_kl`` is None). Runs that
break the bound, or whose objective is NaN/inf, are kept in the table with
``eligible = False`` and no rank, listed after the ranked ones.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .metrics import compute_metrics, metric_warnings


def sweep_table(df: pd.DataFrame, window: int = 50) -> pd.DataFrame:
    """One row per run of a :func:`analysis.load_sweep` frame: ``run``, the override
    parameters, then every :func:`analysis.compute_metrics` key.

    ``table.attrs``: ``params`` (override columns), ``warnings`` ({run: [loader
    and metric warnings]}) and ``failed_jobs`` (copied from the sweep frame).
    """
    params = list(df.attrs.get("override_keys", []))
    load_warnings = df.attrs.get("run_warnings", {})
    rows, warnings = [], {}
    for run, g in df.groupby("run", sort=False):
        m = compute_metrics(g.reset_index(drop=True), window)
        rows.append({"run": run, **{k: g[k].iloc[0] for k in params}, **m})
        warnings[run] = list(load_warnings.get(run, [])) + metric_warnings(m)
    table = pd.DataFrame(rows)
    table.attrs = {"params": params, "warnings": warnings, "failed_jobs": dict(df.attrs.get("failed_jobs", {}))}
    return table


def varying_params(table: pd.DataFrame) -> list[str]:
    """Override columns that take more than one value across the runs."""
    return [p for p in table.attrs.get("params", []) if table[p].astype(str).nunique() > 1]


def rank_runs(
    table: pd.DataFrame,
    objective: str = "final_reward_score",
    max_kl: float | None = None,
    maximize: bool = True,
) -> pd.DataFrame:
    """Sort ``table`` best first and add ``eligible`` (bool) and ``rank`` (1.., NA if not eligible).

    ``eligible = isfinite(objective) and (max_kl is None or final_kl_divergence <= max_kl)``.
    """
    if objective not in table.columns:
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        raise AnalysisError(f"unknown objective {objective!r}; choose one of {', '.join(numeric)}")
    score = pd.to_numeric(table[objective], errors="coerce").astype(float)
    eligible = np.isfinite(score.to_numpy())
    if max_kl is not None:
        eligible &= (table["final_kl_divergence"].astype(float) <= max_kl).to_numpy()
    out = table.assign(eligible=eligible, _score=score if maximize else -score)
    out = out.sort_values(["eligible", "_score"], ascending=[False, False], na_position="last", kind="stable")
    rank = out["eligible"].cumsum().astype("Int64")
    out["rank"] = rank.where(out["eligible"].to_numpy(), pd.NA)
    out = out.drop(columns="_score").reset_index(drop=True)
    out.attrs = dict(table.attrs, objective=objective, max_kl=max_kl, maximize=maximize)
    cols = ["rank", "run", "eligible"] + [c for c in out.columns if c not in ("rank", "run", "eligible")]
    return out[cols]
