"""Run-level metrics over a loaded log (see :func:`analysis.load_run`).

Notation: ``pl, vl, kl, rs`` are the ``policy_loss, value_loss, kl_divergence,
reward_score`` columns in step order, ``n`` the number of rows and ``w`` the window.

Notebook metrics (kept formula-for-formula)::

    policy_loss_reduction_pct = (pl[0] - pl[-1]) / pl[0] * 100
    reward_improvement        = rs[-1] - rs[0]
    training_stability        = 1 / (1 + var(pl))          # sample variance, ddof=1
    policy_loss_ma            = pl.rolling(w).mean()        # likewise reward_score_ma
    final_<col>               = <col>[-1]

Everything is vectorised (numpy/pandas); there is no Python loop over rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .load import METRIC_COLUMNS

MAD_TO_SIGMA = 1.4826  # MAD * 1.4826 estimates the standard deviation of normal noise


def _arr(s: pd.Series) -> np.ndarray:
    return s.to_numpy(dtype=float)


def _f(x) -> float:
    return float(x)


def policy_loss_reduction_pct(df: pd.DataFrame) -> float:
    """``(pl[0] - pl[-1]) / pl[0] * 100`` (inf/NaN when ``pl[0] == 0``)."""
    pl = df["policy_loss"]
    with np.errstate(all="ignore"):
        return _f((pl.iloc[0] - pl.iloc[-1]) / pl.iloc[0] * 100)


def reward_improvement(df: pd.DataFrame) -> float:
    """``rs[-1] - rs[0]``."""
    rs = df["reward_score"]
    return _f(rs.iloc[-1] - rs.iloc[0])


def training_stability(df: pd.DataFrame) -> float:
    """Notebook score ``1 / (1 + pl.var())`` with the sample variance (ddof=1).

    Depends on the units of the loss and penalises a steady decrease as much as
    noise; prefer :func:`stability_score`.
    """
    return _f(1.0 / (1.0 + df["policy_loss"].var()))


def moving_average(s: pd.Series, window: int = 50) -> pd.Series:
    """``s.rolling(window=window).mean()``: NaN for the first ``window - 1`` rows."""
    return s.rolling(window=window).mean()


def relative_noise(s: pd.Series) -> float:
    """Step-to-step noise relative to the mean level, a scale-free roughness.

    ::

        d = diff(x)                       # x = the finite values of s, in order
        relative_noise = std(d) / sqrt(2) / mean(|x|)      # std with ddof=0

    For ``x = trend + e`` with iid noise ``e`` of std ``sigma`` and a linear trend,
    ``std(d) / sqrt(2)`` estimates ``sigma`` (differencing removes the trend), so
    the measure is a coefficient of variation of the noise: unchanged when ``s``
    is multiplied by a constant and 0 for any straight line. NaN with fewer than
    3 finite values or a zero mean level (e.g. a loss that hovers around 0).
    """
    x = _arr(s)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return float("nan")
    level = np.abs(x).mean()
    if level == 0:
        return float("nan")
    return _f(np.diff(x).std() / np.sqrt(2.0) / level)


def stability_score(s: pd.Series) -> float:
    """Scale-free stability in (0, 1]: ``1 / (1 + relative_noise(s))``; 1 = perfectly smooth."""
    return _f(1.0 / (1.0 + relative_noise(s)))


def reward_per_kl(df: pd.DataFrame, window: int = 50) -> float:
    """Reward gained per unit of KL spent, on window-averaged endpoints::

        reward_per_kl = (mean(rs[-w:]) - mean(rs[:w])) / mean(kl[-w:])

    with ``w = min(window, n)``. KL is measured against the frozen reference
    policy, so ``mean(kl[-w:])`` is the divergence the run ended at; averaging
    over ``w`` rows keeps one noisy step from dominating. NaN when that final KL
    is not positive. Non-finite values are ignored in the means.
    """
    w = min(window, len(df))
    rs, kl = _arr(df["reward_score"]), _arr(df["kl_divergence"])
    end_kl = _finite_mean(kl[-w:])
    if not end_kl > 0:
        return float("nan")
    return _f((_finite_mean(rs[-w:]) - _finite_mean(rs[:w])) / end_kl)


def _finite_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return _f(x.mean()) if x.size else float("nan")


def trend(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and its t statistic ``slope / se(slope)``.

    ::

        slope = sum((x - x̄)(y - ȳ)) / sum((x - x̄)^2)
        se    = sqrt(sum(resid^2) / (n - 2) / sum((x - x̄)^2))

    Non-finite pairs are dropped; ``(nan, nan)`` with fewer than 3 points. A
    perfect fit (se == 0) gives t = ±inf (0 for a flat line).
    """
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return float("nan"), float("nan")
    xc = x - x.mean()
    sxx = (xc * xc).sum()
    if sxx == 0:
        return float("nan"), float("nan")
    yc = y - y.mean()
    slope = (xc * yc).sum() / sxx
    resid = yc - slope * xc
    se = np.sqrt((resid * resid).sum() / (x.size - 2) / sxx)
    if se <= 1e-12 * max(abs(slope), 1e-300):
        return _f(slope), (0.0 if slope == 0 else _f(np.sign(slope) * np.inf))
    return _f(slope), _f(slope / se)


