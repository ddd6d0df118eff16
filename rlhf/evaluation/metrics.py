"""Evaluation measures on plain Python values: win rate, distinct-n, means, pass@k."""
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from `n` samples of which `c` are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k), computed as
    1 - prod_{i = n - c + 1}^{n} (1 - k / i) for numerical stability, as their reference code."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
