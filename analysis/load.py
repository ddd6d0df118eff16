"""Load RLHF training logs: one run into a DataFrame, a Hydra multirun into one long DataFrame.

Accepted inputs for :func:`load_run`

* a CSV file with the columns ``step, policy_loss, value_loss, kl_divergence,
  reward_score, learning_rate, batch_size, timestamp`` (extra columns are kept);
* a run directory ``outputs/runs/<date>/<time>/``: the ``metrics.csv`` of its
  ``algo`` stage (``ppo/``, ``grpo/``, ... as ``config.yaml`` names it), else a
  ``metrics.csv`` directly in it, else that stage's TensorBoard events under ``<algo>/tb/``
  (see :mod:`analysis.tb_events`);
* a single ``events.out.tfevents.*`` file.

Normalisation applied to every run

* ``step`` and the four metric columns are required; ``learning_rate`` and
  ``batch_size`` are parsed when present. Text such as ``'3e-05'`` becomes a
  number; empty cells and ``nan`` become NaN; anything else is an error.
* ``timestamp`` (``YYYY-MM-DD HH:MM:SS``) becomes a datetime; unparseable ones become NaT.
* rows are stably sorted by ``step`` and, for a step logged more than once (a
  resumed run rewrites steps), the row written last in the file wins.

What was fixed is reported through a logging warning and ``df.attrs``:
``source``, ``source_kind`` (``csv``/``tensorboard``), ``rows_read``,
``step_backjumps`` (times the step went backwards), ``duplicate_rows_dropped``
and ``warnings`` (the human-readable list).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .errors import AnalysisError
from .tb_events import find_event_files, read_events

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("policy_loss", "value_loss", "kl_divergence", "reward_score")
REQUIRED_COLUMNS = ("step",) + METRIC_COLUMNS
NUMERIC_COLUMNS = REQUIRED_COLUMNS + ("learning_rate", "batch_size")
_NA_TOKENS = ("", "nan", "na", "n/a", "none", "null")


def load_run(path: str | Path) -> pd.DataFrame:
    """Load one run (CSV file, run directory or event file) as a step-sorted DataFrame."""
    kind, src = resolve_log(Path(path))
    if kind == "csv":
        return _normalise(_read_csv(src), src, "csv")
    df = read_events(src)
    return _normalise(df, src, "tensorboard")


def resolve_log(path: Path) -> tuple[str, Path]:
    """Return ``("csv", file)`` or ``("tensorboard", file_or_dir)`` for a run path."""
    if not path.exists():
        raise AnalysisError(f"{path}: no such file or directory")
    if path.is_file():
        return ("tensorboard" if "tfevents" in path.name else "csv"), path
    algo = run_algo(path)
    stage = stage_folder(path, algo)
    for csv in (stage / "metrics.csv", path / "metrics.csv"):
        if csv.is_file():
            return "csv", csv
    for tb_dir, recursive in ((stage / "tb", True), (path / "tb", True), (stage, False), (path, False)):
        if tb_dir.is_dir() and find_event_files(tb_dir, recursive):
            return "tensorboard", tb_dir
    hint = "; it looks like a multirun sweep, use load_sweep" if is_sweep_dir(path) else ""
    raise AnalysisError(
        f"{path}: no training log found (looked for {algo}/metrics.csv, metrics.csv and "
        f"TensorBoard events in {algo}/tb/){hint}"
    )


def run_algo(run_dir: Path) -> str:
    """The run's last stage, whose log is the run's (``algo`` in its ``config.yaml``; ``ppo`` without one)."""
    f = run_dir / "config.yaml"
    try:
        algo = (yaml.safe_load(f.read_text()) or {}).get("algo") if f.is_file() else None
    except (yaml.YAMLError, OSError, AttributeError):
        algo = None
    return algo if isinstance(algo, str) and algo else "ppo"


def stage_folder(run_dir: Path, algo: str | None = None) -> Path:
    """The folder of the run's last stage: ``<run>/<algo>/``, or, where a sweep job took that stage
    from an earlier job with the same settings and inputs (``reused_from`` in its summary.json,
    rlhf/training/reuse.py), that job's folder, which holds the stage's logs. `algo`: the run's
    `run_algo`, where the caller has it already."""
    algo = algo or run_algo(run_dir)
    own = run_dir / algo
    if own.is_dir():
        return own
    try:
        stages = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("stages") or {}
        earlier = (stages.get(algo) or {}).get("reused_from")
    except (OSError, ValueError, AttributeError):
        earlier = None
    return Path(earlier) / algo if isinstance(earlier, str) and earlier else own


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise AnalysisError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnalysisError(f"{path}: not a readable CSV ({first})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _normalise(df: pd.DataFrame, src: Path, kind: str) -> pd.DataFrame:
    """Validate columns, coerce types, sort by step (last write wins) and record what changed."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise AnalysisError(f"{src}: missing required column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise AnalysisError(f"{src}: no data rows (header only)")
    df = df.copy()
    for col in NUMERIC_COLUMNS:
        if col in df.columns:
            df[col] = _to_number(df[col], col, src)
    n_missing_step = int(df["step"].isna().sum())
    if n_missing_step or not np.isfinite(df["step"].to_numpy(dtype=float)).all():
        raise AnalysisError(f"{src}: column 'step' has missing or infinite values")
    steps = df["step"].to_numpy(dtype=float)
    if np.array_equal(steps, np.round(steps)):
        df["step"] = df["step"].astype("int64")
    warnings: list[str] = []
    if "timestamp" in df.columns and not pd.api.types.is_datetime64_any_dtype(df["timestamp"]):
        raw = df["timestamp"]
        df["timestamp"] = pd.to_datetime(raw, format="ISO8601", errors="coerce")
        n_bad = int((df["timestamp"].isna() & raw.notna()).sum())
        if n_bad:
            warnings.append(f"{src}: {n_bad} timestamp(s) are not 'YYYY-MM-DD HH:MM:SS'; left empty (NaT)")
    backjumps = int((np.diff(steps) < 0).sum())
    if backjumps:
        df = df.sort_values("step", kind="stable")
        warnings.append(f"{src}: step went backwards {backjumps} time(s) (resumed run?); rows sorted by step")
    dup = df["step"].duplicated(keep="last").to_numpy()
    n_dup = int(dup.sum())
    if n_dup:
        df = df.loc[~dup]
        warnings.append(f"{src}: {n_dup} row(s) repeat an earlier step; kept the last written row per step")
    df = df.reset_index(drop=True)
    for msg in warnings:
        log.warning(msg)
    prior = df.attrs  # the TensorBoard reader reports what it already de-duplicated
    df.attrs = {
        "source": str(src),
        "source_kind": kind,
        "rows_read": int(prior.get("rows_read", len(steps))),
        "step_backjumps": backjumps + int(prior.get("step_backjumps", 0)),
        "duplicate_rows_dropped": n_dup + int(prior.get("duplicate_rows_dropped", 0)),
        "warnings": list(prior.get("warnings", [])) + warnings,
    }
    return df


