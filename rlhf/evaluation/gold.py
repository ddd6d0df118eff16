"""The gold reward: what evaluation trusts beyond the reward model a policy was optimised against.

    python train.py eval.gold_reward_model_path=DIR    # a second reward model plays gold

On the synthetic task the gold is the data's own function (`SyntheticPreferences.gold`), known
exactly. On real data a second reward model (trained on more pairs, or larger) can play gold, as
in Gao et al. 2023 ("Scaling Laws for Reward Model Overoptimization"): the policy never sees its
scores, so proxy-up/gold-down is over-optimisation of the proxy.

A gold is a callable `(prompt, response) -> float`; `gold_scores` scores a list at once, in
batches when the gold can (`batch`).
"""
from __future__ import annotations

from pathlib import Path

from rlhf.errors import ConfigError

BATCH = 32


class RewardModelGold:
    """A reward-model export (`*ForSequenceClassification`, one label) as the gold, on text."""

    def __init__(self, path: str | Path, device="cpu"):
        from rlhf.models.reward import check_reward_model

        try:
            check_reward_model(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"eval.gold_reward_model_path: {e}") from None
        self.path, self.device = str(path), device
        self._model = self._tokenizer = None

    def _load(self):
        from transformers import AutoModelForSequenceClassification

        from rlhf.models.causal_lm import freeze
        from rlhf.models.tokenizer import load_tokenizer

        self._model = freeze(AutoModelForSequenceClassification.from_pretrained(self.path)).to(self.device)
        self._tokenizer = load_tokenizer(self.path)
        self._tokenizer.truncation_side = "left"  # an over-long input loses old context, not the response

    def to(self, device) -> "RewardModelGold":
        self.device = device
        if self._model is not None:
            self._model.to(device)
        return self

    def batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        from rlhf.models.reward import reward_scores

        if self._model is None:
            self._load()
        out: list[float] = []
        limit = getattr(self._model.config, "n_positions", 1024)
        with torch.no_grad():
            for i in range(0, len(prompts), BATCH):
                texts = [p + r for p, r in zip(prompts[i:i + BATCH], responses[i:i + BATCH])]
                enc = self._tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                      max_length=limit).to(self.device)
                out += reward_scores(self._model, enc.input_ids, enc.attention_mask).float().tolist()
        return out

    def __call__(self, prompt: str, response: str) -> float:
        return self.batch([prompt], [response])[0]


def gold_scores(gold, prompts: list[str], responses: list[str]) -> list[float]:
    if hasattr(gold, "batch"):
        return list(gold.batch(list(prompts), list(responses)))
    return [float(gold(p, r)) for p, r in zip(prompts, responses)]


def resolve_gold(eval_cfg, source, device="cpu"):
    """`eval.gold_reward_model_path` when set, else the data source's gold (synthetic), else None."""
    path = (eval_cfg or {}).get("gold_reward_model_path")
    if path:
        return RewardModelGold(path, device)
    return getattr(source, "gold", None)
