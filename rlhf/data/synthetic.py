"""Synthetic HH-format preference data with a known gold preference function.

Real preference data has no ground truth, so a run can only be judged by its own reward
model. Here `gold_reward` is the rule that decided every `chosen`/`rejected` label, so SFT,
the reward model and PPO can all be scored against the truth (e.g. reward-model accuracy
vs. gold, gold reward of PPO samples), and reward hacking shows up as proxy reward rising
while gold reward does not.

The vocabulary is chosen so that every scored word is one GPT-2 token with a leading space,
which keeps the task learnable by a 2-layer, 128-wide GPT-2. The task still needs context:
whether a topic word helps depends on the topic named in the LAST human turn, and the score
is a per-word mean, so neither length nor a fixed word list solves it.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

from rlhf.data.pairs import HUMAN, PreferencePair, PreferenceSplits

# Topic name (as it appears in prompts) -> its on-topic words.
TOPICS: dict[str, tuple[str, ...]] = {
    "cooking": (" recipe", " oven", " salt", " pan", " flavor", " dinner"),
    "music": (" song", " guitar", " melody", " band", " rhythm", " album"),
    "travel": (" trip", " flight", " hotel", " beach", " passport", " map"),
    "gardening": (" soil", " seeds", " flowers", " water", " plant", " tomato"),
    "fitness": (" workout", " muscle", " run", " protein", " gym", " stretch"),
    "money": (" budget", " savings", " loan", " bank", " tax", " income"),
    "space": (" planet", " rocket", " star", " orbit", " moon", " galaxy"),
    "pets": (" dog", " cat", " vet", " leash", " puppy", " treats"),
}
POLITE = (" sure", " glad", " happy", " thanks", " great", " welcome")
# " ugh" and " nope" would be two GPT-2 tokens, hence " dumb" and " useless".
RUDE = (" whatever", " boring", " stupid", " dumb", " lazy", " useless")
FILLER = (" the", " a", " and", " it", " is", " very")

TEMPLATES = (
    "Can you tell me about {}?",
    "Any tips on {}?",
    "What should I know about {}?",
    "I want to get better at {}. Any advice?",
    "Tell me something interesting about {}.",
    "Help me with {}, please.",
)
# Phrasings only validation prompts use, in every turn: evaluation then asks each topic in words
# the policy and the reward model never trained on, so it measures generalisation, not recall.
HELD_OUT_TEMPLATES = (
    "Could you explain {} to me?",
    "I have a question about {}.",
)
MULTI_TURN_PROB = 0.3
MIN_WORDS, MAX_WORDS = 4, 10
TIE_MARGIN = 0.3  # wide enough that labels are unambiguous at a tiny model's resolution

# Word values of gold_reward (topic words are resolved against the prompt's topic).
ON_TOPIC, POLITE_VALUE, OTHER_TOPIC, RUDE_VALUE = 0.5, 0.5, -0.25, -1.0
REPEAT_PENALTY = 0.5
EMPTY_REWARD = -1.0

_TOPIC_OF_WORD = {w.strip(): t for t, words in TOPICS.items() for w in words}
_POLITE = {w.strip() for w in POLITE}
_RUDE = {w.strip() for w in RUDE}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def _words(text: str) -> list[str]:
    # Punctuation becomes a separator so "oven," and "oven.salt" still count as words.
    return text.lower().translate(_PUNCT).split()


def prompt_topic(prompt: str) -> str | None:
    """Topic named in the last human turn of `prompt` (first one mentioned), or None."""
    start = prompt.rfind(HUMAN)
    last_turn = prompt[start + len(HUMAN):] if start >= 0 else prompt
    for word in _words(last_turn.split("\n\nAssistant:")[0]):
        if word in TOPICS:
            return word
    return None


def gold_reward(prompt: str, response: str, repeat_penalty: float = REPEAT_PENALTY) -> float:
    """Ground-truth score of `response` to `prompt`; higher is better.

    gold = mean over the response's words of value(word) - repeat_penalty * (repeats / n_words), where
      value = +0.5 on-topic (a word of the topic named in the prompt's LAST human turn),
              +0.5 polite, -0.25 other-topic (a word of any other topic), -1 rude,
              0 filler and unknown words;
      repeats = number of words equal to an earlier word of the same response.
    Words: lowercased, punctuation turned into spaces, split on whitespace.
    A response with no words scores -1. If the prompt names no topic, topic words score 0.
    `repeat_penalty` is 0.5 (the synthetic task's); range then [-1.5, 0.5].
    """
    words = _words(response)
    if not words:
        return EMPTY_REWARD
    topic = prompt_topic(prompt)
    total, repeats, seen = 0.0, 0, set()
    for w in words:
        if w in seen:
            repeats += 1
        seen.add(w)
        word_topic = _TOPIC_OF_WORD.get(w)
        if word_topic is not None:
            if topic is not None:
                total += ON_TOPIC if word_topic == topic else OTHER_TOPIC
        elif w in _POLITE:
            total += POLITE_VALUE
        elif w in _RUDE:
            total += RUDE_VALUE
    n = len(words)
    return total / n - repeat_penalty * repeats / n


def gold_reward_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """`gold_reward` over parallel lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def _response(rng: random.Random, topic: str, words: tuple[int, int] = (MIN_WORDS, MAX_WORDS)) -> str:
    """`words` (4-10 by default) words mixing on-topic/other-topic/polite/rude/filler with random per-response weights.

    Dirichlet(0.6) weights make most responses lean to one or two categories, so scores spread
    from clearly bad to clearly good instead of clustering at the average.
    """
    others = [w for t, ws in TOPICS.items() if t != topic for w in ws]
    pools = (TOPICS[topic], POLITE, tuple(others), RUDE, FILLER)
    weights = [rng.gammavariate(0.6, 1.0) + 1e-6 for _ in pools]
    n = rng.randint(*words)
    return "".join(rng.choice(pool) for pool in rng.choices(pools, weights=weights, k=n))


def _ask(rng: random.Random, topic: str, templates: tuple[str, ...]) -> str:
    """A human turn naming `topic`."""
    return HUMAN + " " + rng.choice(templates).format(topic)


def _prompt(rng: random.Random, templates: tuple[str, ...]) -> str:
    topics = list(TOPICS)
    topic = rng.choice(topics)
    turn = _ask(rng, topic, templates) + "\n\nAssistant:"
    if rng.random() < MULTI_TURN_PROB:
        # An earlier exchange on a different topic: a model that ignores turn order gets misled.
        earlier = rng.choice([t for t in topics if t != topic])
        history = _ask(rng, earlier, templates) + "\n\nAssistant:"
        history += "".join(rng.choice(TOPICS[earlier] + POLITE) for _ in range(rng.randint(3, 6)))
        turn = history + turn
    return turn


def generate_pairs(n_pairs: int, seed: int | str = 0, tie_margin: float = TIE_MARGIN,
                   templates: tuple[str, ...] = TEMPLATES, length_bias: float = 0.0,
                   words: tuple[int, int] = (MIN_WORDS, MAX_WORDS),
                   repeat_penalty: float = REPEAT_PENALTY) -> list[PreferencePair]:
    """`n_pairs` pairs: two responses to one prompt, chosen = higher gold, near-ties skipped.

    With `length_bias` > 0 (the length_trap task), each pair's label goes to the response with more
    words with that probability, whatever the gold says (ties in length keep the gold's label).
    """
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    while len(pairs) < n_pairs:
        prompt = _prompt(rng, templates)
        topic = prompt_topic(prompt)
        a, b = _response(rng, topic, words), _response(rng, topic, words)
        ga, gb = gold_reward(prompt, a, repeat_penalty), gold_reward(prompt, b, repeat_penalty)
        if abs(ga - gb) < tie_margin:
            continue  # a near-tie is a noisy label; skipping keeps gold labels unambiguous
        chosen, rejected = (a, b) if ga > gb else (b, a)
        # No draw at length_bias 0: the default task's random stream, and so its pairs, stay as they were.
        if length_bias > 0 and rng.random() < length_bias and len(_words(a)) != len(_words(b)):
            chosen, rejected = (a, b) if len(_words(a)) > len(_words(b)) else (b, a)
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


@dataclass
class SyntheticPreferences:
    """Synthetic data source (the data config's `_target_`); `n_pairs` counts train + val.

    Train prompts use `TEMPLATES`, validation prompts `HELD_OUT_TEMPLATES` (drawn from their own
    random stream), so no validation prompt occurs among the training prompts.
    """

    n_pairs: int = 4000
    seed: int = 0
    val_fraction: float = 0.1
    tie_margin: float = TIE_MARGIN  # pairs whose gold scores differ by less are skipped
    max_pairs: int | None = None  # caps the train pairs (val to max(1, round(max_pairs * val_fraction))), as HHRLHF's

    # Same call as on HHRLHF (where it is None): `source.gold(prompt, response)`.
    gold = staticmethod(gold_reward)

    def load(self) -> PreferenceSplits:
        if self.n_pairs <= 0:
            raise ValueError(f"n_pairs must be positive, got {self.n_pairs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        n_val = int(round(self.n_pairs * self.val_fraction))
        if self.val_fraction > 0 and self.n_pairs >= 2:
            n_val = max(n_val, 1)
        n_train = self.n_pairs - n_val
        if self.max_pairs is not None:
            if self.max_pairs <= 0:
                raise ValueError(f"max_pairs must be positive, got {self.max_pairs}")
            n_train = min(n_train, self.max_pairs)  # a prefix of the same stream: the same first pairs
            n_val = min(n_val, max(1, round(self.max_pairs * self.val_fraction)))
        train = self.generate(n_train, self.seed, TEMPLATES)
        val = self.generate(n_val, f"{self.seed}:held-out", HELD_OUT_TEMPLATES)
        return PreferenceSplits(train=train, val=val, dropped=0)

    def generate(self, n: int, seed: int | str, templates: tuple[str, ...]) -> list[PreferencePair]:
        """`n` labelled pairs from `seed`'s stream (a task built on these dialogues labels them its own way)."""
        return generate_pairs(n, seed, self.tie_margin, templates)


def write_hh_file(path, n_pairs: int, seed: int = 0) -> int:
    """Writes `n_pairs` synthetic pairs as HH-RLHF JSON lines ({"chosen", "rejected"} full dialogues).

    For running `data=hh_rlhf` (e.g. `experiment=gpt2_hh`) offline; an existing file is never overwritten.
    """
    import json
    from pathlib import Path

    from rlhf.errors import UserError

    out = Path(path)
    if out.exists():
        raise UserError(f"{out} already exists; refusing to overwrite it")
    if out.suffix != ".jsonl" or n_pairs <= 0:
        raise UserError(f"expected a .jsonl path and --pairs > 0, got {out} and {n_pairs}")
    pairs = generate_pairs(n_pairs, seed)
    out.write_text("".join(json.dumps({"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected}) + "\n"
                           for p in pairs))
    return len(pairs)


def write_unpaired_file(path, n_pairs: int, seed: int = 0, undesirable_fraction: float = 1.0) -> int:
    """Writes `n_pairs` synthetic pairs unpaired, in TRL's KTO format ({"prompt", "completion", "label"}
    lines): every chosen response as desirable and the first `undesirable_fraction` of the rejected ones
    as undesirable (KTO's imbalanced case). An existing file is never overwritten; returns the rows."""
    import json
    from pathlib import Path

    from rlhf.errors import UserError

    out = Path(path)
    if out.exists():
        raise UserError(f"{out} already exists; refusing to overwrite it")
    if out.suffix != ".jsonl" or n_pairs <= 0 or not 0 < undesirable_fraction <= 1:
        raise UserError(f"expected a .jsonl path, --pairs > 0 and --undesirable-fraction in (0, 1], got {out}, "
                        f"{n_pairs} and {undesirable_fraction}")
    pairs = generate_pairs(n_pairs, seed)
    keep = max(1, round(len(pairs) * undesirable_fraction))
    rows = [{"prompt": p.prompt, "completion": p.chosen, "label": True} for p in pairs]
    rows += [{"prompt": p.prompt, "completion": p.rejected, "label": False} for p in pairs[:keep]]
    random.Random(seed).shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
