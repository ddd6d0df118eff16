"""Unpaired preference data (KTO): one response per row with a desirable / undesirable label, in
TRL's unpaired format.

    python -m rlhf.data.export_synthetic kto.jsonl --unpaired --undesirable-fraction 0.25
    python train.py algo=kto kto.unpaired_path=kto.jsonl

Each line is {"prompt": "...\\n\\nAssistant:", "completion": " ...", "label": true|false}, as TRL's
KTOTrainer reads (its standard, non-conversational form). Prompts end with the assistant marker as
the pairs' do, so the policy sees the dialogue format it was fine-tuned on.
"""
from __future__ import annotations

import os
from typing import Any

from rlhf.data.hh import read_json_rows
from rlhf.data.pairs import ASSISTANT, DataError, UnpairedExample


def _example(row: Any, where: str) -> UnpairedExample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, kind in (("prompt", str), ("completion", str), ("label", bool)):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r} (each row needs 'prompt', 'completion' and 'label')")
        if not isinstance(row[key], kind):
            raise DataError(f"{where}: {key!r} must be a {'JSON boolean' if kind is bool else 'string'}, "
                            f"got {type(row[key]).__name__}")
    if not row["prompt"].endswith(ASSISTANT):
        raise DataError(f"{where}: 'prompt' must end with {ASSISTANT!r} (the dialogue format of the pairs)")
    if not row["completion"].strip():
        raise DataError(f"{where}: 'completion' is empty")
    return UnpairedExample(row["prompt"], row["completion"], row["label"])


def read_unpaired_file(path: str | os.PathLike) -> list[UnpairedExample]:
    """The examples of a local unpaired .jsonl (or .json list) file; a malformed row, or a file without
    a desirable or without an undesirable example, is a one-line DataError naming the file (and line)."""
    examples = read_json_rows(path, _example)
    for label, name in ((True, "desirable"), (False, "undesirable")):
        if not any(ex.label is label for ex in examples):
            raise DataError(f"{os.fspath(path)}: no {name} example (label {str(label).lower()}); KTO needs both")
    return examples
