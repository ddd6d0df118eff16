"""Verifiable arithmetic: problems with one exact answer, checked by a verifier instead of a reward model.

    python train.py data=arithmetic algo=grpo          # SFT -> GRPO on the verifier's reward (no reward model)
    python train.py data=arithmetic data.digits=2 data.operators=2 algo=grpo   # harder problems
    python train.py data=arithmetic algo=grpo reward.fn=my_module.my_verifier  # your own verifier

Reinforcement learning from verifiable rewards (RLVR): the reward of a response is 1 when the last
number in it equals the problem's answer, else 0 (as the math rewards of TRL, OpenRLHF and verl;
GRPO was introduced on such rewards, Shao et al. 2024, "DeepSeekMath"). Prompts are HH-format
dialogues whose last human turn holds the expression `a <op> b [<op> c ...]` (non-negative
integers of `digits` digits, `operators` operators from `ops`, `*` before `+`/`-`); the answer is
computed from the prompt's text alone, so any response can be checked without side data.
Held-out problems (a `val_fraction` of the problem space, chosen by the seed) never occur in a
training prompt. SFT learns from the correct responses (`answer_style`: `direct`, " 7",
`worked`, " 3 + 4 = 7", or `mixed`: half direct, half restating the problem after the answer,
" 7, from 3 + 4", whose last number the verifier reads, as loose demonstrations that a strict
verifier marks wrong); the reward model and the DPO family from pairs of a correct against an
incorrect answer in the same style. The task's gold is the verifier (1.0 or 0.0), so the gold
reward of a set of responses is their accuracy; evaluation adds greedy accuracy and pass@k
(`rlhf.evaluation.metrics.pass_at_k`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhf.data.pairs import ASSISTANT, HUMAN, PreferencePair, PreferenceSplits

TEMPLATES = (
    "What is {}?",
    "Compute {}.",
    "Calculate {}, please.",
    "Can you work out {}?",
)
OPS = "+-*"
_EXPRESSION = re.compile(r"\d+(?:\s*[-+*]\s*\d+)+")
_NUMBER = re.compile(r"-?\d+")
MAX_PROBLEMS = 200_000  # problem spaces larger than this are sampled, not enumerated


def evaluate(expression: str) -> int:
    """The value of `a <op> b ...` over non-negative integers, `*` before `+` and `-`, left to right."""
    tokens = re.findall(r"\d+|[-+*]", expression)
    terms: list[int] = []
    signs: list[int] = []
    value, sign = int(tokens[0]), 1
    for op, num in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            value *= int(num)
        else:
            terms.append(value)
            signs.append(sign)
            value, sign = int(num), (1 if op == "+" else -1)
    terms.append(value)
    signs.append(sign)
    return sum(s * t for s, t in zip(signs, terms))


def problem_of(prompt: str) -> str | None:
    """The expression in the prompt's last human turn (its last one), or None."""
    start = prompt.rfind(HUMAN)
    turn = prompt[start + len(HUMAN):] if start >= 0 else prompt
    found = _EXPRESSION.findall(turn.split(ASSISTANT)[0])
    return found[-1] if found else None


def extract_answer(response: str) -> int | None:
    """The last integer in `response` (a leading minus sign included), or None."""
    found = _NUMBER.findall(response.replace(",", ""))
    return int(found[-1]) if found else None


def verify(prompt: str, response: str) -> bool:
    """True when the last number of `response` equals the value of the expression in `prompt`."""
    expression = problem_of(prompt)
    answer = extract_answer(response)
    return expression is not None and answer is not None and answer == evaluate(expression)


def correct(prompts: list[str], responses: list[str]) -> list[float]:
    """The verifier as a reward function (`reward.fn=rlhf.data.arithmetic.correct`): 1.0 or 0.0 each."""
    return [float(verify(p, r)) for p, r in zip(prompts, responses, strict=True)]


def _gold(prompt: str, response: str) -> float:
    return float(verify(prompt, response))