def _to_number(col: pd.Series, name: str, src: Path) -> pd.Series:
    """Coerce a column to float64 (ints stay ints); raise on text that is not a number."""
    if pd.api.types.is_bool_dtype(col):
        raise AnalysisError(f"{src}: column '{name}' holds true/false values, expected numbers")
    if pd.api.types.is_numeric_dtype(col):
        return col
    text = col.astype("string").str.strip().str.strip("'\"").fillna("")
    num = pd.to_numeric(text, errors="coerce").astype("float64")
    bad = num.isna().to_numpy() & ~text.str.lower().isin(_NA_TOKENS).to_numpy()
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        raise AnalysisError(
            f"{src}: column '{name}' has {int(bad.sum())} non-numeric value(s), "
            f"first {str(col.iloc[idx])!r} on data row {idx + 1}"
        )
    return num


# --------------------------------------------------------------------------- held-out evaluation

EVAL_FILE = "eval.csv"
EVAL_COLUMNS = ("step", "kl", "reward", "gold", "response_length", "distinct_2", "accuracy")


def find_eval(path: str | Path) -> Path | None:
    """The ``eval.csv`` beside a run's log: in the folder of a metrics CSV, in a run directory's
    ``<algo>/`` stage folder (or the directory itself); None when there is none."""
    p = Path(path)
    if p.is_file():
        candidates = [p] if p.name == EVAL_FILE else [p.parent / EVAL_FILE]
    elif p.is_dir():
        candidates = [stage_folder(p) / EVAL_FILE, p / EVAL_FILE]
        if p.name == "tb":  # a TensorBoard-only run: the stage folder holds tb/ and eval.csv
            candidates.append(p.parent / EVAL_FILE)
    else:
        candidates = []
    return next((c for c in candidates if c.is_file()), None)


