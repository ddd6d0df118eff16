"""Run-health alarms over a training log: causal detectors with stable names.

Every detector judges row ``i`` from rows ``0..i`` only (trailing windows; baselines from the
first full window), so calling :func:`detect` on a growing log never moves an alarm that has
already fired: a live callback can call it after every update and report the names it has not
seen. ``w`` is :attr:`Thresholds.window` (rows); "mean/median over w" are trailing and need a
full window. Units: ``kl_divergence`` and ``entropy`` are summed per response, in nats.

=====================  ==========================================================================
name                   fires at the first row where ...
=====================  ==========================================================================
kl_spike               at row i + 1 (the row that shows it fell back): KL at row i > m + max(spike_k * s,
                       (spike_ratio - 1) * |m|) with m the median of the w rows before i (or of the 3
                       before it, if higher: a rising KL) and s the w rows' robust spread (max of
                       IQR/1.349 and the median step between rows), and KL at row i + 1 below
                       halfway back to m. `kl_spike_mask` marks row i; the report's
                       `kl_spike_count` counts the same rows
kl_growth              the OLS slope of ln KL over the last 2w rows is >= growth_rate per row with
                       t >= growth_t, and exceeds by >= growth_rate (and growth_t standard errors) the
                       median slope of the spans that ended before them (KL accelerating, as after a
                       plateau; the early rise from zero decelerates, so its slopes fall)
kl_blowup              second line, in absolute units: the median of the last 3 KL values > kl_max
negative_kl            mean KL over w < -negative_kl_tol and its t = mean / (sd / sqrt(w))
                       <= -negative_kl_t
entropy_collapse       entropy per token (sum(entropy) / sum(response_length) over w; the summed
                       entropy's mean without a length column) < entropy_frac * its first value
length_drift           mean length over w / the mean of the first 3 rows (the start) > 1 + length_rise
                       or < 1 - length_fall
length_hacking         Pearson r(reward_score, response_length) over w >= hacking_corr while that
                       length ratio >= 1 + hacking_rise
clipfrac_high          median clipfrac over w >= clipfrac_max (per token); clipfrac_seq (a loss whose
                       action is the whole response, RLOO's): >= clipfrac_seq_max
approxkl_high          median approxkl over w >= approxkl_max (per token); approxkl_seq: its median
                       over w / the mean response_length over w (per token, as the two agree in
                       expectation for independent tokens) >= approxkl_max
value_loss_divergence  mean value loss over w > value_loss_factor
                       * max(lowest such mean so far, value_loss_floor * its first value)
non_finite             NaN or inf in a numeric column other than step; a NaN counts once the column
                       has held a number (``value_loss`` of GRPO and ``gold_score`` without a gold
                       scorer stay empty), always in ``policy_loss`` and ``reward_score``
=====================  ==========================================================================

Stages that do not sample while training (DPO and the rest of the preference family) log no
``response_length``; for them the two length rules judge the held-out evaluation points instead
(``eval.csv``, :func:`detect_eval`): each point's mean length over the same prompts and random
numbers, against the first point (the start policy), with ``EVAL_WINDOW`` points per trailing
window and the proxy's ``reward`` as ``reward_score``. Points that start away from the reference
(``start_off_reference``: a stage trained from the base model, ORPO, compared with the SFT policy)
have no start to compare with, and the rules say so instead of firing.

Infinite values are treated as missing by every detector but ``non_finite``, which reports them
once. ``detect`` costs a few milliseconds on a few thousand rows (pandas rolling windows).

Scale: every rule but ``kl_blowup``'s ceiling compares a metric with the run's own history
(medians, spreads, ratios, slopes of the logarithm) or is a fraction, so multiplying a log's KL by
0.1 or 10 moves no alarm (``tests/test_alarms.py`` checks three scales).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

IQR_TO_SIGMA = 1.349  # IQR / 1.349 estimates the standard deviation of normal noise
ALWAYS_LOGGED = ("policy_loss", "reward_score")  # every stage writes these on every row


@dataclass(frozen=True)
class Thresholds:
    """Detector thresholds; the defaults keep clean default runs of this repo silent."""

    # rows per trailing window: enough for a median or a correlation, short against 100-1000 steps
    window: int = 10
    # a spike is this many robust SDs (IQR / 1.349) of the previous window above its median
    spike_k: float = 6.0
    # ... and this many times that median: single-batch KL of clean runs reaches 3.5x it
    spike_ratio: float = 5.0
    # KL growing by 1% per update or more (10% per window) over a window, ...
    growth_rate: float = 0.01
    # ... clear of noise: t of the log-KL slope, and of its rise over the slope before (lower values
    # fire on clean synthetic logs with 15% KL noise: tests/test_alarms.py)
    growth_t: float = 5.0
    # second line, in nats summed per response: exp(20) likelihood ratios mean the policy has left the
    # reference whatever the run's history (this repo's default runs end near 2.5)
    kl_max: float = 20.0
    # KL >= 0; a window mean this far below 0 (nats) with t <= -negative_kl_t is not sampling noise
    negative_kl_tol: float = 0.01
    # t statistic of that mean over the window's rows: below -3 is very unlikely from noise alone
    negative_kl_t: float = 3.0
    # per-token entropy below a quarter of its start: sampling near-deterministic (clean default runs
    # keep two thirds; the summed entropy also falls when responses shorten, which length_drift covers)
    entropy_frac: float = 0.25
    # longer by half: reward models favour length (Singhal et al. 2023), so growth is the suspect
    length_rise: float = 0.5
    # shorter by three quarters: clean default runs shorten by up to ~60%; beyond, answers vanish
    length_fall: float = 0.75
    # reward and length moving together (r >= 0.7 over a window, ~1% by chance at w = 10) ...
    hacking_corr: float = 0.7
    # ... while responses have grown by a fifth: reward bought with length, not content
    hacking_rise: float = 0.2
    # PPO-clip at eps 0.2 usually clips 0.05-0.2 of tokens; a window mostly above 0.3 overshoots
    clipfrac_max: float = 0.3
    # a response's ratio is a product over its tokens, so far more responses than tokens leave the
    # clip range (RLOO's healthy runs clip 0.3-0.5 of them); beyond 0.8 under a fifth of the batch
    # still gives the update a gradient
    clipfrac_seq_max: float = 0.8
    # approx KL per update (0.5 mean(logratio^2)); PPO early-stop targets are 0.01-0.05
    approxkl_max: float = 0.05
    # rows averaged as the length rules' start: few enough to precede a fast move (a whole first window
    # can hold a jump), enough to average a batch's noise
    start_rows: int = 3
    # what a row is, for the messages
    unit: str = "steps"
    # value loss back above ten times its best window mean: the critic is diverging ...
    value_loss_factor: float = 10.0
    # ... with "best" floored at 1% of the first window so a near-zero best does not make noise count
    value_loss_floor: float = 0.01

    def __post_init__(self):
        if not isinstance(self.window, (int, np.integer)) or self.window < 2:
            raise ValueError(f"window must be an integer >= 2, got {self.window!r}")
        if not isinstance(self.start_rows, (int, np.integer)) or self.start_rows < 1:
            raise ValueError(f"start_rows must be an integer >= 1, got {self.start_rows!r}")


@dataclass(frozen=True)
class Alarm:
    """One detector's first firing: ``step`` and ``value`` (the statistic) against ``threshold``."""

    name: str
    step: int | float
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict:
        """JSON-safe: Python numbers, None for NaN/inf."""
        d = asdict(self)
        for k in ("step", "value", "threshold"):
            v = d[k].item() if hasattr(d[k], "item") else d[k]
            d[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return d


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    x = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    return np.where(np.isfinite(x), x, np.nan)


def _roll(x: np.ndarray, w: int):
    return pd.Series(x).rolling(w, min_periods=w)


def _first_finite(x: np.ndarray) -> np.ndarray:
    """x's first finite value at every row from there on (NaN before): a causal baseline."""
    ok = np.isfinite(x)
    out = np.full_like(x, np.nan)
    if ok.any():
        i = int(ok.argmax())
        out[i:] = x[i]
    return out


def _level(kl: np.ndarray, w: int) -> np.ndarray:
    """The KL level before each row: the previous w rows' median, or the previous 3 rows' when higher
    (a rising KL); NaN until w rows precede."""
    window = _roll(kl, w).median().shift(1).to_numpy()
    return np.where(np.isnan(window), np.nan, np.fmax(window, _roll(kl, 3).median().shift(1).to_numpy()))


def kl_spike_mask(kl: np.ndarray, t: "Thresholds | None" = None) -> np.ndarray:
    """Rows whose KL jumped far above the previous window and fell back at the next row (the
    `kl_spike` rule, module docstring); the one spike rule of the alarms and the report."""
    t = t or Thresholds()
    kl = np.where(np.isfinite(kl), kl, np.nan)
    prev = _roll(kl, t.window)
    # The level a jump is measured from (`_level`): while KL rises the window's median lags it.
    med = _level(kl, t.window)
    iqr = (prev.quantile(0.75) - prev.quantile(0.25)).shift(1).to_numpy()
    step = pd.Series(np.abs(np.diff(kl, prepend=np.nan))).rolling(t.window - 1, min_periods=t.window - 1)
    spread = np.fmax(iqr / IQR_TO_SIGMA, step.median().shift(1).to_numpy())
    thr = med + np.fmax(t.spike_k * spread, (t.spike_ratio - 1) * np.abs(med))
    nxt = np.append(kl[1:], np.nan)
    with np.errstate(invalid="ignore"):
        return (kl > thr) & (nxt < (kl + med) / 2)


def _kl_spike(c, t):
    kl = c["kl_divergence"]
    mask = kl_spike_mask(kl, t)
    fire = np.append(False, mask[:-1])  # known at the row after the spike
    peak = np.append(np.nan, kl[:-1])
    med = np.append(np.nan, _level(kl, t.window)[:-1])
    return peak, med, fire, lambda v, th, s: (
        f"KL {v:.3g} at step {s - 1} jumped above its level before (median {th:.3g}) by more than "
        f"{t.spike_k:g} robust SDs and x{t.spike_ratio:g}, and fell back at step {s}")


def _log_slope(y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """OLS slope of `y` over the trailing `n` rows at every row, and its standard error (NaN until
    `n` rows, or when a window holds a NaN)."""
    x = np.arange(n, dtype=float) - (n - 1) / 2
    sxx = float((x * x).sum())
    win = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.full(n - 1, np.nan), y]), n)
    centred = win - win.mean(1, keepdims=True)
    slope = centred @ x / sxx
    resid = centred - slope[:, None] * x
    return slope, np.sqrt((resid ** 2).sum(1) / (n - 2) / sxx)


