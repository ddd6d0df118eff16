"""Reward-model over-optimisation from held-out evaluation (``<stage>/eval.csv``).

Gao, Schulman & Hilton 2023, "Scaling Laws for Reward Model Overoptimization", RL form::

    R(d) = d (alpha - beta ln d),     d = sqrt(KL)   # KL to the reference, summed per response, nats

``R`` is the gold reward gained over the start policy (the step-0 evaluation), so ``R(0) = 0``
and the fit has no intercept: :func:`fit_gao` solves the linear least squares
``gain ~ alpha d - beta d ln d`` over the points with ``d > 0``. For ``beta > 0`` the curve peaks
where ``dR/dd = alpha - beta ln d - beta = 0``::

    d* = exp(alpha / beta - 1),   KL* = d*^2,   R(d*) = beta d*

Past ``d*`` optimising the proxy (the reward model) further loses true reward. A run is judged
``past_peak`` when its last evaluation is beyond the upper end of the 95% interval of ``d*`` or
when its gold gain has fallen from the best seen by more than ``noise_k`` times the fit's residual
SD (both sides as trailing means over 3 evaluations, so one lucky point does not count as the peak).

The analysis needs the first evaluation at the reference (KL near 0, ``analysis.load.START_KL_MAX``):
a stage trained from the base model and compared with the SFT policy (ORPO) starts tens of nats
away, and its gains from there are learning, not over-optimisation; it is skipped, saying so.
The fit needs ``MIN_FIT_POINTS`` evaluations with ``KL > 0`` (besides the baseline): a two-parameter
curve through two or three points is exact whatever the data, so with fewer the fit, the peak and
``past_peak`` are None with the reason in ``skipped``, never a guess. Its uncertainty: standard
errors of ``alpha`` and ``beta`` from the least-squares covariance, and a 95% interval of ``KL*``
from that of ``ln d* = alpha / beta - 1`` (delta method, Student t with n - 2 degrees of freedom).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .load import run_algo, start_off_reference

SMOOTH_POINTS = 3  # evaluations per trailing mean when judging a decline from the peak
MIN_FIT_POINTS = 5  # evaluations with KL > 0 the fit needs: 3 residual degrees of freedom for its noise


def gao_curve(d, alpha: float, beta: float) -> np.ndarray:
    """``R(d) = d (alpha - beta ln d)``, with ``R(0) = 0``."""
    d = np.asarray(d, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def fit_gao(d, r) -> tuple[float, float]:
    """``(alpha, beta)`` of :func:`gao_curve` by least squares on the points with ``d > 0``.

    ``r`` is the gain over the start policy (step 0), so the curve goes through the origin.
    NaN for both when fewer than 2 usable points or the two regressors are collinear.
    """
    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    ok = np.isfinite(d) & np.isfinite(r) & (d > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    x = np.column_stack([d[ok], -d[ok] * np.log(d[ok])])
    coef, _res, rank, _sv = np.linalg.lstsq(x, r[ok], rcond=None)
    if rank < 2:
        return float("nan"), float("nan")
    return float(coef[0]), float(coef[1])


def peak_d(alpha: float, beta: float) -> float | None:
    """``d* = exp(alpha / beta - 1)`` for ``beta > 0``; None otherwise (no interior maximum)."""
    if not (math.isfinite(alpha) and math.isfinite(beta)) or beta <= 0:
        return None
    z = alpha / beta - 1.0
    return math.exp(z) if z < 700 else None  # beyond float range: no peak within reach


def curves(eval_df: pd.DataFrame) -> pd.DataFrame:
    """``step, kl, d, proxy_gain, gold_gain`` per evaluation; gains relative to the first row
    (the start policy). ``gold_gain`` is NaN throughout without gold values."""
    kl = pd.to_numeric(eval_df["kl"], errors="coerce").to_numpy(dtype=float)
    out = pd.DataFrame({"step": eval_df["step"].to_numpy(), "kl": kl, "d": np.sqrt(np.clip(kl, 0.0, None))})
    for col, name in (("reward", "proxy_gain"), ("gold", "gold_gain")):
        x = (pd.to_numeric(eval_df[col], errors="coerce").to_numpy(dtype=float) if col in eval_df.columns
             else np.full(len(eval_df), np.nan))
        out[name] = x - x[0] if len(x) else x
    return out


def _residual_sd(d: np.ndarray, r: np.ndarray, alpha: float, beta: float) -> float:
    ok = np.isfinite(d) & np.isfinite(r) & (d > 0)
    if ok.sum() <= 2 or not math.isfinite(alpha):
        return float("nan")
    resid = r[ok] - gao_curve(d[ok], alpha, beta)
    return float(np.sqrt((resid ** 2).sum() / (ok.sum() - 2)))


def fit_uncertainty(d, r, alpha: float, beta: float, level: float = 0.95) -> dict:
    """``alpha_se``, ``beta_se`` (least-squares standard errors) and ``gold_peak_kl_ci`` ([lo, hi] of
    KL*, None without a peak or with a degenerate fit) at ``level``; see the module docstring."""
    from scipy.stats import t as student_t

    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    ok = np.isfinite(d) & np.isfinite(r) & (d > 0)
    out = {"alpha_se": None, "beta_se": None, "gold_peak_kl_ci": None}
    noise = _residual_sd(d, r, alpha, beta)
    if not math.isfinite(noise):
        return out
    x = np.column_stack([d[ok], -d[ok] * np.log(d[ok])])
    try:
        cov = noise ** 2 * np.linalg.inv(x.T @ x)
    except np.linalg.LinAlgError:
        return out
    out.update(alpha_se=_num(math.sqrt(cov[0, 0])), beta_se=_num(math.sqrt(cov[1, 1])))
    if peak_d(alpha, beta) is None:
        return out
    grad = np.array([1.0 / beta, -alpha / beta ** 2])  # of z = ln d* = alpha / beta - 1
    se_z = math.sqrt(max(float(grad @ cov @ grad), 0.0))
    half = float(student_t.ppf((1 + level) / 2, ok.sum() - 2)) * se_z
    z = alpha / beta - 1.0
    out["gold_peak_kl_ci"] = [math.exp(min(2 * (z - half), 700)), math.exp(min(2 * (z + half), 700))]
    return out


def _kl(d: float | None) -> float | None:
    return None if d is None else d * d


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def analyse(eval_df: pd.DataFrame, noise_k: float = 2.0) -> dict:
    """Over-optimisation summary of one run's evaluations (module docstring for the formulas).

    Keys: ``n_points``, ``baseline_step``, ``final_step``, ``final_kl``; the gold fit ``alpha``,
    ``beta``, ``gold_peak_kl`` (KL at ``d*``, None without a peak), ``gold_peak_gain``, ``gold_noise``
    (residual SD); the best evaluation ``observed_peak_kl``, ``observed_peak_step``,
    ``observed_peak_gain``; ``gold_gain_end``, ``proxy_gain_end``, ``proxy_gold_gap_end`` (proxy
    gain minus gold gain at the last point); ``past_peak`` (bool) and ``past_peak_reason``; the same
    fit of the proxy, ``proxy_alpha``, ``proxy_beta``, ``proxy_peak_kl``; and ``skipped`` (one
    line per part that could not be computed, saying why). Missing values are None.
    """
    c = curves(eval_df)
    d, gold, proxy = c["d"].to_numpy(), c["gold_gain"].to_numpy(), c["proxy_gain"].to_numpy()
    out: dict = {"n_points": int(len(c)), "baseline_step": c["step"].iloc[0].item() if len(c) else None,
                 "final_step": c["step"].iloc[-1].item() if len(c) else None,
                 "final_kl": _num(c["kl"].iloc[-1]) if len(c) else None}
    keys = ("alpha", "beta", "alpha_se", "beta_se", "gold_peak_kl", "gold_peak_kl_ci", "gold_peak_gain", "gold_noise",
            "observed_peak_kl", "observed_peak_step", "observed_peak_gain", "gold_gain_end", "proxy_gain_end",
            "proxy_gold_gap_end", "past_peak", "past_peak_reason", "proxy_alpha", "proxy_beta", "proxy_peak_kl")
    out.update(dict.fromkeys(keys))
    skipped: list[str] = []
    out["skipped"] = skipped
    off = start_off_reference(eval_df)
    if off:  # R(0) = 0 at the reference: gains from elsewhere are learning, not over-optimisation
        skipped.append(f"over-optimisation skipped: {off}")
        return out
    n_fit = int((np.isfinite(d) & (d > 0)).sum())
    enough = n_fit >= MIN_FIT_POINTS
    if not enough:
        skipped.append(f"over-optimisation fit skipped: {n_fit} evaluation(s) with KL > 0, the fit needs "
                       f">= {MIN_FIT_POINTS} (a two-parameter curve through fewer is exact, not evidence); "
                       "gold_peak_kl and past_peak stay empty: evaluate more often (eval.eval_every)")
    if np.isfinite(proxy).any() and enough:
        pa, pb = fit_gao(d, proxy)
        out.update(proxy_alpha=_num(pa), proxy_beta=_num(pb), proxy_peak_kl=_kl(peak_d(pa, pb)),
                   proxy_gain_end=_num(proxy[-1]))
    if "gold" not in eval_df.columns or not np.isfinite(gold).any():
        why = "no gold column" if "gold" not in eval_df.columns else "gold column is empty"
        skipped.append(f"gold over-optimisation skipped: eval.csv has {why} (no known true reward); "
                       "proxy gain against sqrt(KL) only")
        return out
    if not np.isfinite(gold[0]) and len(gold):
        skipped.append(f"gold over-optimisation skipped: no gold value at the first evaluation "
                       f"(step {out['baseline_step']}), so gains have no baseline")
        return out
    best = int(np.nanargmax(gold))
    out.update(observed_peak_kl=_num(c["kl"].iloc[best]), observed_peak_step=c["step"].iloc[best].item(),
               observed_peak_gain=_num(gold[best]), gold_gain_end=_num(gold[-1]),
               proxy_gold_gap_end=_num(proxy[-1] - gold[-1]))
    if not enough:
        return out
    alpha, beta = fit_gao(d, gold)
    ds = peak_d(alpha, beta)
    noise = _residual_sd(d, gold, alpha, beta)
    unc = fit_uncertainty(d, gold, alpha, beta)
    out.update(alpha=_num(alpha), beta=_num(beta), gold_peak_kl=_kl(ds),
               gold_peak_gain=None if ds is None else _num(beta * ds), gold_noise=_num(noise), **unc)
    smooth = pd.Series(gold).rolling(SMOOTH_POINTS, min_periods=1).mean().to_numpy()
    drop = float(np.nanmax(smooth) - smooth[-1]) if np.isfinite(smooth[-1]) else float("nan")
    declined = math.isfinite(noise) and drop > noise_k * noise
    ci = unc["gold_peak_kl_ci"]
    beyond = ci is not None and math.isfinite(d[-1]) and d[-1] > math.sqrt(ci[1])
    out["past_peak"] = bool(declined or beyond)
    reasons = []
    if declined:
        reasons.append(f"gold gain at the end {drop:.3g} below its best (> {noise_k:g} x noise {noise:.3g})")
    if beyond:
        reasons.append(f"final sqrt(KL) {d[-1]:.3g} beyond the fitted peak d* = {ds:.3g} "
                       f"(95% interval up to {math.sqrt(ci[1]):.3g})")
    out["past_peak_reason"] = "; ".join(reasons) or "gold still near its best and final sqrt(KL) not beyond d*"
    return out


# --------------------------------------------------------------------------- sweeps: the KL-reward frontier


def frontier_curve(eval_df: pd.DataFrame | None, log_df: pd.DataFrame | None, kind: str,
                   window: int = 50) -> pd.DataFrame | None:
    """``step, d, gain`` of one run for ``kind`` 'gold' or 'proxy': from ``eval.csv`` when given,
    else from the training log (``window``-step trailing means of KL and score, gains relative to
    the first row). None when the run has no such values."""
    if eval_df is not None and len(eval_df):
        if start_off_reference(eval_df):
            return None
        c = curves(eval_df)
        gain = c["gold_gain" if kind == "gold" else "proxy_gain"]
        return c.assign(gain=gain)[["step", "d", "gain"]] if np.isfinite(gain.to_numpy()).any() else None
    col = "gold_score" if kind == "gold" else "reward_score"
    if log_df is None or col not in log_df.columns or "kl_divergence" not in log_df.columns:
        return None
    kl = pd.to_numeric(log_df["kl_divergence"], errors="coerce").rolling(window, min_periods=1).mean()
    y = pd.to_numeric(log_df[col], errors="coerce").rolling(window, min_periods=1).mean()
    if not (np.isfinite(kl.to_numpy()).any() and np.isfinite(y.to_numpy()).any()):
        return None
    return pd.DataFrame({"step": log_df["step"].to_numpy(), "d": np.sqrt(kl.clip(lower=0.0)).to_numpy(),
                         "gain": (y - y.iloc[0]).to_numpy()})


def frontier_groups(runs: list[str], params: pd.DataFrame, seed_param: str | None, sweep_dir) -> dict[str, str]:
    """``{run: label}``: one label per configuration, i.e. the overrides other than the seed that
    vary, led by the algorithm (root ``algo`` of each job's config.yaml) when that differs."""
    algos = {r: run_algo(Path(sweep_dir) / str(r)) for r in runs}
    cols = [p for p in params.columns if p != seed_param and params[p].astype(str).nunique() > 1]
    out = {}
    for r in runs:
        row = params.loc[r]
        parts = [f"{p}={row[p]}" for p in cols]
        if len(set(algos.values())) > 1 and not any(p.split(".")[-1] == "algo" for p in cols):
            parts.insert(0, f"algo={algos[r]}")
        out[r] = ", ".join(parts) or "all runs"
    return out


def frontier_bands(run_curves: dict[str, pd.DataFrame], groups: dict[str, str]) -> pd.DataFrame:
    """Per configuration and evaluation step, over its seeds: ``d`` (mean sqrt(KL)), ``gain`` (mean),
    ``lo``/``hi`` (min/max gain) and ``n``. Seeds share the evaluation schedule, so steps align them."""
    frames = [c.assign(config=groups[r], run=r) for r, c in run_curves.items() if c is not None]
    if not frames:
        return pd.DataFrame(columns=["config", "step", "d", "gain", "lo", "hi", "n"])
    long = pd.concat(frames, ignore_index=True)
    g = long.groupby(["config", "step"], sort=True)
    out = g.agg(d=("d", "mean"), gain=("gain", "mean"), lo=("gain", "min"), hi=("gain", "max"), n=("run", "nunique"))
    return out.reset_index()


def sweep_frontier(runs: dict[str, tuple[pd.DataFrame | None, pd.DataFrame]], groups: dict[str, str],
                   window: int = 50) -> tuple[pd.DataFrame, dict]:
    """:func:`frontier_bands` of every run (``{run: (eval_df or None, log_df)}``) and
    ``{"kind": "gold"|"proxy", "source": "eval"|"log"|"mixed", "skipped": [...]}``.

    Gold when every run that has a curve has gold values, else the proxy for all, so that the
    configurations are compared on one scale."""
    skipped = []
    kind = "gold"
    curves_ = {r: frontier_curve(e, lg, "gold", window) for r, (e, lg) in runs.items()}
    if any(c is None for c in curves_.values()):
        proxy = {r: frontier_curve(e, lg, "proxy", window) for r, (e, lg) in runs.items()}
        if sum(c is not None for c in proxy.values()) > sum(c is not None for c in curves_.values()):
            kind, curves_ = "proxy", proxy
            skipped.append("frontier: some runs have no gold values, proxy (reward-model) gain shown for all")
    missing_eval = [r for r, (e, _) in runs.items() if e is None]
    if missing_eval:
        skipped.append(f"frontier: no eval.csv for run(s) {', '.join(map(str, missing_eval))}; their curve is the "
                       f"training log's {window}-step moving average")
    off = [r for r, (e, _) in runs.items() if e is not None and len(e) and start_off_reference(e)]
    if off:
        skipped.append(f"frontier skipped for run(s) {', '.join(map(str, off))}: their first evaluation is away "
                       "from the reference (trained from the base model), so there is no start to measure gains from")
    none = [r for r, c in curves_.items() if c is None and r not in off]
    if none:
        skipped.append(f"frontier skipped for run(s) {', '.join(map(str, none))}: no KL and {kind} values")
    source = "log" if len(missing_eval) == len(runs) else "eval" if not missing_eval else "mixed"
    return frontier_bands(curves_, groups), {"kind": kind, "source": source, "skipped": skipped}