def load_eval(path: str | Path) -> pd.DataFrame | None:
    """Held-out evaluation points (see :data:`EVAL_COLUMNS`) sorted by step, last write per step
    wins; None when :func:`find_eval` finds no file. ``step``, ``kl`` and ``reward`` are required;
    ``gold`` may be absent or empty (no known true reward)."""
    src = find_eval(path)
    if src is None:
        return None
    df = _read_csv(src)
    missing = [c for c in ("step", "kl", "reward") if c not in df.columns]
    if missing:
        raise AnalysisError(f"{src}: missing required column(s) {', '.join(missing)}")
    for col in df.columns:
        if col in EVAL_COLUMNS:
            df[col] = _to_number(df[col], col, src)
    if df["step"].isna().any():
        raise AnalysisError(f"{src}: column 'step' has missing values")
    df = df.sort_values("step", kind="stable").drop_duplicates("step", keep="last").reset_index(drop=True)
    df.attrs = {"source": str(src)}
    return df


# A start at the reference reads 0 up to float rounding; a policy that has moved, tenths to tens.
START_KL_MAX = 0.1  # nats per response


def start_off_reference(eval_df: pd.DataFrame | None) -> str | None:
    """Why the first evaluation point is not a start at the reference, or None when it is (or
    there is none). Gains, KL and lengths measured from the first point describe a policy moving
    away from where it began only when it began at the reference: a stage trained from the base
    model and compared with the SFT policy (ORPO) starts tens of nats away."""
    if eval_df is None or not len(eval_df) or "kl" not in eval_df.columns:
        return None
    kl0 = float(pd.to_numeric(eval_df["kl"], errors="coerce").iloc[0])
    if not math.isfinite(kl0) or kl0 <= START_KL_MAX:
        return None
    return (f"the first evaluation (step {eval_df['step'].iloc[0]}) is {kl0:.3g} nats from the reference "
            f"(> {START_KL_MAX:g}): the stage did not start from its reference (a stage trained from the base "
            "model, as ORPO), so there is no start to measure from")


# --------------------------------------------------------------------------- sweeps


def job_dirs(path: Path) -> list[Path]:
    """Hydra multirun job folders ``0/, 1/, ...`` in numeric order."""
    return sorted((d for d in path.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))


