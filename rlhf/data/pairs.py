"""Shared data types for preference data: a pair, the train/val splits, and the data error.

Every data source (HH-RLHF files, the hub, the synthetic generator) produces the same
`PreferenceSplits`, so the datamodule and the stages never care where pairs came from.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(frozen=True)
class UnpairedExample:
    """One response judged on its own (KTO's data): `label` True for desirable, False for undesirable.
    `prompt` ends with "\\n\\nAssistant:" as a pair's does."""

    prompt: str
    completion: str
    label: bool


def unpair(pairs: list[PreferencePair]) -> list[UnpairedExample]:
    """Each pair as two examples, its chosen response desirable and its rejected one undesirable, in
    pair order (TRL's `unpair_preference_dataset`)."""
    return [ex for p in pairs for ex in (UnpairedExample(p.prompt, p.chosen, True),
                                          UnpairedExample(p.prompt, p.rejected, False))]


@dataclass
class PreferenceSplits:
    """Train/val pairs plus how many raw records were dropped as unparseable. `unpaired`: training
    examples judged one at a time (a KTO data file), used in place of `unpair(train)` when given."""

    train: list[PreferencePair] = field(default_factory=list)
    val: list[PreferencePair] = field(default_factory=list)
    dropped: int = 0
    unpaired: list[UnpairedExample] | None = None


class Task(Protocol):
    """What the `data` config's `_target_` provides: a task is data plus its ground truth.

    Required: `load()`, the training pairs and held-out pairs whose prompts never occur among the
    training prompts (`PreferenceSplits`); SFT learns from the chosen responses, the reward model and
    the preference family from the pairs, the online stages from the prompts. Optional class
    attributes, each picked up by the pipeline when present:
      gold(prompt, response) -> float        the true score (evaluation's gold reward and win rate)
      verify(prompt, response) -> bool       an exact check: greedy accuracy, pass@k, eval/accuracy
      reward_fn: str                         dotted path of the online stages' reward when the user
                                             names none (no reward model is trained then)
    A new task is one module and one `conf/data/<name>.yaml`; every algorithm runs on it unchanged.
    """

    def load(self) -> PreferenceSplits: ...


def task_class(target: str) -> type:
    """The class a `data._target_` names (ImportError/AttributeError when it names none): read for
    its declarations (`reward_fn`, its docstring) without building the task."""
    import importlib

    module, _, name = str(target).rpartition(".")
    return getattr(importlib.import_module(module), name)


def split_train_val(
    pairs: list[PreferencePair], val_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out whole prompts: about round(n * val_fraction) pairs whose prompts never occur in train.

    Pairs are grouped by prompt text, the prompts shuffled with `seed`, and prompts go to
    validation until it holds round(n * val_fraction) pairs (at least one prompt when there are
    two or more, so validation stays alive on tiny hand-made files), always leaving one prompt
    for training. Splitting pairs instead of prompts lets a prompt with several pairs land on
    both sides, and evaluation then measures recall of training prompts, not generalisation.
    Both sides come back shuffled, so the first N validation pairs span many prompts.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = random.Random(seed)
    groups: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        groups.setdefault(pair.prompt, []).append(pair)
    prompts = list(groups)
    rng.shuffle(prompts)
    target = int(round(len(pairs) * val_fraction))
    if val_fraction > 0 and target == 0 and len(prompts) >= 2:
        target = 1
    train: list[PreferencePair] = []
    val: list[PreferencePair] = []
    for i, prompt in enumerate(prompts):
        last = i == len(prompts) - 1
        (val if len(val) < target and not (last and not train) else train).extend(groups[prompt])
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def drop_seen_prompts(val: list[PreferencePair], train: list[PreferencePair]) -> tuple[list[PreferencePair], int]:
    """`val` without the pairs whose prompt occurs in `train`, and how many were dropped.

    For sources that ship their own test split (HH-RLHF's hub `test`), which does not promise
    prompts disjoint from `train`.
    """
    seen = {p.prompt for p in train}
    kept = [p for p in val if p.prompt not in seen]
    return kept, len(val) - len(kept)


def prompt_overlap(splits: PreferenceSplits) -> dict[str, int]:
    """Distinct train and validation prompts, and how many validation prompts occur among the train ones.

    `summary.json` reports these; `eval_prompts_in_train` must be 0 for evaluation to measure
    generalisation.
    """
    train = {p.prompt for p in splits.train}
    val = {p.prompt for p in splits.val}
    return {"distinct_train_prompts": len(train), "distinct_eval_prompts": len(val),
            "eval_prompts_in_train": len(val & train)}
