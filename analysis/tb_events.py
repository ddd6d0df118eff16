"""Read the PPO scalars from TensorBoard event files into the CSV schema.

Tag mapping (a tag already named like the column is accepted too)::

    loss/policy_avg  -> policy_loss
    loss/value_avg   -> value_loss
    objective/kl     -> kl_divergence
    objective/scores -> reward_score
    lr               -> learning_rate

``step`` is the event step and ``timestamp`` the latest wall time logged for that
step. Event files are read oldest first (by the creation time in their name), so
when a resumed run logs a step again the value written last wins; such repeats
are counted in ``df.attrs['duplicate_rows_dropped']``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import AnalysisError

TAG_TO_COLUMN = {
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "objective/kl": "kl_divergence",
    "objective/scores": "reward_score",
    "lr": "learning_rate",
}
log = logging.getLogger(__name__)
_COLUMNS = tuple(dict.fromkeys(TAG_TO_COLUMN.values()))
_TS = re.compile(r"tfevents\.(\d+)")


def find_event_files(path: Path, recursive: bool = True) -> list[Path]:
    """Event files in ``path`` (a file or directory), oldest first by the time stamp in their name."""
    if path.is_file():
        return [path]
    pattern = "events.out.tfevents.*"
    files = [f for f in (path.rglob(pattern) if recursive else path.glob(pattern)) if f.is_file()]

    def key(f: Path) -> tuple[int, str]:
        m = _TS.search(f.name)
        return (int(m.group(1)) if m else 0, str(f))

    return sorted(files, key=key)


def read_events(path: Path) -> pd.DataFrame:
    """Return one row per step with the mapped scalar columns (raw, not yet validated)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    files = find_event_files(path)
    if not files:
        raise AnalysisError(f"{path}: no TensorBoard event files found")
    cols: list[str] = []
    steps: list[int] = []
    vals: list[float] = []
    walls: list[float] = []
    seen_tags: set[str] = set()
    for f in files:
        try:
            for event in EventFileLoader(str(f)).Load():
                for v in event.summary.value:
                    seen_tags.add(v.tag)
                    col = TAG_TO_COLUMN.get(v.tag, v.tag if v.tag in _COLUMNS else None)
                    if col is None:
                        continue
                    kind = v.WhichOneof("value")
                    if kind == "simple_value":
                        value = float(v.simple_value)
                    elif kind == "tensor":
                        value = float(np.asarray(tensor_util.make_ndarray(v.tensor)).reshape(-1)[0])
                    else:
                        continue
                    cols.append(col)
                    steps.append(int(event.step))
                    vals.append(value)
                    walls.append(float(event.wall_time))
        except Exception as exc:  # corrupt or truncated file: the protobuf/IO error types vary
            raise AnalysisError(f"{f}: cannot read TensorBoard events ({type(exc).__name__}: {exc})") from None
    if not cols:
        found = ", ".join(sorted(seen_tags)[:8]) or "none"
        raise AnalysisError(
            f"{path}: no PPO scalars in TensorBoard events (expected tags {', '.join(TAG_TO_COLUMN)}; found {found})"
        )
    long = pd.DataFrame({"column": cols, "step": steps, "value": vals, "wall": walls})
    backjumps = int(long.groupby("column", sort=False)["step"].diff().lt(0).sum())
    dup = long.duplicated(["column", "step"], keep="last")
    n_dup_steps = int(long.loc[dup, "step"].nunique())
    long = long.loc[~dup]
    wide = long.pivot(index="step", columns="column", values="value").sort_index()
    wide.columns.name = None
    missing = [t for t, c in TAG_TO_COLUMN.items() if c not in wide.columns and c != "learning_rate"]
    if missing:
        raise AnalysisError(f"{path}: TensorBoard events lack required tag(s) {', '.join(missing)}")
    wide = wide.reset_index()
    wall = long.groupby("step")["wall"].max().sort_index().to_numpy()
    wide["timestamp"] = pd.to_datetime(wall, unit="s").floor("s")
    warnings = []
    if n_dup_steps:
        warnings.append(f"{path}: {n_dup_steps} step(s) logged more than once in TensorBoard events; kept the last written")
    for msg in warnings:
        log.warning(msg)
    wide.attrs = {
        "rows_read": int(len(wide) + n_dup_steps),
        "duplicate_rows_dropped": n_dup_steps,
        "step_backjumps": backjumps,
        "warnings": warnings,
    }
    return wide
