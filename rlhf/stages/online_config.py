"""The typed pieces of an online RL stage: its settings (`OnlineConfig`, every part's parameters in
one place, so any composition can read them) and the scored rollout handed to the update (`Rollout`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms import parts
from rlhf.algorithms.parts import check_composition
from rlhf.stages.common import StageConfig


@dataclass
class OnlineConfig(StageConfig):
    lr: float = 3e-4  # AdamW learning rate (the root `lr` overrides it), annealed linearly to 0
    anneal_lr: bool = True  # linear decay of lr over max_steps, stepped by hand once per update
    adam_eps: float = 1e-5  # the N+ details use 1e-5 rather than 1e-8
    weight_decay: float = 0.0  # AdamW decay on weight matrices (never biases/norms); 0 as TRL and the N+ details
    max_grad_norm: float | None = 1.0  # per optimizer step, each trained model clipped to it; null disables
    batch_size: int = 32  # episodes (responses) per rollout = per update
    num_mini_batches: int = 1  # optimizer steps per pass over the rollout; must divide batch_size
    max_steps: int = 100  # updates (trainer.max_steps overrides)
    max_prompt_length: int = 64  # prompt tokens kept (the last ones), left-padded
    response_length: int = 16  # tokens sampled per response
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature too
    stop_token: str | None = "eos"  # responses are truncated after the first one; null: no truncation
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of responses without stop token
    policy_path: str | None = None  # start policy (HF dir); default: the run's SFT output, else the model config
    sample_every: int = 10  # log prompt/response samples as TensorBoard text every N updates
    eval_prompts: int = 200  # held-out prompts for the before/after gold evaluation
    # Warn when a rollout's log-probs and the first training forward's differ by more (nats, max over
    # tokens, before any step): precision or kernel differences that would make ratios start off 1.
    logprob_gap_warn: float = 0.05
    # Where responses are drawn in groups per prompt (generations_per_prompt > 1: GRPO, RLOO, ...), each
    # pass (sampling's prefill, reference, reward model, training) runs a group's prompt once: Prefix
    # Grouper, Liu et al. 2025 (verl's use_prefix_grouper). The plain forward's hidden states, to float
    # rounding (rlhf/models/shared_prefix.py); false runs the plain forward.
    shared_prefix: bool = True
    # The rollout's decode steps replayed as one CUDA graph each (static KV cache, rlhf/models/graph_decode.py):
    # CUDA only, and off by default until a GPU run has measured it (docs/benchmark.md).
    decode_graph: bool = False
    # ----- the parts (rlhf/algorithms/parts.py); each algorithm sets its own defaults -----
    advantage_estimator: str = "gae"  # gae | grpo | rloo | reinforce_pp | reinforce_pp_baseline
    policy_loss: str = "clipped"  # clipped | gspo | cispo | clipped_sequence
    loss_agg_mode: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_in: str = "reward"  # reward: per-token penalty in the reward | loss: a term of the loss | none
    kl_estimator: str = "k1"  # k1: log p/q (unbiased, can be < 0) | k2: (log r)^2 / 2 | k3: (r-1) - log r (>= 0)
    adaptive_kl: bool = False  # Ziegler et al. 2019 proportional controller on the KL coefficient
    target_kl: float = 6.0  # controller target for the mean sequence KL (nats)
    kl_horizon: int = 10000  # controller horizon in episodes
    whiten_rewards: bool = False  # whiten per-token rewards (no mean shift) before the estimator
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 0.95  # GAE lambda
    scale_rewards: str = "group"  # grpo estimator: group | batch | none (Dr. GRPO): what advantages are divided by
    normalize_advantage: bool = True  # rloo estimator: whiten the advantages over the batch (TRL's name)
    cliprange: float = 0.2  # ratio clip (epsilon); the low side
    cliprange_high: float | None = None  # DAPO's clip-higher; null: the same as cliprange
    epsilon_max: float = 5.0  # cispo: the importance weight's upper bound (TRL's epsilon_high for cispo)
    # ----- the critic (needed by advantage_estimator=gae) -----
    value_model: str | None = None  # separate: a copy of the reward model | shared: a head on the policy | null
    vf_coef: float = 0.1  # value loss weight
    cliprange_value: float = 0.2  # value prediction clip around the rollout's values

    def __post_init__(self):
        self.check_positive("lr", "batch_size", "max_steps", "max_prompt_length", "response_length",
                            "temperature", "sample_every", "eval_prompts", "adam_eps", "logprob_gap_warn",
                            "num_mini_batches", "kl_horizon", "cliprange", "epsilon_max", "epochs")
        self.check_positive("weight_decay", "vf_coef", "cliprange_value", "gamma", "lam", allow_zero=True)
        if self.stop_token not in ("eos", None):
            raise ValueError(f"stop_token must be eos or null, got {self.stop_token!r}")
        if self.batch_size % self.generations_per_prompt:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the "
                             f"{self.generations_per_prompt} responses sampled per prompt")
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_mini_batches={self.num_mini_batches}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be one of group, batch, none, got {self.scale_rewards!r}")
        if self.value_model not in ("separate", "shared", None):
            raise ValueError(f"value_model must be separate, shared or null, got {self.value_model!r}")
        if self.cliprange_high is not None and self.cliprange_high < self.cliprange:
            raise ValueError(f"cliprange_high={self.cliprange_high} is below cliprange={self.cliprange}")
        if self.kl_coef_value < 0:
            raise ValueError(f"{self.kl_coef_name} must be >= 0, got {self.kl_coef_value}")
        check_composition(self, self.generations_per_prompt)

    # What each algorithm names in its own (the papers' and TRL's) words.
    @property
    def diagnostic_level(self) -> str:
        """The level of the policy loss's clipfrac and approxkl: "sequence" for a loss whose action is the
        whole response (its part declares `per_sequence`), else "token". metrics.csv names a sequence-level
        column `<name>_seq`, so the alarms (analysis/alarms.py) judge it with the matching limits."""
        return "sequence" if parts.POLICY_LOSSES[self.policy_loss].per_sequence else "token"

    @property
    def epochs(self) -> int:
        """Passes over each rollout: PPO's num_ppo_epochs, GRPO's num_iterations."""
        raise TypeError(f"{type(self).__name__} must say how many passes an update makes (an `epochs` property)")

    @property
    def kl_coef_name(self) -> str:
        """The KL coefficient's field, as the algorithm's paper and TRL name it (kl_coef, beta)."""
        return "kl_coef"

    @property
    def kl_coef_value(self) -> float:
        return float(getattr(self, self.kl_coef_name, 0.0))

    @property
    def generations_per_prompt(self) -> int:
        return 1

    @property
    def shares_prompts(self) -> bool:
        """Whether passes over a rollout run each group's prompt once (`shared_prefix`)."""
        return self.shared_prefix and self.generations_per_prompt > 1

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.epochs * self.num_mini_batches

    @property
    def max_response_length(self) -> int:
        return self.response_length

    @property
    def loader_batch_size(self) -> int:  # prompts per rollout
        return self.batch_size // self.generations_per_prompt


@dataclass
class Rollout:
    """One scored rollout, as the update reads it: [B] or [B, T] tensors, B = batch_size responses."""
    ids: torch.Tensor  # prompt + response token ids [B, Q + T]
    mask: torch.Tensor  # their attention mask
    context_length: int  # Q: left-padded prompt width
    responses: torch.Tensor  # [B, T], padding after the stop token
    resp_mask: torch.Tensor  # [B, T] bool: tokens up to and including the stop token
    has_stop: torch.Tensor  # [B] bool
    logprobs: torch.Tensor  # [B, T] the sampler's log-probs (INVALID_LOGPROB at padding)
    ref_logprobs: torch.Tensor | None  # [B, T] the reference's, None when no KL is kept
    scores: torch.Tensor  # [B] reward (missing-EOS penalty applied)
    prompts: list[str]  # [B] prompt texts, each repeated generations_per_prompt times
    generator: torch.Generator  # this update's RNG (minibatch order)
