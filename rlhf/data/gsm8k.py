"""GSM8K, the field's reference verifiable task: grade-school math word problems with one exact answer.

    python train.py data=gsm8k algo=grpo                                   # openai/gsm8k from the hub
    python train.py data=gsm8k data.data_files=tests/data/gsm8k_sample.jsonl algo=grpo   # a local file
    python train.py data=gsm8k data.prompt_format=chat model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct ...

Cobbe et al. 2021 ("Training Verifiers to Solve Math Word Problems"). Rows are the hub's
`{"question": str, "answer": str}`, the answer a worked solution whose last line is `#### <number>`.
The prompt is the question and verl's instruction (`Let's think step by step and output the final
answer after "####".`), as an HH dialogue (`prompt_format: hh`) or through the model tokenizer's
chat template (`chat`, as verl's GSM8K baselines prompt instruction-tuned models). SFT learns the
reference solutions (calculator annotations `<<6*4=24>>` removed); the reward model and the DPO
family learn from pairs of the reference solution against the same solution with a wrong final
answer. The verifier is verl's strict GSM8K score: the number after the first `#### ` in the
response (commas and `$` removed) must equal the reference answer as a string; it is the task's
gold and, unless the user names another reward, the online stages' reward (no reward model).

The reference answer is looked up by prompt: loading the task records every (prompt, answer) of
both splits in this module's `ANSWERS`, which `verify` and the reward function `correct` read
(a reward function sees only prompts and responses).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass

from rlhf.data.hh import hub_rows, read_json_rows
from rlhf.data.pairs import ASSISTANT, HUMAN, DataError, PreferencePair, PreferenceSplits, split_train_val

log = logging.getLogger(__name__)

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
_FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALCULATOR = re.compile(r"<<[^>]*>>")
ANSWERS: dict[str, str] = {}  # prompt -> reference answer, filled by GSM8K.load()


def extract_answer(text: str) -> str | None:
    """The number after the first "#### " (commas and "$" removed), or None: verl's strict extraction."""
    m = _FINAL.search(text)
    return None if m is None else m.group(1).replace(",", "").replace("$", "")


def verify(prompt: str, response: str) -> bool:
    """True when the response's answer equals the reference answer of a loaded problem."""
    try:
        reference = ANSWERS[prompt]
    except KeyError:
        raise KeyError("prompt is not one of the loaded GSM8K problems (the task records them when it "
                       "loads): " + repr(prompt[-80:])) from None
    return extract_answer(response) == reference


def correct(prompts: list[str], responses: list[str]) -> list[float]:
    """The reward function of `data=gsm8k` (reward.fn=rlhf.data.gsm8k.correct): 1.0 right, 0.0 not."""
    return [float(verify(p, r)) for p, r in zip(prompts, responses, strict=True)]


def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{where}: needs a non-empty string {key!r} (GSM8K rows: question, answer)")
    if extract_answer(row["answer"]) is None:
        raise DataError(f"{where}: 'answer' has no final line '#### <number>'")
    return row


def _wrong(answer: str, rng: random.Random) -> str:
    value = float(answer) if "." in answer else int(answer)
    wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
    return str(wrong)


@dataclass
class GSM8K:
    """GSM8K (the data config's `_target_`): `data_files` (local .jsonl/.json in the hub's format,
    `val_fraction` of its problems held out) or `datasets.load_dataset(path, name)` (train from
    `split`, held-out from `val_split`). `max_pairs` caps the training problems (a seeded choice)."""

    path: str = "openai/gsm8k"
    name: str = "main"
    data_files: str | list[str] | None = None
    split: str = "train"
    val_split: str | None = "test"
    max_pairs: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    prompt_format: str = "hh"  # hh: the HH dialogue; chat: the tokenizer's chat template
    tokenizer: str | None = None  # the model's tokenizer, for prompt_format=chat

    reward_fn = "rlhf.data.gsm8k.correct"
    verify = staticmethod(verify)

    @staticmethod
    def gold(prompt: str, response: str) -> float:
        return float(verify(prompt, response))

    def __post_init__(self):
        if self.prompt_format not in ("hh", "chat"):
            raise DataError(f"data.prompt_format must be hh or chat, got {self.prompt_format!r}")
        if self.prompt_format == "chat" and not self.tokenizer:
            raise DataError("data.prompt_format=chat needs data.tokenizer (the model's, with a chat template)")
        if self.max_pairs is not None and self.max_pairs <= 0:
            raise DataError(f"data.max_pairs must be positive, got {self.max_pairs}")

    def load(self) -> PreferenceSplits:
        format_prompt = self._prompt_formatter()
        if self.data_files:
            files = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
            rows = [r for f in files for r in read_json_rows(f, _check_row)]
            pairs = self._pairs(rows, format_prompt)
            train, val = split_train_val(pairs, self.val_fraction, self.seed)
            source = ", ".join(files)
        else:
            train = self._pairs(self._hub_split(self.split), format_prompt)
            val = self._pairs(self._hub_split(self.val_split), format_prompt) if self.val_split else []
            train, _ = split_train_val(train, 0.0, self.seed)  # shuffled: max_pairs takes a random subset
            if not self.val_split:
                train, val = split_train_val(train, self.val_fraction, self.seed)
            source = f"{self.path} ({self.name})"
        seen = {p.prompt for p in train}
        val = [p for p in val if p.prompt not in seen]
        if self.max_pairs is not None:
            train = train[: self.max_pairs]
        if not train:
            raise DataError(f"{source}: no GSM8K problems to train on")
        log.info("%s: %d train / %d held-out problems", source, len(train), len(val))
        return PreferenceSplits(train=train, val=val)

    def _pairs(self, rows: list[dict], format_prompt) -> list[PreferencePair]:
        rng = random.Random(self.seed)
        lead = " " if self.prompt_format == "hh" else ""  # HH responses follow "Assistant:" after a space
        pairs = []
        for row in rows:
            prompt = format_prompt(f"{row['question'].strip()} {INSTRUCTION}")
            solution = _CALCULATOR.sub("", row["answer"]).strip()
            answer = extract_answer(solution)
            ANSWERS[prompt] = answer
            wrong = solution[: solution.rfind("#### ")] + "#### " + _wrong(answer, rng)
            pairs.append(PreferencePair(prompt, lead + solution, lead + wrong))
        return pairs

    def _prompt_formatter(self):
        if self.prompt_format == "hh":
            return lambda text: f"{HUMAN} {text}{ASSISTANT}"
        from rlhf.models.tokenizer import load_tokenizer

        tok = load_tokenizer(self.tokenizer)
        if not getattr(tok, "chat_template", None):
            raise DataError(f"data.prompt_format=chat: the tokenizer {self.tokenizer} has no chat template")
        return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)

    def _hub_split(self, split: str) -> list[dict]:
        return hub_rows(self.path, split, ("question", "answer"), _check_row, self.name)
