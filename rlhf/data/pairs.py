"""Shared data types for preference data: a pair, the train/val splits, and the data error.

Every data source (HH-RLHF files, the hub, the synthetic generator) produces the same
`PreferenceSplits`, so the datamodule and the stages never care where pairs came from.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

# The marker that ends every prompt; responses are the text after it.
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


class DataError(ValueError):
    """One-line, user-facing data problem naming file and line."""


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: `prompt` ends with "\\n\\nAssistant:"; responses keep their leading space."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class PreferenceSplits:
    """Train/val pairs plus how many raw records were dropped as unparseable."""

    train: list[PreferencePair] = field(default_factory=list)
    val: list[PreferencePair] = field(default_factory=list)
    dropped: int = 0


def split_train_val(
    pairs: list[PreferencePair], val_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Shuffle with `seed`, then hold out round(n * val_fraction) pairs (at least one when n >= 2).

    The floor of one keeps validation alive on tiny hand-made files, where 5% rounds to zero.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    n_val = int(round(len(shuffled) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(shuffled) >= 2:
        n_val = 1
    return shuffled[n_val:], shuffled[:n_val]
