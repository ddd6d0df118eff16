"""Anthropic HH-RLHF preference data, from the hub or from local .json/.jsonl files.

Each record holds two full dialogues, `chosen` and `rejected`, of the form
"\\n\\nHuman: ...\\n\\nAssistant: ..." that share everything up to the final assistant turn.
`split_hh` cuts them into (prompt, chosen response, rejected response).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf.data.pairs import ASSISTANT, DataError, PreferencePair, PreferenceSplits, drop_seen_prompts, split_train_val

log = logging.getLogger(__name__)

_KEYS = ("chosen", "rejected")


def _split_last_turn(text: str) -> tuple[str, str] | None:
    # The LAST marker: earlier turns are history the model conditions on, not the answer.
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return text[:end], text[end:]


def split_hh(chosen: str, rejected: str) -> PreferencePair | None:
    """Split an HH record into a pair; None when it can't be compared fairly.

    Dropped: a dialogue without "\\n\\nAssistant:", prompts that differ (the two answers would
    not be to the same question), or an empty/whitespace-only response.
    """
    a, b = _split_last_turn(chosen), _split_last_turn(rejected)
    if a is None or b is None:
        return None
    (prompt, good), (other_prompt, bad) = a, b
    if prompt != other_prompt or not good.strip() or not bad.strip():
        return None
    return PreferencePair(prompt=prompt, chosen=good, rejected=bad)


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in _KEYS:
        if key not in row:
            raise DataError(f"{where}: missing key {key!r} (each row needs 'chosen' and 'rejected')")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    return row


def _one_line(msg: str, limit: int = 200) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def read_hh_file(path: str | os.PathLike) -> list[dict]:
    """Read and validate a local HH file: JSON lines, or (.json) one JSON list of objects.

    Raises DataError with one line naming the file (and line number for JSON lines).
    """
    return read_json_rows(path, _check_row)


def read_json_rows(path: str | os.PathLike, check: Callable[[Any, str], Any]) -> list:
    """The rows of a local .jsonl (or .json list) file, each passed through `check(row, where)`, which
    returns it (or what it makes of it) or raises DataError naming `where` (file and line)."""
    path = os.fspath(path)
    if not path.endswith((".json", ".jsonl")):
        raise DataError(f"{path}: unsupported file type (expected .json or .jsonl)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read file ({_one_line(e)})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")

    # A .json file may hold one list; anything else is read as one object per line.
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return [check(row, f"{path}: item {i}") for i, row in enumerate(rows)]

    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # tolerate blank lines, e.g. a trailing newline pair
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
        rows.append(check(row, f"{path}:{lineno}"))
    return rows


def _to_pairs(rows) -> tuple[list[PreferencePair], int]:
    pairs, dropped = [], 0
    for row in rows:
        pair = split_hh(row["chosen"], row["rejected"])
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    return pairs, dropped


@dataclass
class HHRLHF:
    """HH-RLHF source (the data config's `_target_`).

    `data_files` set: read those local files and hold out `val_fraction` of the pairs, by prompt
    (`split_train_val`: no validation prompt is a training prompt). Otherwise
    `datasets.load_dataset(path)`: train from `split`, val from `val_split` less the pairs whose
    prompt is also in train (or carved out of train by `val_fraction` when `val_split` is empty/None).
    `max_pairs` caps the train pairs (randomly chosen with `seed`); val is then capped to
    max(1, round(max_pairs * val_fraction)) so evaluation cost shrinks with it.
    """

    path: str = "Anthropic/hh-rlhf"
    data_files: str | list[str] | None = None
    split: str = "train"
    val_split: str | None = "test"
    max_pairs: int | None = None
    val_fraction: float = 0.05
    seed: int = 0

    # Real data has no ground-truth preference function (see synthetic.gold_reward).
    gold = None

    def load(self) -> PreferenceSplits:
        if self.max_pairs is not None and self.max_pairs <= 0:
            raise DataError(f"data.max_pairs must be positive, got {self.max_pairs}")
        if self.data_files:
            train, val, dropped, source = self._load_local()
        else:
            train, val, dropped, source = self._load_hub()
        if self.max_pairs is not None:
            train = train[: self.max_pairs]
            val = val[: max(1, round(self.max_pairs * self.val_fraction))]
        if dropped:
            log.warning("%s: dropped %d unparseable HH pairs", source, dropped)
        if not train:
            raise DataError(f"{source}: no usable preference pairs ({dropped} dropped)")
        log.info("%s: %d train / %d val pairs", source, len(train), len(val))
        return PreferenceSplits(train=train, val=val, dropped=dropped)

    def _load_local(self):
        files = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
        # Validate every file before doing any work, so a typo fails in a second, not mid-run.
        rows = [row for f in files for row in read_hh_file(f)]
        pairs, dropped = _to_pairs(rows)
        train, val = split_train_val(pairs, self.val_fraction, self.seed)
        return train, val, dropped, ", ".join(files)

    def _load_hub(self):
        train_rows = self._hub_split(self.split)
        train, dropped = _to_pairs(train_rows)
        if self.val_split:
            val, val_dropped = _to_pairs(self._hub_split(self.val_split))
            dropped += val_dropped
            # Shuffle so a max_pairs cap takes a random subset, not the file's first rows.
            train, _ = split_train_val(train, 0.0, self.seed)
            val, _ = split_train_val(val, 0.0, self.seed)
            val, seen = drop_seen_prompts(val, train)
            if seen:
                log.info("%s (%s): %d pairs whose prompt is also in %r left out of validation",
                         self.path, self.val_split, seen, self.split)
        else:
            train, val = split_train_val(train, self.val_fraction, self.seed)
        return train, val, dropped, self.path

    def _hub_split(self, split: str) -> list[dict]:
        return hub_rows(self.path, split, _KEYS, _check_row)


def hub_rows(path: str, split: str, columns: tuple[str, ...], check: Callable[[Any, str], Any],
             name: str | None = None) -> list:
    """The rows of a hub dataset's `split` (config `name`), reduced to `columns`, each passed through
    `check(row, where)`; a dataset that cannot be loaded here is one DataError pointing at local files."""
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, auth, missing split: all mean "can't get it from here"
        log.debug("load_dataset(%r, %r, split=%r) failed", path, name, split, exc_info=True)
        raise DataError(
            f"could not load dataset {path!r} (split {split!r}): "
            f"{type(e).__name__}: {_one_line(e, 120)}; "
            "pass data.data_files=PATH to read local .json/.jsonl files"
        ) from None
    missing = [k for k in columns if k not in ds.column_names]
    if missing:
        raise DataError(f"{path} ({split}): missing column(s) {missing}")
    return [check(row, f"{path} ({split}) row {i}") for i, row in enumerate(ds.select_columns(list(columns)).to_list())]
