"""Stage 3, PPO: optimise the policy against the frozen reward model, with a KL penalty to a frozen
reference copy of the starting policy.

    python train.py stage=ppo algo.reward_model_path=RUN/rm/model algo.policy_path=RUN/sft/model

Follows TRL's PPOTrainer and "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024):
per-token KL penalty, reward-model score at the last token, GAE, whitened advantages, clipped
policy and value losses, EOS truncation with a missing-EOS penalty, dropout off, linear LR anneal.
One `training_step` is one rollout batch; its PPO epochs and minibatches run inside it.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from rlhf.algorithms import ppo as F
from rlhf.errors import ConfigError, UserError
from rlhf.models.causal_lm import ModelConfig, freeze, head_fp32, load_causal_lm, lower_matmul_weights
from rlhf.models.lora import reference_policy
from rlhf.models.reward import check_reward_model, load_reward_model, reward_scores, token_values
from rlhf.models.sampling import backbone_hidden, response_logits, sample
from rlhf.models.tokenizer import load_tokenizer
from rlhf.stages.common import StageConfig, adamw, clip_each, export_hf
from rlhf.stages.guards import check_finite


@dataclass
class PPOConfig(StageConfig):
    _target_: str = "rlhf.stages.ppo.PPOModule"  # the LightningModule Hydra instantiates
    lr: float = 3e-4  # AdamW learning rate (policy and value model), annealed linearly to 0
    anneal_lr: bool = True  # linear decay of lr over max_steps, stepped by hand once per update
    adam_eps: float = 1e-5  # the N+ details use 1e-5 rather than 1e-8
    weight_decay: float = 0.0  # AdamW decay on weight matrices (never biases/norms); 0 as TRL and the N+ details
    max_grad_norm: float | None = 1.0  # per minibatch step, policy and value model each clipped to it; null disables
    batch_size: int = 32  # episodes (prompts) per rollout = per PPO update
    num_mini_batches: int = 1  # minibatches per PPO epoch; must divide batch_size
    num_ppo_epochs: int = 4  # passes over each rollout batch
    max_steps: int = 100  # PPO updates (trainer.max_steps overrides)
    max_prompt_length: int = 64  # prompt tokens kept (the last ones), left-padded
    response_length: int = 16  # tokens sampled per response
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature too
    stop_token: str | None = "eos"  # responses are truncated after the first one; null: no truncation
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of responses without stop token
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty
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
    policy_path: str | None = None  # start policy (HF dir); default: SFT output, else the model config
    reward_model_path: str | None = None  # reward model (HF dir); default: this run's RM output
    sample_every: int = 10  # log prompt/response samples as TensorBoard text every N updates
    eval_prompts: int = 200  # held-out prompts for the before/after gold evaluation
    # Warn when a rollout's log-probs and the first training forward's differ by more (nats, max over
    # tokens, before any step): precision or kernel differences that would make PPO ratios start off 1.
    logprob_gap_warn: float = 0.05

    def __post_init__(self):
        self.check_positive("lr", "batch_size", "num_mini_batches", "num_ppo_epochs", "max_steps",
                            "max_prompt_length", "response_length", "temperature", "kl_horizon",
                            "sample_every", "eval_prompts", "adam_eps", "logprob_gap_warn")
        self.check_positive("weight_decay", "kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", allow_zero=True)
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_mini_batches={self.num_mini_batches}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.value_model not in ("separate", "shared"):
            raise ValueError(f"value_model must be separate or shared, got {self.value_model!r}")
        if self.stop_token not in ("eos", None):
            raise ValueError(f"stop_token must be eos or null, got {self.stop_token!r}")

    @property
    def max_response_length(self) -> int:
        return self.response_length

    @property
    def mini_batch_size(self) -> int:
        return self.batch_size // self.num_mini_batches


class PPOModule(pl.LightningModule):
    data_mode = "prompts"
    Config = PPOConfig

    def __init__(self, model: dict, policy_init: str | None = None, reward_init: str | None = None, **algo):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # the PPO epochs/minibatches are written out below
        self.strict_loading = False  # checkpoints omit the frozen reference and reward models
        self.cfg = c = PPOConfig.from_dict(algo, "algo")
        self.model_cfg = ModelConfig.from_dict(dict(model))
        self.tokenizer = load_tokenizer(policy_init or self.model_cfg.tokenizer)
        self.policy = load_causal_lm(self.model_cfg, policy_init)
        # With LoRA the reference is the policy with its adapter off (`_ref_logprobs`): no second copy.
        self.ref_policy = None if self.model_cfg.lora else freeze(copy.deepcopy(self.policy))
        self.reward_model = freeze(load_reward_model(self.model_cfg, reward_init, self.tokenizer.pad_token_id))
        self.rm_tokenizer = load_tokenizer(reward_init)
        # A reward model with another vocabulary gets text: decode, then re-encode with its tokenizer.
        self.same_tokenizer = self.rm_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        self.rm_tokenizer.truncation_side = "left"  # an over-long input loses old context, not the response
        if c.value_model == "separate":
            # Initialised from the reward model (N+ details), which must read the policy's tokens;
            # with another vocabulary the value model starts from the policy instead.
            value_init = reward_init if self.same_tokenizer else policy_init
            self.value_model = load_reward_model(self.model_cfg, value_init, self.tokenizer.pad_token_id)
        else:
            self.value_head = nn.Linear(self.policy.config.hidden_size, 1)
            nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(self.policy.config.hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)
        if c.adaptive_kl:
            self.kl_ctl = F.AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon)
        else:
            self.kl_ctl = F.FixedKLController(c.kl_coef)
        self.stop_id = self.tokenizer.eos_token_id if c.stop_token == "eos" else None
        self.optimizer_steps_per_batch = c.num_ppo_epochs * c.num_mini_batches
        self.csv_columns = ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score", "learning_rate",
                            "batch_size", "timestamp"]  # the reference schema notebooks read
        self.gold = None  # a ground-truth scorer (prompt, response) -> float, set by the pipeline if known
        self.episodes = 0
        self.seed = torch.initial_seed()  # the run seed: the pipeline seeds every stage before building it
        self.phase_seconds: dict[str, float] = {}  # generation / scoring / training wall time, summed
        self._grad_norms: dict[str, list[torch.Tensor]] = {}  # pre-clip norms of this update's steps
        self._gap_warned = False
        self._last_tick = time.perf_counter()

    # ----- config plumbing -----
    @staticmethod
    def preflight(conf: PPOConfig, stages: list[str]) -> None:
        if conf.reward_model_path is None and "rm" not in stages:
            raise ConfigError("stage=ppo needs a reward model: set algo.reward_model_path=DIR (an rm stage export)")
        if conf.reward_model_path is not None:
            try:
                check_reward_model(conf.reward_model_path)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"algo.reward_model_path: {e}") from None
        if conf.policy_path is not None and not (Path(conf.policy_path) / "config.json").is_file():
            raise ConfigError(f"algo.policy_path '{conf.policy_path}' has no config.json (not a saved model)")

    @staticmethod
    def init_kwargs(conf: PPOConfig, artifacts: dict, tokenizer, cfg) -> dict:
        return {"policy_init": conf.policy_path or artifacts.get("sft"),
                "reward_init": conf.reward_model_path or artifacts.get("rm")}

    def configure_optimizers(self):
        opt = adamw(self.parameters(), self.trainer, self.cfg.weight_decay, lr=self.cfg.lr, eps=self.cfg.adam_eps)
        total = self.trainer.max_steps // self.optimizer_steps_per_batch
        anneal = (lambda u: max(0.0, 1.0 - u / max(total, 1))) if self.cfg.anneal_lr else (lambda u: 1.0)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, anneal)}

    def _trained_models(self) -> dict[str, list[nn.Parameter]]:
        value = self.value_model if self.cfg.value_model == "separate" else self.value_head
        return {"policy": list(self.policy.parameters()), "value": list(value.parameters())}

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls this after backward and (fp16) after unscaling, so the gradients are true.
        if not self.cfg.max_grad_norm:
            return
        if self._trainer is not None and isinstance(self._trainer.strategy, pl.strategies.FSDPStrategy):
            # Sharded gradients need FSDP's own norm, which Lightning computes over all parameters at once.
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.max_grad_norm, gradient_clip_algorithm="norm")
            return
        for name, norm in clip_each(self._trained_models(), self.cfg.max_grad_norm).items():
            self._grad_norms.setdefault(name, []).append(norm.detach())

    # ----- data parallelism and randomness -----
    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="mean") if self.trainer.world_size > 1 else t

    def _update_generator(self) -> torch.Generator:
        """The RNG of one PPO update, seeded from (run seed, rank, update number).

        Ranks draw different responses, and a resumed run draws exactly what the uninterrupted
        run would have: no RNG state has to be carried in the checkpoint.
        """
        update = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.global_rank * 7_919 + update) % 2**63)
        return g

    # ----- model calls -----
    def _ref_logprobs(self, ids, mask, context_length, responses):
        """Log-probs of the responses under the reference: the frozen copy, or the policy with its LoRA adapter off."""
        with reference_policy(self.policy, self.ref_policy) as ref:
            logits = response_logits(ref, ids, mask, context_length)
        return F.logprobs_from_logits(logits, responses, self.cfg.temperature)

    def _tick(self, phase: str | None) -> None:
        """Adds the wall time since the previous tick to `phase_seconds[phase]` (None starts a clock).

        `python -m rlhf.bench` reads the split; the cost is one clock read per phase.
        """
        now = time.perf_counter()
        if phase is not None:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - self._last_tick
        self._last_tick = now

    def _backward(self, loss: torch.Tensor) -> None:
        check_finite(self, "PPO", loss=loss.detach())  # before any gradient reaches the optimizer
        self.manual_backward(loss)

    def _values(self, ids, mask, context_length, hidden=None):
        """V(state before each response token), in the normalised reward's units, [B, R].

        A value model initialised from the reward model then starts out predicting the score PPO
        will receive (N+ details): at a response's stop token its value is that response's score.
        """
        if self.cfg.value_model == "separate":
            return token_values(self.value_model, ids, mask, normalize=True)[:, context_length - 1 : -1]
        return head_fp32(self.value_head, hidden[:, context_length - 1 : -1]).squeeze(-1)

    @torch.no_grad()
    def score(self, queries, qmask, responses, resp_mask, prompts: list[str]) -> torch.Tensor:
        """Reward-model score of each (prompt, response); the stop token itself is not scored."""
        content = resp_mask.clone()
        if self.stop_id is not None:
            content &= responses != self.stop_id
        if self.same_tokenizer:
            ids = torch.cat([queries, responses], 1)
            return reward_scores(self.reward_model, ids, torch.cat([qmask, content.long()], 1))
        texts = [p + self.tokenizer.decode(r[m]) for p, r, m in zip(prompts, responses, content)]
        enc = self.rm_tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=getattr(self.reward_model.config, "n_positions", 1024)).to(self.device)
        return reward_scores(self.reward_model, enc.input_ids, enc.attention_mask)

    # ----- the PPO update -----
    def training_step(self, batch, batch_idx):
        c = self.cfg
        queries, qmask = batch["input_ids"], batch["attention_mask"]
        B, Q = queries.shape
        if B != c.batch_size:
            raise UserError(f"rollout batch has {B} prompts, expected algo.batch_size={c.batch_size}")

        self._tick(None)
        # 1. Rollout: sample responses; generation's own logits give the old log-probs.
        self.policy.eval()
        gen = self._update_generator()
        responses, gen_logits = sample(self.policy, queries, qmask, c.response_length, c.temperature,
                                       self.tokenizer.pad_token_id, self.stop_id, generator=gen)
        responses, resp_mask, has_stop = F.truncate_after_stop(responses, self.stop_id, self.tokenizer.pad_token_id)
        ids = torch.cat([queries, responses], 1)
        mask = torch.cat([qmask, resp_mask.long()], 1)
        with torch.no_grad():
            logprobs = F.logprobs_from_logits(gen_logits, responses, c.temperature)
            del gen_logits
            self._tick("generation")
            # 2. Score: reference log-probs, values and reward-model scores, one batched pass each.
            ref_logprobs = self._ref_logprobs(ids, mask, Q, responses)
            hidden = backbone_hidden(self.policy, ids, mask) if c.value_model == "shared" else None
            values = self._values(ids, mask, Q, hidden)
            scores = self.score(queries, qmask, responses, resp_mask, batch["prompt"])
            if c.missing_eos_penalty is not None and self.stop_id is not None:
                scores = scores - c.missing_eos_penalty * (~has_stop).float()

            # 3. Rewards and advantages: KL penalty per token, score at the last token, GAE, whitening.
            logprobs = torch.where(resp_mask, logprobs, F.INVALID_LOGPROB)
            ref_logprobs = torch.where(resp_mask, ref_logprobs, F.INVALID_LOGPROB)
            rewards, kl, non_score = F.compute_rewards(scores, logprobs, ref_logprobs, resp_mask,
                                                       self.kl_ctl.value, c.kl_estimator)
            if c.whiten_rewards:
                rewards = F.masked_whiten(rewards, resp_mask, shift_mean=False, all_reduce=self._sum_over_ranks)
            values = torch.where(resp_mask, values, 0.0)
            advantages, returns = F.gae(rewards, values, resp_mask, c.gamma, c.lam)
            advantages = F.masked_whiten(advantages, resp_mask, all_reduce=self._sum_over_ranks)
        check_finite(self, "PPO", scores=scores, kl=kl, advantages=advantages)
        self._tick("scoring")

        # 4. PPO epochs over shuffled minibatches, one optimizer step each.
        self.policy.train()
        opt = self.optimizers()
        stats: dict[str, list] = {k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio", "entropy")}
        gap = None
        self._grad_norms = {}
        for _ in range(c.num_ppo_epochs):
            for mb in torch.randperm(B, device=self.device, generator=gen).split(c.mini_batch_size):
                h = backbone_hidden(self.policy, ids[mb], mask[mb])
                new_logits = response_logits(self.policy, ids[mb], mask[mb], Q, hidden=h)
                new_logprobs = F.logprobs_from_logits(new_logits, responses[mb], c.temperature)
                if gap is None:  # the first minibatch runs before any optimizer step: ratios must be exactly 1
                    gap = self._logprob_gap(new_logprobs.detach(), logprobs[mb], resp_mask[mb])
                pg_loss, pg = F.policy_loss(new_logprobs, logprobs[mb], advantages[mb], resp_mask[mb], c.cliprange)
                # The models share no weight, so two backward passes give the same gradients as one, and the
                # policy's graph (activations, bf16 weight casts) is freed before the value model runs: GPT-2
                # small peaks ~300 MB lower. DDP's gradient reducer wants one backward per step.
                separate = c.value_model == "separate" and self.trainer.world_size == 1
                if separate:
                    self._backward(pg_loss)
                vpred = self._values(ids[mb], mask[mb], Q, h)
                vf_loss, vf = F.value_loss(vpred, values[mb], returns[mb], resp_mask[mb], c.cliprange_value)
                self._backward(c.vf_coef * vf_loss if separate else pg_loss + c.vf_coef * vf_loss)
                opt.step()  # clips each model's gradients first (`on_before_optimizer_step`)
                opt.zero_grad(set_to_none=True)  # freed now, not held through the next rollout; next backward starts clean
                with torch.no_grad():
                    ent = F.masked_mean(F.entropy_from_logits(new_logits.detach(), c.temperature), resp_mask[mb])
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("pg_clipfrac", pg["clipfrac"]),
                             ("vf_clipfrac", vf["clipfrac"]), ("approxkl", pg["approxkl"]), ("ratio", pg["ratio"]),
                             ("entropy", ent)):
                    stats[k].append(v.detach())
        self.lr_schedulers().step()
        self._tick("training")

        # 5. Bookkeeping: KL controller, metrics, samples.
        # Under DDP every rank must keep the same coefficient: it follows the global mean KL.
        world = self.trainer.world_size
        mean_kl = self._mean_over_ranks(kl.sum(1).mean().detach().double())
        self.kl_ctl.update(mean_kl.item(), B * world)
        self.episodes += B * world
        self._log_update(stats, scores, kl, non_score, logprobs, resp_mask, has_stop, batch["prompt"], responses, gap)

    def _logprob_gap(self, new_logprobs, old_logprobs, resp_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and max |training forward - rollout| log-prob of the same tokens, before any step.

        Should be ~1e-6 (float rounding): anything larger means the sampler and the training forward
        compute different distributions (low-precision heads, another attention kernel), and every
        PPO ratio starts away from 1. Warns once per run above `logprob_gap_warn`.
        """
        diff = torch.where(resp_mask, (new_logprobs - old_logprobs).abs(), 0.0)
        mean, worst = F.masked_mean(diff, resp_mask), diff.max()
        if not self._gap_warned and worst.item() > self.cfg.logprob_gap_warn:
            self._gap_warned = True
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"policy/logprob_gap_max={worst.item():.3g} nats (> algo.logprob_gap_warn="
                           f"{self.cfg.logprob_gap_warn:g}): the rollout's log-probs differ from the training "
                           "forward's before any step, so PPO ratios start off 1; check precision and "
                           "model.attn_implementation")
        return mean, worst

    def _log_update(self, stats, scores, kl, non_score, logprobs, resp_mask, has_stop, prompts, responses, gap):
        avg = {k: torch.stack(v).mean() for k, v in stats.items()}
        mean_kl = kl.sum(1).mean()
        nsr = non_score.sum(1).mean()
        lr = self.lr_schedulers().get_last_lr()[0]
        texts = [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, resp_mask)]
        m = {"objective/kl": mean_kl, "objective/entropy": (-logprobs * resp_mask).sum(1).mean(),
             "objective/scores": scores.mean(), "objective/non_score_reward": nsr,
             "objective/rlhf_reward": scores.mean() + nsr, "objective/kl_coef": self.kl_ctl.value,
             "objective/eos_frac": has_stop.float().mean(), "objective/response_length": resp_mask.sum(1).float().mean(),
             "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["pg_clipfrac"],
             "policy/entropy_avg": avg["entropy"], "loss/policy_avg": avg["pg_loss"], "loss/value_avg": avg["vf_loss"],
             "value/clipfrac_avg": avg["vf_clipfrac"], "value/ratio": avg["ratio"], "lr": lr,
             "policy/logprob_gap": gap[0], "policy/logprob_gap_max": gap[1],
             "episode": float(self.episodes)}
        for name, norms in self._grad_norms.items():  # before clipping, mean over the update's steps
            m[f"{name}/grad_norm"] = torch.stack(norms).mean()
        if self.gold is not None:
            m["objective/gold_scores"] = sum(self.gold(p, t) for p, t in zip(prompts, texts)) / len(texts)
        m = {k: float(v) for k, v in m.items()}
        if self.trainer.world_size > 1:  # one all-reduce for all metrics: logs and the CSV show global means
            keys = list(m)
            means = self._mean_over_ranks(torch.tensor([m[k] for k in keys], dtype=torch.float64, device=self.device))
            m = dict(zip(keys, means.tolist()))
            m["episode"] = float(self.episodes)
        self.log_dict(m, prog_bar=False)
        self.log("reward", m["objective/scores"], prog_bar=True)
        self.csv_row = {"policy_loss": m["loss/policy_avg"], "value_loss": m["loss/value_avg"],
                        "kl_divergence": m["objective/kl"], "reward_score": m["objective/scores"],
                        "learning_rate": lr, "batch_size": len(prompts) * self.trainer.world_size,
                        "kl_coef": m["objective/kl_coef"],
                        "entropy": m["objective/entropy"], "approxkl": m["policy/approxkl_avg"],
                        "clipfrac": m["policy/clipfrac_avg"], "logprob_gap_max": m["policy/logprob_gap_max"],
                        "episode": self.episodes,
                        "gold_score": m.get("objective/gold_scores", "")}
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % self.cfg.sample_every == 0:
            self._log_samples(prompts, texts, scores, step)

    def _log_samples(self, prompts, texts, scores, step):
        from pytorch_lightning.loggers import TensorBoardLogger

        rows = "\n".join(f"| {p[-120:]!r} | {t!r} | {s:.3f} |" for p, t, s in list(zip(prompts, texts, scores.tolist()))[:8])
        table = "| prompt (end) | response | score |\n|---|---|---|\n" + rows
        for lg in self.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_text("samples", table, step)

    def on_fit_start(self):
        # Lightning warns that checkpoints of manually optimised modules hold the weights after the
        # step. For PPO that is the point: a checkpoint after update N resumes at update N + 1.
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        # Under bf16-mixed the frozen models' matmuls run in bf16 anyway: hold those weights in bf16
        # once (same numbers, ~340 MB less for GPT-2 small). `finish` runs under the same autocast.
        if self.trainer.precision == "bf16-mixed":
            for frozen in (self.ref_policy, self.reward_model):
                if frozen is not None:
                    lower_matmul_weights(frozen)

    # ----- checkpoint state beyond the weights -----
    def on_save_checkpoint(self, checkpoint):
        # The frozen models are rebuilt from their exports when the module is constructed:
        # leaving them out halves the checkpoint.
        frozen = ("ref_policy.", "reward_model.")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["kl_ctl"] = self.kl_ctl.state_dict()
        checkpoint["episodes"] = self.episodes

    def on_load_checkpoint(self, checkpoint):
        self.kl_ctl.load_state_dict(checkpoint.get("kl_ctl", {"value": self.cfg.kl_coef}))
        self.episodes = checkpoint.get("episodes", 0)

    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        from rlhf.evaluate import compare_policies

        out = export_hf(self.policy, self.tokenizer, Path(stage_dir) / "model")
        if self.cfg.value_model == "separate":
            export_hf(self.value_model, self.tokenizer, Path(stage_dir) / "value_model")
        with self.trainer.precision_plugin.forward_context():  # the precision training ran in
            result = compare_policies(self, dm, self.cfg.eval_prompts)
        return {**result, "model_dir": str(out), "metrics_csv": str(Path(stage_dir) / "metrics.csv")}
