"""Stage 3, PPO: optimise the policy against the reward, with a KL penalty to a frozen reference
copy of the starting policy.

    python train.py                      # SFT -> reward model -> PPO
    python train.py stage=ppo reward.model_path=RUN/rm/model ppo.policy_path=RUN/sft/model

Follows TRL's PPOTrainer and "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024):
per-token KL penalty, reward-model score at the last token, GAE, whitened advantages, clipped
policy and value losses, EOS truncation with a missing-EOS penalty, dropout off, linear LR anneal.
One `training_step` is one rollout batch (`rlhf/stages/online.py`); its PPO epochs and minibatches
run in `update`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.algorithms import core, ppo as F
from rlhf.models.causal_lm import head_fp32
from rlhf.models.reward import load_reward_model, token_values
from rlhf.models.sampling import backbone_hidden, response_logprobs
from rlhf.stages.common import export_hf
from rlhf.stages.guards import check_finite
from rlhf.stages.online import OnlineConfig, OnlineRLModule


@dataclass
class PPOConfig(OnlineConfig):
    num_mini_batches: int = 1  # minibatches per PPO epoch; must divide batch_size
    num_ppo_epochs: int = 4  # passes over each rollout batch
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty (the root kl_coef overrides it)
    kl_estimator: str = "k1"  # k1: log p/q (unbiased, can be < 0); k3: (r-1) - log r (>= 0)
    adaptive_kl: bool = False  # Ziegler et al. 2019 proportional controller on kl_coef
    target_kl: float = 6.0  # controller target for the mean sequence KL (nats)
    kl_horizon: int = 10000  # controller horizon in episodes
    whiten_rewards: bool = False  # whiten per-token rewards (no mean shift) before GAE
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value prediction clip around the rollout's values
    vf_coef: float = 0.1  # value loss weight
    value_model: str = "separate"  # separate: a copy of the reward model; shared: head on the policy

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("num_mini_batches", "num_ppo_epochs", "kl_horizon")
        self.check_positive("kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", allow_zero=True)
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_mini_batches={self.num_mini_batches}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.value_model not in ("separate", "shared"):
            raise ValueError(f"value_model must be separate or shared, got {self.value_model!r}")

    @property
    def mini_batch_size(self) -> int:
        return self.batch_size // self.num_mini_batches


class PPOModule(OnlineRLModule):
    name = "ppo"
    Config = PPOConfig
    title = "PPO policy"
    description = ("PPO (TRL-style, \"The N+ Implementation Details of RLHF with PPO\") against the reward, with a "
                   "per-token KL penalty (`kl_coef`) to the frozen SFT policy it started from, and a value model.")
    paper = "Schulman et al. 2017; Ouyang et al. 2022; Huang et al. 2024 (N+ details)"
    frozen = ("ref_policy.", "reward_model.")

    def __init__(self, cfg: PPOConfig, model, inputs):
        super().__init__(cfg, model, inputs)
        c = cfg
        if c.value_model == "separate":
            # Initialised from the reward model (N+ details), which must read the policy's tokens;
            # without one (reward functions) or with another vocabulary it starts from the policy.
            value_init = inputs.reward_model if inputs.reward_model and self.same_tokenizer else inputs.policy
            self.value_model = load_reward_model(model, value_init, self.tokenizer.pad_token_id)
        else:
            self.value_head = nn.Linear(self.policy.config.hidden_size, 1)
            nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(self.policy.config.hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)
        self.kl_ctl = (F.AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon) if c.adaptive_kl
                       else F.FixedKLController(c.kl_coef))
        self.optimizer_steps_per_batch = c.num_ppo_epochs * c.num_mini_batches

    def trained_models(self) -> dict[str, list[nn.Parameter]]:
        value = self.value_model if self.cfg.value_model == "separate" else self.value_head
        return {"policy": list(self.policy.parameters()), "value": list(value.parameters())}

    def _values(self, ids, mask, context_length, hidden=None):
        """V(state before each response token), in the normalised reward's units, [B, R].

        A value model initialised from the reward model then starts out predicting the score PPO
        will receive (N+ details): at a response's stop token its value is that response's score.
        """
        if self.cfg.value_model == "separate":
            return token_values(self.value_model, ids, mask, normalize=True)[:, context_length - 1 : -1]
        return head_fp32(self.value_head, hidden[:, context_length - 1 : -1]).squeeze(-1)

    def update(self, roll: dict) -> tuple[dict, dict]:
        c = self.cfg
        ids, mask, Q, responses = roll["ids"], roll["mask"], roll["context_length"], roll["responses"]
        resp_mask, logprobs, scores = roll["resp_mask"], roll["logprobs"], roll["scores"]
        B = ids.shape[0]
        with torch.no_grad():
            # 3a. Values, then rewards and advantages: KL penalty per token, score at the last token, GAE, whitening.
            self.policy.eval()
            hidden = backbone_hidden(self.policy, ids, mask) if c.value_model == "shared" else None
            values = self._values(ids, mask, Q, hidden)
            rewards, kl, non_score = F.compute_rewards(scores, logprobs, roll["ref_logprobs"], resp_mask,
                                                       self.kl_ctl.value, c.kl_estimator)
            if c.whiten_rewards:
                rewards = core.masked_whiten(rewards, resp_mask, shift_mean=False, all_reduce=self.sum_over_ranks)
            values = torch.where(resp_mask, values, 0.0)
            advantages, returns = F.gae(rewards, values, resp_mask, c.gamma, c.lam)
            advantages = core.masked_whiten(advantages, resp_mask, all_reduce=self.sum_over_ranks)
            self.policy.train()
        check_finite(self, "PPO", kl=kl, advantages=advantages)
        self.tick("scoring")

        # 3b. PPO epochs over shuffled minibatches, one optimizer step each.
        def step(mb):
            h = backbone_hidden(self.policy, ids[mb], mask[mb])
            new_logprobs, entropy = response_logprobs(self.policy, ids[mb], mask[mb], Q, responses[mb], c.temperature,
                                                      hidden=h, entropy=True)
            pg_loss, pg = F.policy_loss(new_logprobs, logprobs[mb], advantages[mb], resp_mask[mb], c.cliprange)
            # The models share no weight, so two backward passes give the same gradients as one, and the
            # policy's graph (activations, bf16 weight casts) is freed before the value model runs: GPT-2
            # small peaks ~300 MB lower. DDP's gradient reducer wants one backward per step.
            separate = c.value_model == "separate" and self.trainer.world_size == 1
            if separate:
                self.checked_backward(pg_loss)
            vpred = self._values(ids[mb], mask[mb], Q, h)
            vf_loss, vf = F.value_loss(vpred, values[mb], returns[mb], resp_mask[mb], c.cliprange_value)
            self.checked_backward(c.vf_coef * vf_loss if separate else pg_loss + c.vf_coef * vf_loss)
            with torch.no_grad():
                ent = core.masked_mean(entropy, resp_mask[mb])
            return new_logprobs, {"pg_loss": pg_loss, "vf_loss": vf_loss, "pg_clipfrac": pg["clipfrac"],
                                  "vf_clipfrac": vf["clipfrac"], "approxkl": pg["approxkl"], "ratio": pg["ratio"],
                                  "entropy": ent}

        avg = self.minibatch_steps(roll, c.num_ppo_epochs, c.num_mini_batches, step)

        # 3c. KL controller: under DDP every rank keeps the same coefficient, following the global mean KL.
        mean_kl = self.mean_over_ranks(kl.sum(1).mean().detach().double())
        self.kl_ctl.update(mean_kl.item(), B * self.trainer.world_size)
        nsr = non_score.sum(1).mean()
        m = {"objective/kl": kl.sum(1).mean(), "objective/non_score_reward": nsr,
             "objective/rlhf_reward": scores.mean() + nsr, "objective/kl_coef": self.kl_ctl.value,
             "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["pg_clipfrac"],
             "policy/entropy_avg": avg["entropy"], "loss/policy_avg": avg["pg_loss"], "loss/value_avg": avg["vf_loss"],
             "value/clipfrac_avg": avg["vf_clipfrac"], "value/ratio": avg["ratio"],
             "policy/logprob_gap": avg["logprob_gap"], "policy/logprob_gap_max": avg["logprob_gap_max"]}
        csv = {"policy_loss": "loss/policy_avg", "value_loss": "loss/value_avg", "kl_divergence": "objective/kl",
               "kl_coef": "objective/kl_coef", "approxkl": "policy/approxkl_avg", "clipfrac": "policy/clipfrac_avg",
               "logprob_gap_max": "policy/logprob_gap_max"}
        return m, csv

    # ----- checkpoint state beyond the weights -----
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_ctl"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.kl_ctl.load_state_dict(checkpoint.get("kl_ctl", {"value": self.cfg.kl_coef}))

    def export(self, stage_dir: Path) -> Path:
        out = super().export(stage_dir)
        if self.cfg.value_model == "separate":
            export_hf(self.value_model, self.tokenizer, stage_dir / "value_model")
        return out
