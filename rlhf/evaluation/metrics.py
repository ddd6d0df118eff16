"""Evaluation measures on plain Python values: win rate, distinct-n, means."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of one token sequence, in order: len(tokens) - n + 1 of them (none if shorter)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int, tokenize: Callable[[str], Sequence[str]] = str.split) -> float:
    """distinct-n (Li et al., 2016): |unique n-grams| / |n-grams|, counted over all texts together.

    Texts are split into tokens by `tokenize` (whitespace words by default); n-grams never cross
    text boundaries. 1.0 means no n-gram repeats anywhere, values near 0 mean the same phrases
    again and again. Returns 0.0 when there are no n-grams at all (every text shorter than n).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for t in texts for g in ngrams(tokenize(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """mean_i [a_i > b_i] + 0.5 [a_i = b_i]: how often `a` beats `b` item by item, ties half."""
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores, got {len(a)} and {len(b)}")
    if not a:
        return float("nan")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
