"""Figures for a run and for a sweep, rendered with matplotlib's Agg canvas (no pyplot, no GUI).

* :func:`dashboard` -- 2x2: policy loss, value loss, KL divergence (spikes marked), reward vs step.
* :func:`moving_average_figure` -- 1x2: raw policy loss / reward (alpha 0.3) + ``window``-step moving average.
* :func:`sweep_reward_vs_kl` -- one smoothed reward-vs-KL trajectory per run, final point marked.
* :func:`sweep_final_reward` -- final reward against each hyperparameter that varies.
* :func:`seed_bands` -- per metric, the mean over seeds per step with its confidence band, one per configuration.

``lang="en"`` (default) uses English labels, ``lang="zh"`` the notebook's Chinese
ones with a CJK font (:func:`analysis.fonts.find_cjk_font`, which raises if none is
installed). Series longer than ``MAX_POINTS`` are drawn as per-bucket min/max
envelopes, which keeps spikes visible and the rendering fast.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import AnalysisError
from .fonts import find_cjk_font
from .metrics import kl_spikes

MAX_POINTS = 4000
LABELS = {
    "en": {
        "title": "RLHF Training Dashboard", "policy_loss": "Policy Loss", "value_loss": "Value Loss",
        "kl_divergence": "KL Divergence", "reward_score": "Reward Score", "step": "Training step",
        "loss": "Loss", "kl": "KL divergence", "reward": "Reward", "pl_trend": "Policy loss trend",
        "rs_trend": "Reward score trend", "raw": "Raw", "ma": "{w}-step moving average", "spike": "KL spike",
        "rvk_title": "Reward vs KL per run ({w}-step moving average)", "final_title": "Final reward by hyperparameter",
        "final_reward": "Final reward", "run": "Run", "over_kl": "over KL bound", "gold_score": "Gold Score",
        "seeds_title": "Mean over seeds with 95% confidence band ({w}-step moving average of each run)",
        "n_seeds": "{n} seeds",
        "health_title": "Run health ({w}-step moving average)", "gold_vs_proxy": "Gold vs proxy reward",
        "entropy": "Entropy (summed per response)", "response_length": "Response length (tokens)",
        "clipfrac": "Clip fraction", "proxy": "Proxy (reward model)", "gold": "Gold", "no_column": "no {c} column",
        "oo_title": "Over-optimisation: gain over the start policy", "sqrt_kl": "sqrt(KL to reference)",
        "gain": "Gain over start", "gold_fit": "Gao fit: d (α - β ln d)", "fit_peak": "fitted peak, KL = {kl:.3g}",
        "obs_peak": "best evaluation", "frontier_title": "KL-reward frontier (mean over seeds, min-max band)",
        "gold_gain": "Gold reward gain", "proxy_gain": "Proxy reward gain", "no_data": "no data to draw",
    },
    "zh": {
        "title": "RLHF 训练监控面板", "policy_loss": "策略损失 (Policy Loss)", "value_loss": "价值损失 (Value Loss)",
        "kl_divergence": "KL散度 (KL Divergence)", "reward_score": "奖励分数 (Reward Score)", "step": "训练步数",
        "loss": "损失值", "kl": "KL散度", "reward": "奖励分数", "pl_trend": "策略损失趋势",
        "rs_trend": "奖励分数趋势", "raw": "原始数据", "ma": "{w}步移动平均", "spike": "KL尖峰",
        "rvk_title": "各运行的奖励分数与KL散度 ({w}步移动平均)", "final_title": "最终奖励与超参数",
        "final_reward": "最终奖励", "run": "运行", "over_kl": "超出KL上限", "gold_score": "金标准分数 (Gold Score)",
        "seeds_title": "多个随机种子的均值与95%置信带 (每次运行的{w}步移动平均)",
        "n_seeds": "{n}个种子",
        "health_title": "运行健康状况 ({w}步移动平均)", "gold_vs_proxy": "金标准奖励与代理奖励",
        "entropy": "熵 (每个回复求和)", "response_length": "回复长度 (词元)", "clipfrac": "裁剪比例",
        "proxy": "代理奖励 (奖励模型)", "gold": "金标准", "no_column": "缺少 {c} 列",
        "oo_title": "过度优化: 相对初始策略的增益", "sqrt_kl": "sqrt(与参考策略的KL)", "gain": "相对初始的增益",
        "gold_fit": "Gao 拟合: d (alpha - beta ln d)", "fit_peak": "拟合峰值, KL = {kl:.3g}", "obs_peak": "最佳评估点",
        "frontier_title": "KL-奖励前沿 (多个种子的均值, 最小-最大带)", "gold_gain": "金标准奖励增益",
        "proxy_gain": "代理奖励增益", "no_data": "没有可绘制的数据",
    },
}


def labels(lang: str) -> dict[str, str]:
    """Label strings for ``lang`` ('en' or 'zh')."""
    if lang not in LABELS:
        raise AnalysisError(f"unknown lang {lang!r}; use one of {', '.join(LABELS)}")
    return LABELS[lang]


def check_lang(lang: str) -> None:
    """Fail early (before loading anything) on an unknown ``lang`` or, for 'zh', a missing CJK font."""
    lab = labels(lang)
    if lang == "zh":
        find_cjk_font("".join(lab.values()))


@contextmanager
def _style(lang: str):
    """rcParams for ``lang``: a CJK font first in the fallback list for 'zh'."""
    lab = labels(lang)
    rc = {"axes.grid": True, "grid.alpha": 0.3}
    if lang == "zh":
        family = find_cjk_font("".join(lab.values()))
        # explicit family names (not the generic "sans-serif") so matplotlib falls back per glyph:
        # some CJK fonts (Droid Sans Fallback) have no Latin letters or digits
        rc.update({"font.family": [family, "DejaVu Sans"], "axes.unicode_minus": False})
    with matplotlib.rc_context(rc):
        yield lab


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Downsample to about ``max_points`` points: min and max of each equal-size bucket.

    Non-finite ``y`` becomes NaN (a gap in the line) and is ignored by the bucket min/max.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    y = np.where(np.isfinite(y), y, np.nan)
    if y.size <= max_points:
        return x, y
    starts = np.linspace(0, y.size, max_points // 2, endpoint=False).astype(int)
    with np.errstate(invalid="ignore"):
        lo, hi = np.fmin.reduceat(y, starts), np.fmax.reduceat(y, starts)
    ends = np.append(starts[1:], y.size) - 1
    xs = np.column_stack([x[starts], x[(starts + ends) // 2]]).ravel()
    return xs, np.column_stack([lo, hi]).ravel()


def dashboard(df: pd.DataFrame, path: str | Path, lang: str = "en", window: int = 50) -> Path:
    """2x2 panels of policy loss, value loss, KL divergence and reward score against step."""
    with _style(lang) as lab:
        fig = Figure(figsize=(15, 10))
        axes = fig.subplots(2, 2)
        fig.suptitle(lab["title"], fontsize=16)
        panels = (("policy_loss", "loss", "C0"), ("value_loss", "loss", "C1"),
                  ("kl_divergence", "kl", "C2"), ("reward_score", "reward", "C3"))
        step = df["step"].to_numpy(dtype=float)
        for ax, (col, ylab, color) in zip(axes.ravel(), panels):
            ax.plot(*decimate(step, df[col].to_numpy(dtype=float)), color=color, linewidth=1)
            ax.set_title(lab[col])
            ax.set_xlabel(lab["step"])
            ax.set_ylabel(lab[ylab])
        spikes = kl_spikes(df)
        if spikes.any():
            ax = axes[1, 0]
            idx = np.flatnonzero(spikes)[:MAX_POINTS]
            ax.scatter(step[idx], df["kl_divergence"].to_numpy(dtype=float)[idx], color="red", marker="x",
                       zorder=3, label=lab["spike"])
            ax.legend()
        fig.tight_layout()
        return _save(fig, path)


def moving_average_figure(df: pd.DataFrame, path: str | Path, window: int = 50, lang: str = "en") -> Path:
    """1x2: raw policy loss and reward score (alpha 0.3) with their ``window``-step moving average."""
    with _style(lang) as lab:
        fig = Figure(figsize=(15, 5))
        axes = fig.subplots(1, 2)
        step = df["step"].to_numpy(dtype=float)
        for ax, col, title, ylab, color in ((axes[0], "policy_loss", "pl_trend", "loss", "C0"),
                                            (axes[1], "reward_score", "rs_trend", "reward", "C3")):
            ax.plot(*decimate(step, df[col].to_numpy(dtype=float)), color=color, alpha=0.3, label=lab["raw"])
            ma = df[col].rolling(window=window).mean().to_numpy(dtype=float)
            ax.plot(*decimate(step, ma), color=color, linewidth=2, label=lab["ma"].format(w=window))
            ax.set_title(lab[title])
            ax.set_xlabel(lab["step"])
            ax.set_ylabel(lab[ylab])
            ax.legend()
        fig.tight_layout()
        return _save(fig, path)


def _run_label(table: pd.DataFrame | None, run: str, params: list[str]) -> str:
    if table is None or not params:
        return str(run)
    row = table.loc[table["run"] == run]
    if row.empty:
        return str(run)
    return f"{run}: " + ", ".join(f"{p}={row.iloc[0][p]}" for p in params)


def sweep_reward_vs_kl(df: pd.DataFrame, path: str | Path, window: int = 50, lang: str = "en",
                       table: pd.DataFrame | None = None, params: list[str] | None = None) -> Path:
    """Reward against KL per run (both smoothed by a ``window`` moving average, min_periods=1)."""
    with _style(lang) as lab:
        fig = Figure(figsize=(10, 7))
        ax = fig.subplots()
        for i, (run, g) in enumerate(df.groupby("run", sort=False)):
            kl = g["kl_divergence"].rolling(window, min_periods=1).mean().to_numpy(dtype=float)
            rs = g["reward_score"].rolling(window, min_periods=1).mean().to_numpy(dtype=float)
            ok = np.isfinite(kl) & np.isfinite(rs)
            kl, rs = kl[ok], rs[ok]
            if len(kl) > MAX_POINTS:
                keep = np.linspace(0, len(kl) - 1, MAX_POINTS).astype(int)
                kl, rs = kl[keep], rs[keep]
            color = f"C{i % 10}"
            ax.plot(kl, rs, color=color, linewidth=1.2, label=_run_label(table, run, params or []))
            if len(kl):
                ax.scatter(kl[-1:], rs[-1:], color=color, zorder=3)
        ax.set_title(lab["rvk_title"].format(w=window))
        ax.set_xlabel(lab["kl"])
        ax.set_ylabel(lab["reward"])
        ax.legend(fontsize="small")
        fig.tight_layout()
        return _save(fig, path)


def sweep_final_reward(table: pd.DataFrame, path: str | Path, params: list[str], lang: str = "en") -> Path:
    """Final reward against each of ``params`` (one panel each); a bar per run when ``params`` is empty.

    Runs with ``eligible == False`` (over the KL bound) are drawn as grey crosses.
    """
    with _style(lang) as lab:
        n = max(1, len(params))
        fig = Figure(figsize=(5 * min(n, 3), 4 * ((n + 2) // 3)))
        axes = np.atleast_1d(fig.subplots((n + 2) // 3, min(n, 3))).ravel()
        y = table["final_reward_score"].to_numpy(dtype=float)
        ok = table["eligible"].to_numpy(dtype=bool) if "eligible" in table else np.ones(len(table), bool)
        if not params:
            ax = axes[0]
            ax.bar(table["run"].astype(str), y, color=np.where(ok, "C0", "lightgrey"))
            ax.set_xlabel(lab["run"])
            ax.set_ylabel(lab["final_reward"])
        for ax, p in zip(axes, params):
            x = pd.to_numeric(table[p], errors="coerce").to_numpy(dtype=float)
            if np.isnan(x).any():  # categorical parameter: one position per distinct value
                cats = sorted(table[p].astype(str).unique())
                x = table[p].astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(dtype=float)
                ax.set_xticks(range(len(cats)), cats)
            elif (x > 0).all() and x.max() / x.min() >= 10:
                ax.set_xscale("log")
            ax.scatter(x[ok], y[ok], color="C0", zorder=3)
            if (~ok).any():
                ax.scatter(x[~ok], y[~ok], color="grey", marker="x", zorder=3, label=lab["over_kl"])
                ax.legend(fontsize="small")
            for xi, yi, run in zip(x, y, table["run"].astype(str)):
                ax.annotate(run, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="small")
            ax.set_xlabel(p)
            ax.set_ylabel(lab["final_reward"])
        for ax in axes[max(1, len(params)):]:
            ax.set_visible(False)
        fig.suptitle(lab["final_title"])
        fig.tight_layout()
        return _save(fig, path)


def seed_bands(curves: pd.DataFrame, path: str | Path, window: int = 50, lang: str = "en") -> Path:
    """One panel per metric of :func:`analysis.seeds.seed_curves`: per configuration, the mean
    over seeds against step and a shaded ``mean ± ci95`` band (absent where one seed has the step)."""
    with _style(lang) as lab:
        metrics = list(dict.fromkeys(curves["metric"]))
        ncols = 2 if len(metrics) <= 4 else 3
        nrows = max(1, -(-len(metrics) // ncols))
        fig = Figure(figsize=(7 * ncols, 4.5 * nrows))
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, metric in zip(axes, metrics):
            for config, g in curves[curves["metric"] == metric].groupby("config", sort=True):
                step, mean, half = (g[c].to_numpy(dtype=float) for c in ("step", "mean", "ci95"))
                if len(step) > MAX_POINTS:  # smoothed curves: even thinning loses nothing visible
                    keep = np.linspace(0, len(step) - 1, MAX_POINTS).astype(int)
                    step, mean, half = step[keep], mean[keep], half[keep]
                color = f"C{int(config) % 10}"
                label = f"{g['label'].iloc[0]} ({lab['n_seeds'].format(n=g['n_seeds'].iloc[0])})"
                ax.plot(step, mean, color=color, linewidth=1.5, label=label)
                ax.fill_between(step, mean - half, mean + half, color=color, alpha=0.2, linewidth=0)
            ax.set_title(lab.get(metric, metric))
            ax.set_xlabel(lab["step"])
            ax.legend(fontsize="small")
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        fig.suptitle(lab["seeds_title"].format(w=window))
        fig.tight_layout()
        return _save(fig, path)