def is_sweep_dir(path: str | Path) -> bool:
    """True for a Hydra multirun directory: has ``multirun.yaml``, or job folders and no log of its own."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "multirun.yaml").is_file():
        return True
    own_log = (p / run_algo(p)).is_dir() or (p / "metrics.csv").is_file()
    return not own_log and bool(job_dirs(p))


def read_overrides(run_dir: Path) -> dict[str, object]:
    """Parse ``.hydra/overrides.yaml`` (``['lr=1e-05', 'kl_coef=0.05']``) into ``{key: value}``.

    ``+key=v`` / ``++key=v`` count as ``key=v``; deletions (``~key``) are ignored.
    Values become int, float or bool where they parse as one, else stay text.
    """
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return {}
    try:
        items = yaml.safe_load(f.read_text()) or []
    except yaml.YAMLError as exc:
        raise AnalysisError(f"{f}: not valid YAML ({str(exc).splitlines()[0]})") from None
    out: dict[str, object] = {}
    for item in items if isinstance(items, list) else []:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+").strip()
        if sep and key and not key.startswith("~"):
            out[key] = _parse_value(value.strip())
    return out


def read_summary(run_dir: Path) -> dict[str, float]:
    """The numeric headline values at the top level of a run's ``summary.json``.

    Numbers only: booleans, text, nested dicts (``stages``) and ``seed`` (an
    identity, not a result) are left out, but for two values of the last stage (``algo``), its own
    training time and peak memory (``fit_seconds`` and ``peak_rss_mb`` of ``stages[algo]``, read as
    ``stage_seconds`` and ``stage_peak_rss_mb``; the job's totals count whichever stages it did not
    reuse), and for ``pass_at_k`` of a verifiable task (``{"before": {k: p}, "after": {k: p}}``),
    read as ``pass@<k>_before`` and ``pass@<k>_after``. Raises :class:`AnalysisError` when the file
    is missing or is not a JSON object.
    """
    f = Path(run_dir) / "summary.json"
    if not f.is_file():
        raise AnalysisError(f"{f}: no such file (job failed or still running?)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnalysisError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{f}: expected a JSON object, got {type(data).__name__}")
    out = {k: float(v) for k, v in data.items()
           if k != "seed" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    stages = data.get("stages")
    last = stages.get(data.get("algo")) if isinstance(stages, dict) and isinstance(data.get("algo"), str) else None
    for key, name in (("fit_seconds", "stage_seconds"), ("peak_rss_mb", "stage_peak_rss_mb")):
        v = last.get(key) if isinstance(last, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    for when, by_k in (data.get("pass_at_k") or {}).items():
        out.update({f"pass@{k}_{when}": float(v) for k, v in (by_k or {}).items() if isinstance(v, (int, float))})
    return out


def _parse_value(s: str) -> object:
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    return None if low in ("null", "none") else s.strip("'\"")


def load_sweep(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Load every job of a Hydra multirun directory.

    Returns ``(df, failed)``: ``df`` stacks the runs that loaded, with a ``run``
    column (the job folder name) and one column per override key (NaN where a job
    lacks that key); ``failed`` lists the job names whose log is missing, empty or
    invalid (reasons in ``df.attrs['failed_jobs']``). Per-run load warnings are in
    ``df.attrs['run_warnings']``. Raises :class:`AnalysisError` when there are no
    job folders or no job could be loaded.
    """
    p = Path(path)
    if not p.is_dir():
        raise AnalysisError(f"{p}: not a directory (expected a Hydra multirun folder)")
    jobs = job_dirs(p)
    if not jobs:
        raise AnalysisError(f"{p}: no job folders (0/, 1/, ...) found in multirun directory")
    frames, params, reasons, run_warnings = [], {}, {}, {}
    for job in jobs:
        try:
            df = load_run(job)
        except AnalysisError as exc:
            reasons[job.name] = str(exc)
            log.warning(f"job {job.name} skipped: {exc}")
            continue
        params[job.name] = read_overrides(job)
        run_warnings[job.name] = df.attrs.get("warnings", [])
        df.insert(0, "run", job.name)
        frames.append(df)
    if not frames:
        first = next(iter(reasons.values()))
        raise AnalysisError(f"{p}: none of the {len(jobs)} jobs has a usable log (job {next(iter(reasons))}: {first})")
    keys = list(dict.fromkeys(k for d in params.values() for k in d))
    out = pd.concat(frames, ignore_index=True)
    names = [k if k not in out.columns else f"override.{k}" for k in keys]
    for pos, (key, name) in enumerate(zip(keys, names), start=1):
        out.insert(pos, name, out["run"].map({r: d.get(key) for r, d in params.items()}))
    out.attrs = {
        "source": str(p),
        "source_kind": "sweep",
        "override_keys": names,
        "failed_jobs": reasons,
        "run_warnings": run_warnings,
        "warnings": [w for ws in run_warnings.values() for w in ws],
    }
    return out, list(reasons)