def _kl_growth(c, t):
    kl = c["kl_divergence"]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(kl > 0, np.log(kl), np.nan)
    n, w = 2 * t.window, t.window
    slope, se = _log_slope(y, n)
    # The typical slope before the current span: median over the w + 1 spans that ended n .. n + w rows ago.
    past = pd.Series(slope).rolling(w + 1, min_periods=w // 2 + 1).median().shift(n).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        t_now, t_acc = slope / se, (slope - past) / se
    fire = (slope >= t.growth_rate) & (t_now >= t.growth_t) & (slope - past >= t.growth_rate) & (t_acc >= t.growth_t)
    return slope, past + t.growth_rate, fire, lambda v, th, s: (
        f"KL grows {100 * (math.exp(v) - 1):.2g}% per step over the {n} steps to {s} (ln KL slope {v:.3g}, "
        f"t >= {t.growth_t:g}), against {th - t.growth_rate:.3g} before them: KL is accelerating")


def _kl_blowup(c, t):
    n = min(3, t.window)
    v = pd.Series(c["kl_divergence"]).rolling(n, min_periods=n).median().to_numpy()
    return v, np.full_like(v, t.kl_max), v > t.kl_max, lambda v, th, s: (
        f"KL {v:.3g} nats (median of the last {n} steps) above the {th:g} nats ceiling at step {s}")


def _negative_kl(c, t):
    r = _roll(c["kl_divergence"], t.window)
    mean, sd = r.mean().to_numpy(), r.std().to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        tstat = np.where(sd > 0, mean / (sd / math.sqrt(t.window)), -np.inf * (mean < 0))
    return mean, np.full_like(mean, -t.negative_kl_tol), (mean < -t.negative_kl_tol) & (tstat <= -t.negative_kl_t), \
        lambda v, th, s: (f"mean KL over {t.window} steps is {v:.3g} nats at step {s} (< {th:g}, clear of noise): "
                          "KL cannot be negative, suspect the estimator or mismatched log-probs")


def _entropy_collapse(c, t):
    ent = _roll(c["entropy"], t.window).sum().to_numpy()
    per = "per token" if "response_length" in c else "per response"
    if "response_length" in c:
        length = _roll(c["response_length"], t.window).sum().to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.where(length > 0, ent / length, np.where(np.isnan(length), np.nan, 0.0))
    else:
        ent = ent / t.window
    thr = t.entropy_frac * _first_finite(ent)
    return ent, thr, ent < thr, lambda v, th, s: (
        f"entropy {per} {v:.3g} nats over {t.window} steps at step {s}, below {t.entropy_frac:g} x its start "
        f"({th / t.entropy_frac:.3g}): the policy is turning deterministic")


def _length_ratio(c, t):
    length = np.asarray(c["response_length"], dtype=float)
    mean = _roll(length, t.window).mean().to_numpy()
    # The start is the mean of the first finite rows (no more than a window), known from the last of
    # them on: a policy that doubles its length within its first window is judged against where it
    # began, not against a window that already holds the jump (the length trap's seeds 0 and 2).
    finite = np.flatnonzero(np.isfinite(length))
    start = np.full_like(mean, np.nan)
    if len(finite):
        first = finite[:min(t.start_rows, t.window)]
        start[first[-1]:] = length[first].mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        return mean / start


def _length_drift(c, t):
    ratio = _length_ratio(c, t)
    up, down = ratio > 1 + t.length_rise, ratio < 1 - t.length_fall
    thr = np.where(ratio >= 1, 1 + t.length_rise, 1 - t.length_fall)
    return ratio, thr, up | down, lambda v, th, s: (
        f"mean response length over {t.window} {t.unit} is {v:.3g} x its start at step {s} "
        f"(limits {1 - t.length_fall:g}-{1 + t.length_rise:g})")


def _length_hacking(c, t):
    ratio = _length_ratio(c, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = pd.Series(c["reward_score"]).rolling(t.window, min_periods=t.window).corr(
            pd.Series(c["response_length"])).to_numpy()
    fire = (r >= t.hacking_corr) & (ratio >= 1 + t.hacking_rise)
    return r, np.full_like(r, t.hacking_corr), fire, lambda v, th, s: (
        f"reward and response length correlate (r = {v:.2f} >= {th:g} over {t.window} {t.unit}) while length "
        f"grew >= {1 + t.hacking_rise:g} x its start, at step {s}: reward may be bought with length")


def _high(col, limit, what, seq_limit=None):
    """Median of `col` over w against `limit`; the `<col>_seq` column (per response) against
    `seq_limit`, or without one per token (divided by the window's mean response length) against `limit`."""
    def det(c, t):
        lim, level = getattr(t, limit), "per token"
        if f"{col}_seq" not in c:
            v = _roll(c[col], t.window).median().to_numpy()
        elif seq_limit is not None:
            v, lim, level = _roll(c[f"{col}_seq"], t.window).median().to_numpy(), getattr(t, seq_limit), "per response"
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = (_roll(c[f"{col}_seq"], t.window).median() / _roll(c["response_length"], t.window).mean()).to_numpy()
            level = "per response / mean length"
        return v, np.full_like(v, lim), v >= lim, lambda v, th, s: (
            f"median {col} ({level}) over {t.window} steps is {v:.3g} at step {s} (>= {th:g}): {what}")
    return det


def _value_loss(c, t):
    v = _roll(c["value_loss"], t.window).mean().to_numpy()
    best = np.fmin.accumulate(v)
    thr = t.value_loss_factor * np.fmax(best, t.value_loss_floor * _first_finite(v))
    return v, thr, v > thr, lambda v, th, s: (
        f"mean value loss over {t.window} steps is {v:.3g} at step {s}, above {th:.3g} "
        f"({t.value_loss_factor:g} x its best so far): the critic is diverging")


DETECTORS = (  # name, required columns, detector
    ("kl_spike", ("kl_divergence",), _kl_spike),
    ("kl_growth", ("kl_divergence",), _kl_growth),
    ("kl_blowup", ("kl_divergence",), _kl_blowup),
    ("negative_kl", ("kl_divergence",), _negative_kl),
    ("entropy_collapse", ("entropy",), _entropy_collapse),
    ("length_drift", ("response_length",), _length_drift),
    ("length_hacking", ("reward_score", "response_length"), _length_hacking),
    ("clipfrac_high", (("clipfrac", "clipfrac_seq"),),
     _high("clipfrac", "clipfrac_max", "updates keep leaving the clip range", seq_limit="clipfrac_seq_max")),
    ("approxkl_high", (("approxkl", ("approxkl_seq", "response_length")),),
     _high("approxkl", "approxkl_max", "each update moves the policy too far")),
    ("value_loss_divergence", ("value_loss",), _value_loss),
)
NAMES = tuple(name for name, _, _ in DETECTORS) + ("non_finite",)
OPTIONAL = {"entropy_collapse": ("response_length",)}  # used when present and not empty
# Rows a detector needs before it can judge one (w = window); fewer: skipped with a line saying so.
MIN_ROWS = {"kl_spike": lambda w: w + 2, "kl_growth": lambda w: 2 * w + 1, "kl_blowup": lambda w: min(3, w)}
# Rules that compare KL with its own variation: a constant KL column (all zeros: no reference) gives
# them nothing to judge.
NEEDS_VARIATION = ("kl_spike", "kl_growth")


def _non_finite(df: pd.DataFrame, steps: np.ndarray) -> Alarm | None:
    first, cols = None, []
    for col in df.columns:
        if col == "step" or not (pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])):
            continue
        x = df[col].to_numpy(dtype=float)
        if col in ALWAYS_LOGGED:
            logged = np.ones(len(x), dtype=bool)
        else:  # from the row after the column's first number: empty-by-design columns never count
            logged = np.concatenate([[False], np.logical_or.accumulate(np.isfinite(x))[:-1]])
        bad = np.isinf(x) | (np.isnan(x) & logged)
        if not bad.any():
            continue
        i = int(bad.argmax())
        if first is None or i < first:
            first, cols = i, [col]
        elif i == first:
            cols.append(col)
    if first is None:
        return None
    shown = ", ".join(f"{c}={df[c].iloc[first]}" for c in cols)
    return Alarm("non_finite", steps[first].item(), float(len(cols)), 0.0,
                 f"non-finite value(s) at step {steps[first].item()}: {shown}")


