"""The length trap: the synthetic dialogues, labelled by annotators who like longer answers.

    python train.py data=length_trap              # SFT -> reward model -> PPO; watch the gold peak and fall
    python -m analysis outputs/runs/<date>/<time>  # length_hacking fires; the over-optimisation fit

The prompts, responses and gold function are the synthetic task's (`rlhf.data.synthetic`; the gold
with a larger repeat penalty, below), but
with probability `length_bias` a pair's label goes to the response with more words whatever the
gold says, and responses span more lengths (`min_words`-`max_words`), so length is a strong,
spurious signal in the labels. A reward model trained on them prefers longer responses; a policy
optimised against it lengthens its answers past what the gold rewards (the gold is a per-word
mean in which a repeated word costs `repeat_penalty`, 1.0 here against the synthetic task's 0.5,
so padding with repeats lowers it), so the proxy keeps rising while the gold rises, peaks and
falls: reward over-optimisation with a known cause (Gao et al. 2023, "Scaling Laws for Reward
Model Overoptimization"; the length bias of reward models: Singhal et al. 2023, "A Long Way to Go:
Investigating Length Correlations in RLHF"). The held-out pairs are labelled the same way (they are
the annotators' held-out labels); evaluation judges policies by the gold.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.data.pairs import PreferencePair
from rlhf.data.synthetic import SyntheticPreferences, generate_pairs, gold_reward


@dataclass
class LengthTrap(SyntheticPreferences):
    """Synthetic dialogues whose preference labels favour the longer response (a reward-hacking trap)."""

    length_bias: float = 0.5  # probability that a pair's label goes to the longer response, whatever the gold
    min_words: int = 2  # words per response in the pairs: a wider range than the synthetic task's 4-10
    max_words: int = 14
    # The gold's cost of a repeated word (per word of the response). At the synthetic task's value a repeated
    # good word nets zero, so padding by repetition cost the gold nothing and its fall depended on the seed.
    repeat_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.length_bias <= 1.0:
            raise ValueError(f"length_bias must be in [0, 1], got {self.length_bias}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"min_words and max_words must satisfy 1 <= min_words <= max_words, "
                             f"got {self.min_words} and {self.max_words}")
        if self.repeat_penalty < 0:
            raise ValueError(f"repeat_penalty must be >= 0, got {self.repeat_penalty}")

    def gold(self, prompt: str, response: str) -> float:
        """The synthetic gold with this task's `repeat_penalty`; it also labelled the unbiased pairs."""
        return gold_reward(prompt, response, self.repeat_penalty)

    def generate(self, n: int, seed: int | str, templates: tuple[str, ...]) -> list[PreferencePair]:
        return generate_pairs(n, seed, self.tie_margin, templates, length_bias=self.length_bias,
                              words=(self.min_words, self.max_words), repeat_penalty=self.repeat_penalty)
