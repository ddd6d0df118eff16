"""Loading a finished run for use: its policy, reference (SFT) policy, reward model and tokenizer.

Shared by `python -m rlhf.deploy.generate`, `python -m rlhf.deploy.serve` and `python -m rlhf.evaluation`.
Everything loads from the run's Hugging Face exports (safetensors), never from pickles, and
`trust_remote_code` stays off unless the run's config turned it on.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.algorithms.core import truncate_after_stop
from rlhf.errors import UserError
from rlhf.models.causal_lm import freeze, prepare
from rlhf.models.reward import reward_scores
from rlhf.models.sampling import sample
from rlhf.models.tokenizer import load_tokenizer


class RunArtifacts:
    """The models of a run directory written by `python train.py`.

    `stage` picks the policy: by default the last stage of the run that produces one (the
    stage registry's order: an RL stage's export before the SFT policy it started from).
    """

    def __init__(self, run_dir: str | Path, device: str = "cpu", stage: str | None = None):
        from rlhf.stages import stages

        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise UserError(f"run directory {self.run_dir} does not exist")
        cfg_file = self.run_dir / "config.yaml"
        self.config = OmegaConf.load(cfg_file) if cfg_file.is_file() else None
        self.device = torch.device(device)
        try:
            done = json.loads((self.run_dir / "summary.json").read_text()).get("stages", {})
        except (OSError, ValueError, AttributeError):
            done = {}
        self.reused = {n: r["model_dir"] for n, r in done.items()
                       if isinstance(r, dict) and r.get("reused_from") and r.get("model_dir")}
        known = stages()
        policy_stages = [n for n, c in known.items() if c.produces == "policy"]
        if stage is not None and stage not in policy_stages:
            raise UserError(f"--stage {stage}: not a stage that produces a policy (one of {', '.join(policy_stages)})")
        candidates = [stage] if stage else list(reversed(policy_stages))
        self.stage = next((n for n in candidates if (self._export(n) / "config.json").is_file()), None)
        if self.stage is None:
            looked = ", ".join(f"{n}/model" for n in candidates)
            raise UserError(f"{self.run_dir}: no policy export found (looked for {looked})")
        self.policy_dir = self._export(self.stage)
        self.stage_cfg = (self.config or {}).get(self.stage) or {}
        # The reference is what the policy started from: its policy_path, else the run's first policy.
        first = [self._export(n) for n, c in known.items() if c.produces == "policy" and not c.needs]
        self.reference_dir = self._first("reference policy", self.stage_cfg.get("policy_path"), *first, self.policy_dir)
        reward_cfg = (self.config or {}).get("reward") or {}
        rm_dirs = [self._export(n) for n, c in known.items() if c.produces == "reward"]
        self.reward_dir = self._first("reward model", *rm_dirs, reward_cfg.get("model_path"), required=False)
        self.trust_remote_code = bool(((self.config or {}).get("model") or {}).get("trust_remote_code", False))

    def _export(self, stage: str) -> Path:
        """Where `stage`'s model is: `<run>/<stage>/model`, or, for a stage a sweep job reused from an
        earlier job (`reused_from` in summary.json, rlhf/training/reuse.py), that job's export."""
        return Path(self.reused.get(stage) or self.run_dir / stage / "model")

    def _first(self, what: str, *candidates, required: bool = True) -> Path | None:
        for c in candidates:
            if c and (Path(c) / "config.json").is_file():
                return Path(c)
        if required:
            raise UserError(f"{self.run_dir}: no {what} export found")
        return None

    def _causal_lm(self, path: Path):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        return freeze(prepare(model)).to(self.device)

    @cached_property
    def tokenizer(self):
        tok = load_tokenizer(str(self.policy_dir), trust_remote_code=self.trust_remote_code)
        tok.padding_side = "left"
        return tok

    @cached_property
    def policy(self):
        return self._causal_lm(self.policy_dir)

    @cached_property
    def reference(self):
        return self._causal_lm(self.reference_dir)

    @cached_property
    def reward_model(self):
        if self.reward_dir is None:
            return None
        model = AutoModelForSequenceClassification.from_pretrained(self.reward_dir, trust_remote_code=self.trust_remote_code)
        return freeze(prepare(model)).to(self.device)

    @cached_property
    def reward_tokenizer(self):
        tok = load_tokenizer(str(self.reward_dir), trust_remote_code=self.trust_remote_code)
        tok.truncation_side = "left"
        return tok

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 1.0, policy=None,
                 seed: int | None = None) -> list[str]:
        """One sampled completion per prompt, cut after the first eos."""
        if seed is not None:
            torch.manual_seed(seed)
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True).to(self.device)
        responses, _ = sample(policy or self.policy, enc.input_ids, enc.attention_mask, max_new_tokens,
                              temperature, tok.pad_token_id, tok.eos_token_id, tokens_only=True)
        responses, mask, _ = truncate_after_stop(responses, tok.eos_token_id, tok.pad_token_id)
        return [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask)]

    @cached_property
    def context_length(self) -> int | None:
        """The policy's maximum sequence length (GPT-2: n_positions), or None when it declares none."""
        cfg = self.policy.config
        return next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings")
                     if isinstance(getattr(cfg, k, None), int)), None)

    @cached_property
    def gold(self):
        """The run's gold (`eval.gold_reward_model_path`, else its task's gold function), or None."""
        from hydra.utils import instantiate

        from rlhf.evaluation.gold import resolve_gold

        data = (self.config or {}).get("data")
        if not data or "_target_" not in data:
            return None
        try:
            return resolve_gold(self.config.get("eval"), instantiate(data), self.device)
        except Exception:  # a task that cannot be built here (a missing data file) has no gold to offer
            return None

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The run's reward of each response: its reward model's normalised score, else the gold's."""
        from rlhf.evaluation.gold import gold_scores

        if self.reward_dir is not None:
            return self.score(prompts, responses)
        if self.gold is None:
            raise UserError(f"{self.run_dir}: no reward model and no gold function")
        return gold_scores(self.gold, prompts, responses)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Normalised reward-model scores of prompt + completion (as the PPO stage scored them)."""
        if self.reward_model is None:
            raise UserError(f"{self.run_dir}: no reward model (rm/model or reward.model_path)")
        tok = self.reward_tokenizer
        enc = tok([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                  truncation=True, max_length=getattr(self.reward_model.config, "n_positions", 1024)).to(self.device)
        return reward_scores(self.reward_model, enc.input_ids, enc.attention_mask).tolist()
