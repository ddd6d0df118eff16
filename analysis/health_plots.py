"""Run-health and over-optimisation figures (Agg canvas, labels from :data:`analysis.plots.LABELS`).

* :func:`health` -- 2x2: gold vs proxy reward, entropy, response length, clip fraction against step,
  each raw (faint) with its ``window``-step moving average; a missing column is named in its panel.
* :func:`overoptimisation` -- gold and proxy gain against sqrt(KL) from ``eval.csv``, the Gao fit
  and its peak (see :mod:`analysis.overoptimisation`).
* :func:`frontier` -- a sweep's KL-reward frontier: per configuration the mean gain over seeds
  against mean sqrt(KL), with the seeds' min-max band.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .metrics import moving_average
from .overoptimisation import curves, gao_curve
from .plots import _save, _style, decimate

HEALTH_PANELS = (("gold_vs_proxy", ("reward_score", "gold_score"), ("C3", "C2")), ("entropy", ("entropy",), ("C4",)),
                 ("response_length", ("response_length",), ("C1",)), ("clipfrac", ("clipfrac",), ("C0",)))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def health(df: pd.DataFrame, path: str | Path, window: int = 50, lang: str = "en") -> Path:
    """2x2 health panels of one run (see the module docstring)."""
    with _style(lang) as lab:
        fig = Figure(figsize=(15, 10))
        axes = fig.subplots(2, 2)
        fig.suptitle(lab["health_title"].format(w=window), fontsize=16)
        step = df["step"].to_numpy(dtype=float)
        names = {"reward_score": lab["proxy"], "gold_score": lab["gold"]}
        for ax, (title, cols, colors) in zip(axes.ravel(), HEALTH_PANELS):
            ax.set_title(lab[title])
            ax.set_xlabel(lab["step"])
            missing = []
            for col, color in zip(cols, colors):
                if col not in df.columns and f"{col}_seq" in df.columns:  # per response (RLOO's loss)
                    col = f"{col}_seq"
                y = pd.to_numeric(df[col], errors="coerce") if col in df.columns else None
                if y is None or not np.isfinite(y.to_numpy(dtype=float)).any():
                    missing.append(col)
                    continue
                label = names.get(col)
                ax.plot(*decimate(step, y.to_numpy(dtype=float)), color=color, alpha=0.3,
                        label=f"{label} ({lab['raw']})" if label else lab["raw"])
                ax.plot(*decimate(step, moving_average(y, window).to_numpy(dtype=float)), color=color, linewidth=2,
                        label=f"{label} ({lab['ma'].format(w=window)})" if label else lab["ma"].format(w=window))
            if len(missing) == len(cols):
                _note(ax, "\n".join(lab["no_column"].format(c=c) for c in missing))
                continue
            if missing:
                ax.set_title(f"{lab[title]} ({', '.join(lab['no_column'].format(c=c) for c in missing)})")
            ax.legend(fontsize="small")
        fig.tight_layout()
        return _save(fig, path)


def overoptimisation(eval_df: pd.DataFrame, result: dict, path: str | Path, lang: str = "en") -> Path:
    """Gold and proxy gain against ``d = sqrt(KL)``, the fitted gold curve, its peak and the best point."""
    with _style(lang) as lab:
        fig = Figure(figsize=(10, 7))
        ax = fig.subplots()
        c = curves(eval_df)
        d = c["d"].to_numpy()
        for col, color, name in (("gold_gain", "C2", "gold"), ("proxy_gain", "C3", "proxy")):
            y = c[col].to_numpy()
            if np.isfinite(y).any():
                ax.plot(d, y, "o-", color=color, alpha=0.6, markersize=4, label=lab[name])
        alpha, beta = result.get("alpha"), result.get("beta")
        if alpha is not None and beta is not None:
            top = max(np.nanmax(d) if np.isfinite(d).any() else 0.0, np.sqrt(result.get("gold_peak_kl") or 0.0))
            grid = np.linspace(0.0, top * 1.05, 200)
            ax.plot(grid, gao_curve(grid, alpha, beta), "--", color="C2", label=lab["gold_fit"])
        if result.get("gold_peak_kl") is not None:
            ax.axvline(np.sqrt(result["gold_peak_kl"]), color="C2", linestyle=":",
                       label=lab["fit_peak"].format(kl=result["gold_peak_kl"]))
        if result.get("observed_peak_kl") is not None:
            ax.scatter([np.sqrt(max(result["observed_peak_kl"], 0.0))], [result["observed_peak_gain"]], s=120,
                       marker="*", color="C2", zorder=4, label=lab["obs_peak"])
        if not len(ax.lines):
            _note(ax, lab["no_data"])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(lab["oo_title"])
        ax.set_xlabel(lab["sqrt_kl"])
        ax.set_ylabel(lab["gain"])
        if ax.lines:
            ax.legend(fontsize="small")
        fig.tight_layout()
        return _save(fig, path)


def frontier(bands: pd.DataFrame, meta: dict, path: str | Path, lang: str = "en") -> Path:
    """One line per configuration of :func:`analysis.overoptimisation.frontier_bands`, band = seeds' min-max."""
    with _style(lang) as lab:
        fig = Figure(figsize=(10, 7))
        ax = fig.subplots()
        for i, (config, g) in enumerate(bands.groupby("config", sort=True)):
            g = g.sort_values("step")
            color = f"C{i % 10}"
            n = int(g["n"].max())
            ax.plot(g["d"], g["gain"], color=color, linewidth=1.8, marker="o" if len(g) <= 50 else None,
                    markersize=3, label=f"{config} ({lab['n_seeds'].format(n=n)})")
            ax.fill_between(g["d"], g["lo"], g["hi"], color=color, alpha=0.2, linewidth=0)
        if bands.empty:
            _note(ax, lab["no_data"])
        else:
            ax.legend(fontsize="small")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(lab["frontier_title"])
        ax.set_xlabel(lab["sqrt_kl"])
        ax.set_ylabel(lab["gold_gain" if meta.get("kind") == "gold" else "proxy_gain"])
        fig.tight_layout()
        return _save(fig, path)