def _expression(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    return " ".join(x for pair in zip(map(str, operands), ops + ("",)) for x in pair).strip()


@dataclass
class Arithmetic:
    """Arithmetic problems with an exact verifier (the `data=arithmetic` task)."""

    n_pairs: int = 4000  # preference pairs, train + held-out
    seed: int = 0
    val_fraction: float = 0.1  # of the problems: held out, never in a training prompt
    digits: int = 1  # digits per operand (1: 0-9, 2: 0-99, ...)
    operators: int = 1  # operators per expression
    ops: str = OPS  # the operators to draw from, a subset of "+-*"
    answer_style: str = "direct"  # direct: " 7" | worked: " 3 + 4 = 7" | mixed: " 7" or " 7, from 3 + 4", half each
    max_pairs: int | None = None  # caps the train pairs, as the other sources'

    # The task's gold is its verifier: a response scores 1.0 when correct, else 0.0.
    gold = staticmethod(_gold)
    verify = staticmethod(verify)
    reward_fn = "rlhf.data.arithmetic.correct"  # the online stages' reward unless reward.fn/model_path is given

    def __post_init__(self) -> None:
        if self.n_pairs <= 0:
            raise ValueError(f"n_pairs must be positive, got {self.n_pairs}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1): the task needs held-out problems, got {self.val_fraction}")
        if not 1 <= self.digits <= 6 or not 1 <= self.operators <= 4:
            raise ValueError(f"digits must be 1-6 and operators 1-4, got {self.digits} and {self.operators}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"ops must be a non-empty subset of {OPS!r}, got {self.ops!r}")
        if self.answer_style not in ("direct", "worked", "mixed"):
            raise ValueError(f"answer_style must be direct, worked or mixed, got {self.answer_style!r}")

    def problems(self) -> tuple[list[str], list[str]]:
        """(train, held-out) expressions: disjoint, from the seed."""
        rng = random.Random(f"{self.seed}:problems")
        hi, ops = 10 ** self.digits, sorted(set(self.ops))
        space = hi ** (self.operators + 1) * len(ops) ** self.operators
        if space <= MAX_PROBLEMS:
            import itertools

            every = [_expression(nums, o) for nums in itertools.product(range(hi), repeat=self.operators + 1)
                     for o in itertools.product(ops, repeat=self.operators)]
        else:
            seen: set[str] = set()
            while len(seen) < MAX_PROBLEMS // 10:
                seen.add(_expression(tuple(rng.randrange(hi) for _ in range(self.operators + 1)),
                                     tuple(rng.choice(ops) for _ in range(self.operators))))
            every = sorted(seen)
        rng.shuffle(every)
        n_val = max(1, round(len(every) * self.val_fraction))
        return every[n_val:], every[:n_val]

    def respond(self, expression: str, answer: int, restate: bool = False) -> str:
        """The response giving `answer`; `restate` (mixed style): the problem after it, so its last number is not the answer."""
        if restate:
            return f" {answer}, from {expression}"
        return f" {expression} = {answer}" if self.answer_style == "worked" else f" {answer}"

    def _pairs(self, expressions: list[str], n: int, rng: random.Random, distinct: bool) -> list[PreferencePair]:
        """`n` pairs on `expressions`: a correct response against one off by 1-10 (or 10%, the larger).
        `distinct`: each (problem, phrasing) once, for held-out prompts that do not repeat."""
        prompts = ([(e, t) for e in expressions for t in TEMPLATES] if distinct else None)
        if prompts is not None:
            rng.shuffle(prompts)
            prompts = prompts[:n]
        pairs = []
        for i in range(n if prompts is None else len(prompts)):
            e, t = prompts[i] if prompts is not None else (rng.choice(expressions), rng.choice(TEMPLATES))
            answer = evaluate(e)
            spread = max(10, abs(answer) // 10)
            wrong = answer + rng.choice([-1, 1]) * rng.randint(1, spread)
            prompt = f"{HUMAN} {t.format(e)}{ASSISTANT}"
            # No draw for the other styles: their random streams, and so their pairs, stay as they were.
            restate = self.answer_style == "mixed" and rng.random() < 0.5
            pairs.append(PreferencePair(prompt, self.respond(e, answer, restate), self.respond(e, wrong, restate)))
        return pairs

    def load(self) -> PreferenceSplits:
        train_problems, val_problems = self.problems()
        n_val = max(1, round(self.n_pairs * self.val_fraction))
        n_train = self.n_pairs - n_val
        if self.max_pairs is not None:
            if self.max_pairs <= 0:
                raise ValueError(f"max_pairs must be positive, got {self.max_pairs}")
            n_train, n_val = min(n_train, self.max_pairs), min(n_val, max(1, round(self.max_pairs * self.val_fraction)))
        train = self._pairs(train_problems, n_train, random.Random(f"{self.seed}:train"), distinct=False)
        val = self._pairs(val_problems, n_val, random.Random(f"{self.seed}:held-out"), distinct=True)
        return PreferenceSplits(train=train, val=val, dropped=0)