def collapse_trend(df: pd.DataFrame, window: int = 50, t_crit: float = 2.0) -> dict:
    """Reward falling while KL climbs over the last ``window`` rows.

    Fits :func:`trend` of ``rs`` and of ``kl`` on ``step`` over the last ``window``
    rows and flags ``collapse_suspected = t(rs) <= -t_crit and t(kl) >= t_crit``:
    both trends must be clear of the noise (|t| >= 2 is roughly 95 % for
    independent noise), not just a dip.
    """
    tail = df.iloc[-window:]
    step = _arr(tail["step"])
    r_slope, r_t = trend(step, _arr(tail["reward_score"]))
    k_slope, k_t = trend(step, _arr(tail["kl_divergence"]))
    return {
        "reward_slope_last_window": r_slope,
        "kl_slope_last_window": k_slope,
        "reward_trend_t": r_t,
        "kl_trend_t": k_t,
        "collapse_suspected": bool(r_t <= -t_crit and k_t >= t_crit),
    }


def kl_spikes(df: pd.DataFrame) -> np.ndarray:
    """Boolean mask of KL spikes: the health alarms' one rule (:func:`analysis.alarms.kl_spike_mask`):
    KL far above the trailing window's median, in the run's own spread and as a multiple of that
    median, falling back at the next row. The alarm fires at the first; the report counts them all."""
    from .alarms import kl_spike_mask

    return kl_spike_mask(_arr(df["kl_divergence"]))


def nonfinite_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{column: {"nan": count, "inf": count}}`` for the four metric columns."""
    out = {}
    for col in METRIC_COLUMNS:
        x = _arr(df[col])
        out[col] = {"nan": int(np.isnan(x).sum()), "inf": int(np.isinf(x).sum())}
    return out


def compute_metrics(df: pd.DataFrame, window: int = 50, t_crit: float = 2.0) -> dict:
    """All run metrics as a flat dict of Python scalars (see the module docstring).

    Besides the notebook numbers and final values: ``final_policy_loss_ma`` /
    ``final_reward_score_ma`` (last value of the ``window`` moving average, NaN
    when the run is shorter than ``window``), ``policy_loss_relative_noise``,
    ``policy_loss_stability`` and ``reward_stability`` (:func:`stability_score`),
    ``reward_per_kl``, ``max_kl_divergence``, the :func:`collapse_trend` keys,
    ``kl_spike_count`` (:func:`kl_spikes`), ``nan_count`` / ``inf_count`` over the
    metric columns and ``first_nonfinite_step`` (None if all finite).
    """
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise AnalysisError(f"window must be a positive integer, got {window!r}")
    if len(df) == 0:
        raise AnalysisError(f"{df.attrs.get('source', 'log')}: no rows to analyse")
    pl, rs = df["policy_loss"], df["reward_score"]
    m: dict = {
        "num_steps": int(len(df)),
        "first_step": df["step"].iloc[0].item(),
        "last_step": df["step"].iloc[-1].item(),
        "window": int(window),
        "policy_loss_reduction_pct": policy_loss_reduction_pct(df),
        "reward_improvement": reward_improvement(df),
        "training_stability": training_stability(df),
    }
    for col in METRIC_COLUMNS:
        m[f"final_{col}"] = _f(df[col].iloc[-1])
    m["final_policy_loss_ma"] = _f(moving_average(pl, window).iloc[-1])
    m["final_reward_score_ma"] = _f(moving_average(rs, window).iloc[-1])
    if "learning_rate" in df.columns:
        m["final_learning_rate"] = _f(df["learning_rate"].iloc[-1])
    m["policy_loss_relative_noise"] = relative_noise(pl)
    m["policy_loss_stability"] = stability_score(pl)
    m["reward_stability"] = stability_score(rs)
    m["reward_per_kl"] = reward_per_kl(df, window)
    kl = _arr(df["kl_divergence"])
    m["max_kl_divergence"] = _f(np.nanmax(np.where(np.isfinite(kl), kl, np.nan))) if np.isfinite(kl).any() else float("nan")
    m.update(collapse_trend(df, window, t_crit))
    m["kl_spike_count"] = int(kl_spikes(df).sum())
    values = df[list(METRIC_COLUMNS)].to_numpy(dtype=float)
    # A column with no number at all was not logged (GRPO/RLOO have no value loss, DPO no sampled KL):
    # absent, not NaN. NaNs in a column that holds numbers elsewhere are faults.
    values = values[:, ~np.isnan(values).all(axis=0)]
    m["nan_count"] = int(np.isnan(values).sum())
    m["inf_count"] = int(np.isinf(values).sum())
    bad_rows = ~np.isfinite(values).all(axis=1)
    m["first_nonfinite_step"] = df["step"].iloc[int(bad_rows.argmax())].item() if bad_rows.any() else None
    return m


def metric_warnings(m: dict) -> list[str]:
    """Human-readable warnings for a :func:`compute_metrics` result."""
    out = []
    if m["nan_count"] or m["inf_count"]:
        out.append(
            f"{m['nan_count']} NaN and {m['inf_count']} inf value(s) in the metric columns, "
            f"first at step {m['first_nonfinite_step']}"
        )
    if m["collapse_suspected"]:
        out.append(
            f"possible collapse: over the last {m['window']} steps reward falls "
            f"(t={m['reward_trend_t']:.3g}) while KL climbs (t={m['kl_trend_t']:.3g})"
        )
    if m["kl_spike_count"]:
        out.append(f"{m['kl_spike_count']} KL spike(s) (the kl_spike alarm's rule: far above the trailing median, then back)")
    if m["num_steps"] < m["window"]:
        out.append(f"run has {m['num_steps']} steps, fewer than the {m['window']}-step window: moving averages are NaN")
    return out
