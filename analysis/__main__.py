"""Command line: ``python -m analysis PATH [--window 50] [--out DIR] [--json] [--lang en|zh] [--max-kl X]``.

PATH is a metrics CSV, a run directory or a Hydra multirun directory. Prints a
table (runs ranked best first for a sweep) and writes figures + ``report.md``
(into ``--out``, default next to the input). ``--json`` prints only JSON on
stdout: one object for a run, one object per line for a sweep (failed jobs as
``{"run": ..., "status": "failed", "error": ...}``). A sweep whose ``seed``
override takes several values also gets, per configuration of the other
overrides, the mean and 95% confidence interval of each metric over seeds
(:mod:`analysis.seeds`): a text table, a report section, ``seeds.png`` and, with
``--json``, one more line per configuration after the run lines::

    {"kind": "seeds", "params": {...}, "n_seeds": 3, "seeds": [0, 1, 2], "runs": ["0", "2", "4"],
     "metrics": {"gold_win_rate": {"mean": ..., "ci95": ..., "lo": ..., "hi": ..., "n": 3}, ...}}

Every run (and every run line of a sweep) also gets ``alarms``
(``[{name, step, value, threshold, message}]``, :mod:`analysis.alarms`), ``skipped`` (one line
per analysis left out, saying why) and, with an ``eval.csv`` beside its log, ``overoptimisation``
(:func:`analysis.overoptimisation.analyse`); the text output lists them under ``Alarms:`` and
``Skipped:``. A sweep also gets ``frontier.png``, the KL-reward frontier per configuration.

Warnings go to stderr after the results; on an error, stderr gets a single
``error: ...`` line and the exit code is 1 (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd

from .errors import AnalysisError
from .load import is_sweep_dir, load_run, load_sweep
from .metrics import compute_metrics
from .plots import check_lang
from .report import (default_out_dir, eval_for, fmt, run_health, run_warnings, sweep_health, write_run_report,
                     write_sweep_report)
from .seeds import comparison_table, config_label, config_metrics, has_seeds, seed_table, shown_metrics
from .sweep import rank_runs, sweep_table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        sys.stderr.write(f"error: {message} (see python -m analysis --help)\n")
        raise SystemExit(2)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m analysis", description="Analyse an RLHF run or sweep from its logs.")
    p.add_argument("path", help="metrics CSV, run directory (outputs/runs/...) or multirun directory")
    p.add_argument("--window", type=_positive_int, default=50, help="moving-average / trend window (default 50)")
    p.add_argument("--out", default=None, help="folder for figures and report.md (default: next to the input)")
    p.add_argument("--json", action="store_true", help="print JSON only (one object per run and line)")
    p.add_argument("--lang", choices=("en", "zh"), default="en", help="figure labels (zh needs a CJK font)")
    p.add_argument("--max-kl", type=float, default=None, help="sweep: only rank runs with final KL <= this")
    p.add_argument("--objective", default="final_reward_score", help="sweep: metric to maximise")
    return p


def jsonable(v):
    """JSON-safe value: numpy scalars -> Python, NaN/inf/NA -> None."""
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return jsonable(v)


def _dump(obj: dict) -> str:
    return json.dumps(_clean(obj), allow_nan=False, ensure_ascii=False)


def _health_json(health: dict) -> dict:
    keep = ("alarms", "skipped", "overoptimisation")
    return {k: health[k] for k in keep if k in health}


def _health_text(health: dict, prefix: str = "") -> list[str]:
    """Alarm and skipped lines of one run for the text output."""
    lines = [f"  - {prefix}{a['name']} at step {a['step']}: {a['message']}" for a in health["alarms"]]
    return lines or [f"  - {prefix}none"]


def _run(args, path: Path) -> None:
    df = load_run(path)
    m = compute_metrics(df, args.window)
    eval_df, eval_skip = eval_for(df.attrs.get("source"))
    health = run_health(df, eval_df, eval_skip)
    report = write_run_report(df, m, default_out_dir(path, args.out), args.window, args.lang,
                              eval_df=eval_df, health=health)
    warnings = run_warnings(df, m)
    if args.json:
        print(_dump({"source": df.attrs.get("source"), "status": "ok", **m, "warnings": warnings,
                     **_health_json(health), "report": str(report)}))
        return
    print(f"Run: {df.attrs.get('source')} ({df.attrs.get('source_kind')}, {m['num_steps']} steps)")
    width = max(len(k) for k in m)
    for k, v in m.items():
        print(f"  {k:<{width}}  {fmt(v)}")
    if warnings:
        print("Warnings:")
        print("\n".join(f"  - {w}" for w in warnings))
    print("Alarms:")
    print("\n".join(_health_text(health)))
    oo = health.get("overoptimisation")
    if oo:
        print("Over-optimisation: " + ", ".join(f"{k} {fmt(oo[k])}" for k in
                                                 ("alpha", "beta", "gold_peak_kl", "observed_peak_kl", "past_peak")))
    if health["skipped"]:
        print("Skipped:")
        print("\n".join(f"  - {s}" for s in health["skipped"]))
    print(f"Report: {report}")


def _seed_json(seeds: pd.DataFrame) -> list[str]:
    params = seeds.attrs["params"]
    return [_dump({"kind": "seeds", "params": {p: jsonable(r[p]) for p in params}, "n_seeds": r["n_seeds"],
                   "seeds": [jsonable(s) for s in r["seeds"]], "runs": list(r["runs"]),
                   "metrics": {m: {k: jsonable(v) for k, v in st.items()}
                               for m, st in config_metrics(r, seeds.attrs["metrics"]).items()}})
            for _, r in seeds.iterrows()]


def _seed_text(seeds: pd.DataFrame) -> list[str]:
    if seeds.empty:
        return ["Over seeds: no job has a readable summary.json, nothing to aggregate"]
    lines = [f"Over seeds: {len(seeds)} configuration(s), mean and 95% CI half-width "
             "(mean ± t(0.975, n-1) * sd / sqrt(n)); --json for every metric"]
    params, metrics = seeds.attrs.get("varying", seeds.attrs["params"]), shown_metrics(seeds)
    for _, r in seeds.iterrows():
        lines.append(f"{config_label(r, params)}: {r['n_seeds']} seed(s) {', '.join(map(fmt, r['seeds']))} "
                     f"(jobs {', '.join(map(str, r['runs']))})")
        stats = pd.DataFrame.from_dict(config_metrics(r, metrics), orient="index")
        shown = stats.astype(object).map(fmt)
        shown.index = shown.index.str.ljust(max(map(len, shown.index)))  # names read best left-aligned
        shown = shown.rename_axis("metric").reset_index()
        lines += ["  " + line for line in shown.to_string(index=False).splitlines()]
    return lines


def _sweep(args, path: Path) -> None:
    df, failed = load_sweep(path)
    table = sweep_table(df, args.window)
    ranked = rank_runs(table, objective=args.objective, max_kl=args.max_kl)
    seeds = seed_table(table, path) if has_seeds(table) else None
    health = sweep_health(df, ranked, args.window)
    report = write_sweep_report(df, ranked, default_out_dir(path, args.out), args.window, args.lang, seeds=seeds,
                                health=health)
    params = list(ranked.attrs.get("params", []))
    reasons = ranked.attrs.get("failed_jobs", {})
    if args.json:
        metric_cols = [c for c in ranked.columns if c not in ["rank", "run", "eligible", *params]]
        for _, r in ranked.iterrows():
            print(_dump({"run": r["run"], "status": "ok", "rank": r["rank"], "eligible": bool(r["eligible"]),
                         "params": {p: jsonable(r[p]) for p in params},
                         **{c: r[c] for c in metric_cols},
                         "warnings": ranked.attrs["warnings"].get(r["run"], []),
                         **_health_json(health["runs"][r["run"]]), "report": str(report)}))
        for name in failed:
            print(_dump({"run": name, "status": "failed", "error": reasons.get(name, "")}))
        for line in _seed_json(seeds) if seeds is not None else []:
            print(line)
        return
    bound = f"final KL <= {args.max_kl:g}" if args.max_kl is not None else "no KL bound"
    print(f"Sweep: {path}: {len(ranked)} run(s) analysed, {len(failed)} failed")
    print(f"Objective: maximise {args.objective} ({bound})")
    cols = ["rank", "run", *params, "final_reward_score", "final_kl_divergence", "reward_per_kl",
            "policy_loss_stability", "collapse_suspected", "kl_spike_count"]
    shown = ranked[cols].astype(object).map(fmt)
    shown["rank"] = ["-" if pd.isna(v) else str(v) for v in ranked["rank"]]
    print(shown.to_string(index=False))
    if seeds is not None:
        print("\n".join(_seed_text(seeds)))
        print("\nComparison (mean ± 95% CI over seeds):")
        print("\n".join(comparison_table(seeds)))
    warnings = [f"  - run {run}: {w}" for run, ws in ranked.attrs.get("warnings", {}).items() for w in ws]
    if warnings:
        print("Warnings:")
        print("\n".join(warnings))
    print("Alarms:")
    print("\n".join(line for run, h in health["runs"].items() for line in _health_text(h, f"run {run}: ")))
    skipped = [f"  - run {run}: {s}" for run, h in health["runs"].items() for s in h["skipped"]]
    skipped += [f"  - {s}" for s in health["frontier"]["skipped"]]
    if skipped:
        print("Skipped:")
        print("\n".join(skipped))
    if failed:
        print("Failed jobs:")
        print("\n".join(f"  - {name}: {reasons.get(name, '')}" for name in failed))
    print(f"Report: {report}")


class _Collect(logging.Handler):
    """Holds warnings back so that an error leaves exactly one line on stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(" ".join(record.getMessage().split()))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = _Collect()
    logger = logging.getLogger("analysis")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    path = Path(args.path)
    try:
        check_lang(args.lang)
        (_sweep if is_sweep_dir(path) else _run)(args, path)
    except AnalysisError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, no traceback
        msg = " ".join(str(exc).split()) or "no message"
        print(f"error: unexpected {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    for line in handler.lines:
        print(f"warning: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