def detect(df: pd.DataFrame, thresholds: Thresholds | None = None,
           names: tuple[str, ...] = NAMES) -> tuple[list[Alarm], list[str]]:
    """Run the detectors ``names`` (every one by default) on ``df`` (rows in step order; the columns it has).

    Returns ``(alarms, skipped)``: each alarm at most once, at the first step it fires, in
    detector order; and one ``"<detector> skipped: no <column> column"`` line per detector whose
    column is missing (``"... <column> column is empty"`` when it holds no number).
    """
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown alarm(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    t = thresholds or Thresholds()
    steps = df["step"].to_numpy()
    alarms, skipped, cols = [], [], {}
    def missing(columns: tuple[str, ...]) -> str | None:
        """Why `columns` cannot be used (absent or without a number), or None."""
        for c in columns:
            if c not in df.columns:
                return f"no {c} column"
            if not np.isfinite(cols.setdefault(c, _num(df, c))).any():
                return f"{c} column is empty"
        return None

    for name, needs, det in DETECTORS:
        if name not in names:
            continue
        use, why = [], None
        for need in needs:  # a column, or alternatives (a column or columns each): the first usable one
            options = [need] if isinstance(need, str) else list(need)
            options = [(o,) if isinstance(o, str) else tuple(o) for o in options]
            reasons = [missing(o) for o in options]
            ok = next((o for o, r in zip(options, reasons) if r is None), None)
            if ok is None:
                singles = all(len(o) == 1 and r.startswith("no ") for o, r in zip(options, reasons))
                why = (f"no {' or '.join(o[0] for o in options)} column" if singles and len(options) > 1
                       else "; ".join(reasons))
                break
            use += ok
        need_rows = MIN_ROWS.get(name, lambda w: w)(t.window)
        if why is None and len(df) < need_rows:
            why = f"the log has {len(df)} rows, it needs >= {need_rows}"
        if why is None and name in NEEDS_VARIATION:
            x = cols[use[0]][np.isfinite(cols[use[0]])]
            if x.min() == x.max():
                why = f"{use[0]} is constant ({x[0]:g})"
        if why:
            skipped.append(f"{name} skipped: {why}")
            continue
        data = {c: cols[c] for c in use}
        for c in OPTIONAL.get(name, ()):
            if c in df.columns:
                x = cols.setdefault(c, _num(df, c))
                if np.isfinite(x).any():
                    data[c] = x
        value, thr, fire, message = det(data, t)
        fire = np.asarray(fire, dtype=bool)
        if fire.any():
            i = int(fire.argmax())
            alarms.append(Alarm(name, steps[i].item(), float(value[i]), float(thr[i]),
                                message(float(value[i]), float(thr[i]), steps[i].item())))
    nf = _non_finite(df, steps) if len(df) and "non_finite" in names else None
    if nf is not None:
        alarms.append(nf)
    return alarms, skipped


# Evaluation points per trailing window: long enough to average out the transient lengthening a
# healthy DPO run shows early on the default task, short enough to catch a sustained drift.
EVAL_WINDOW = 5
EVAL_RULES = ("length_drift", "length_hacking")  # the rules evaluation points can feed


def has_lengths(df: pd.DataFrame) -> bool:
    """Whether a training log holds sampled response lengths (an online stage's do; an offline one's not)."""
    return "response_length" in df.columns and bool(np.isfinite(_num(df, "response_length")).any())


def detect_eval(eval_df: pd.DataFrame, thresholds: Thresholds | None = None) -> tuple[list[Alarm], list[str]]:
    """The length rules on held-out evaluation points (``eval.csv``'s columns), for a stage whose
    training log has no sampled lengths: ``EVAL_WINDOW`` points per window, the first point (the
    start policy, sampled on the same prompts and random numbers as every later one) as the start,
    the proxy's ``reward`` as ``reward_score``. ``(alarms, skipped)`` as :func:`detect`; nothing
    fires when the first point is away from the reference (:func:`analysis.load.start_off_reference`)."""
    from .load import start_off_reference

    t = thresholds or Thresholds()
    t = replace(t, window=min(EVAL_WINDOW, t.window), start_rows=1, unit="evaluations")
    off = start_off_reference(eval_df)
    if off:
        return [], [f"{n} (held-out evaluations) skipped: {off}" for n in EVAL_RULES]
    frame = pd.DataFrame({"step": eval_df["step"].to_numpy()})
    for src, dst in (("response_length", "response_length"), ("reward", "reward_score")):
        if src in eval_df.columns:
            frame[dst] = eval_df[src].to_numpy()
    alarms, skipped = detect(frame, t, names=EVAL_RULES)
    alarms = [replace(a, message=f"held-out evaluations: {a.message}") for a in alarms]
    return alarms, [s.replace(" skipped:", " (held-out evaluations) skipped:", 1).replace("reward_score", "reward")
                    for s in skipped]
