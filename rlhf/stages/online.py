"""What every online RL stage shares (PPO, GRPO, RLOO, REINFORCE++, GSPO, CISPO): rollout, reward,
reference log-probs, frozen models, the critic when one is configured, the update assembled from
registered parts (`rlhf/algorithms/parts.py`), rank reductions, per-update randomness, metrics,
export and the held-out evaluation.

A subclass is a named choice of parts: its config (extending `OnlineConfig`) sets the defaults of
`advantage_estimator`, `policy_loss`, `loss_agg_mode`, `kl_in` and `kl_estimator`, and names its
group size, epochs and KL coefficient. `training_step` is the loop every algorithm runs:

    1. rollout     sample `generations_per_prompt` responses per prompt; the sampler's logits
                   give the old log-probs
    2. score       reward (reward model and/or reward functions), missing-EOS penalty, reference
                   log-probs -> a `Rollout`
    3. update      values (critic), the KL placement, advantages, then `epochs` shuffled passes of
                   `num_mini_batches` optimizer steps on the policy loss (+ value loss)
    4. bookkeeping metrics shared by every algorithm, the reference CSV row, samples
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from rlhf.algorithms import core
from rlhf.algorithms.parts import PER_LEVEL
from rlhf.algorithms.ppo import AdaptiveKLController, FixedKLController
from rlhf.errors import ConfigError, UserError
from rlhf.evaluation.gold import gold_scores
from rlhf.models.causal_lm import ModelConfig, freeze, load_causal_lm, lower_matmul_weights
from rlhf.models.lora import reference_policy
from rlhf.models.reward import load_reward_model, reward_scores
from rlhf.models.sampling import response_logprobs, sample
from rlhf.models.tokenizer import load_tokenizer
from rlhf.stages.base import Inputs, Stage
from rlhf.stages.common import adamw, clip_each, export_hf
from rlhf.stages.guards import check_finite
from rlhf.stages.online_config import OnlineConfig, Rollout
from rlhf.stages.online_update import OnlineUpdate

__all__ = ["OnlineConfig", "OnlineRLModule", "Rollout"]


class OnlineRLModule(OnlineUpdate, Stage):
    data_mode = "prompts"
    needs = ("policy", "reward")
    produces = "policy"
    kl_field = "kl_coef"
    headline = ("gold_reward_before", "gold_reward_after", "gold_win_rate", "kl_final", "reward_before",
                "reward_after", "rm_win_rate", "best_step", "best_metric")
    csv_columns = ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score", "learning_rate",
                   "batch_size", "timestamp"]  # the reference schema notebooks read
    evaluates_policy = True
    frozen = ("ref_policy.", "reward_model.")  # rebuilt from their exports: never in checkpoints

    @classmethod
    def saved_models(cls, conf: OnlineConfig) -> int:
        return 2 if conf.value_model == "separate" else 1  # the critic is a whole second model

    def __init__(self, cfg: OnlineConfig, model: ModelConfig, inputs: Inputs):
        super().__init__()
        self.automatic_optimization = False  # epochs/minibatches are written out in `update`
        self.strict_loading = False  # checkpoints omit the frozen reference and reward models
        self.cfg, self.model_cfg = cfg, model
        self.tokenizer = load_tokenizer(inputs.policy or model.tokenizer)
        self.policy = load_causal_lm(model, inputs.policy)
        # With LoRA the reference is the policy with its adapter off (`ref_logprobs`): no second copy.
        # Without a KL (GRPO's beta 0) none is kept during training; `finish` loads the start policy
        # again for the evaluation, unless it has no export to load from (random weights).
        self.policy_init = inputs.policy
        keep = not model.lora and (self.uses_reference or inputs.policy is None)
        self.ref_policy = freeze(copy.deepcopy(self.policy)) if keep else None
        self.reward_model = self.rm_tokenizer = None
        self.same_tokenizer = True
        if inputs.reward_model:
            self.reward_model = freeze(load_reward_model(model, inputs.reward_model, self.tokenizer.pad_token_id))
            self.rm_tokenizer = load_tokenizer(inputs.reward_model)
            # A reward model with another vocabulary gets text: decode, then re-encode with its tokenizer.
            self.same_tokenizer = self.rm_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            self.rm_tokenizer.truncation_side = "left"  # an over-long input loses old context, not the response
        self.reward_fns = inputs.reward_fns
        self.reward_model_weight = inputs.reward_model_weight
        self.reward_init = inputs.reward_model
        self.gold, self.verify = inputs.gold, inputs.verify
        self.stop_id = self.tokenizer.eos_token_id if cfg.stop_token == "eos" else None
        if cfg.value_model == "separate":
            # Initialised from the reward model (N+ details), which must read the policy's tokens;
            # without one (reward functions) or with another vocabulary it starts from the policy.
            value_init = inputs.reward_model if inputs.reward_model and self.same_tokenizer else inputs.policy
            self.value_model = load_reward_model(model, value_init, self.tokenizer.pad_token_id)
        elif cfg.value_model == "shared":
            self.value_head = nn.Linear(self.policy.config.hidden_size, 1)
            nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(self.policy.config.hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)
        coef = cfg.kl_coef_value
        self.kl_ctl = (AdaptiveKLController(coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(coef))
        self.episodes = 0
        self.seed = torch.initial_seed()  # the run seed: the pipeline seeds every stage before building it
        self.phase_seconds: dict[str, float] = {}  # generation / scoring / training wall time, summed
        self._grad_norms: dict[str, list[torch.Tensor]] = {}  # pre-clip norms of this update's steps
        self._gap_warned = False
        self._last_tick = time.perf_counter()

    @property
    def uses_reference(self) -> bool:
        """A KL in the reward keeps the reference even at coefficient 0 (its KL is still logged); a KL
        term in the loss at 0 (GRPO's beta 0, as TRL) or no KL loads none."""
        return self.cfg.kl_in == "reward" or (self.cfg.kl_in == "loss" and self.cfg.kl_coef_value > 0)

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps per update, derived from the settings (epochs x minibatches), never set by hand."""
        return self.cfg.optimizer_steps_per_update

    @classmethod
    def preflight(cls, conf, plan, cfg) -> None:
        if cfg.trainer.get("gradient_clip_val"):
            raise ConfigError(f"trainer.gradient_clip_val: the {cls.name} stage steps its optimizer itself, where "
                              f"Lightning clips nothing; use {cls.name}.max_grad_norm")
        if conf.decode_graph and (cfg.trainer.get("accelerator") not in ("gpu", "cuda", "auto", None)
                                  or not torch.cuda.is_available()):
            raise ConfigError(f"{cls.name}.decode_graph=true captures the decode step in a CUDA graph and needs CUDA "
                              f"(trainer.accelerator={cfg.trainer.get('accelerator')}, CUDA available: "
                              f"{torch.cuda.is_available()})")

    # ----- optimisation -----
    def trained_models(self) -> dict[str, list[nn.Parameter]]:
        """Each trained model's parameters, clipped separately (`max_grad_norm`)."""
        models = {"policy": list(self.policy.parameters())}
        if self.cfg.value_model is not None:
            critic = self.value_model if self.cfg.value_model == "separate" else self.value_head
            models["value"] = list(critic.parameters())
        return models

    def configure_optimizers(self):
        opt = adamw(self.parameters(), self.trainer, self.cfg.weight_decay, lr=self.cfg.lr, eps=self.cfg.adam_eps)
        total = self.trainer.max_steps // self.optimizer_steps_per_batch
        anneal = (lambda u: max(0.0, 1.0 - u / max(total, 1))) if self.cfg.anneal_lr else (lambda u: 1.0)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, anneal)}

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls this after backward and (fp16) after unscaling, so the gradients are true.
        if not self.cfg.max_grad_norm:
            return
        if self._trainer is not None and isinstance(self._trainer.strategy, pl.strategies.FSDPStrategy):
            # Sharded gradients need FSDP's own norm, which Lightning computes over all parameters at once.
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.max_grad_norm, gradient_clip_algorithm="norm")
            return
        for name, norm in clip_each(self.trained_models(), self.cfg.max_grad_norm).items():
            self._grad_norms.setdefault(name, []).append(norm.detach())

    def checked_backward(self, loss: torch.Tensor) -> None:
        check_finite(self, self.name.upper(), loss=loss.detach())  # before any gradient reaches the optimizer
        self.manual_backward(loss)

    # ----- data parallelism and randomness -----
    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="mean") if self.trainer.world_size > 1 else t

    @property
    def update_index(self) -> int:
        return self.trainer.fit_loop.epoch_loop._batches_that_stepped

    def update_generator(self) -> torch.Generator:
        """The RNG of one update, seeded from (run seed, rank, update number).

        Ranks draw different responses, and a resumed run draws exactly what the uninterrupted
        run would have: no RNG state has to be carried in the checkpoint.
        """
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.global_rank * 7_919 + self.update_index) % 2**63)
        return g

    def tick(self, phase: str | None) -> None:
        """Adds the wall time since the previous tick to `phase_seconds[phase]` (None starts a clock)."""
        now = time.perf_counter()
        if phase is not None:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - self._last_tick
        self._last_tick = now

    # ----- model calls -----
    def ref_logprobs(self, ids, mask, context_length, responses):
        """Log-probs of the responses under the reference: the frozen copy, or the policy with its LoRA adapter off."""
        with reference_policy(self.policy, self.ref_policy) as ref:
            return response_logprobs(ref, ids, mask, context_length, responses, self.cfg.temperature,
                                     shared_prefix=self.cfg.shares_prompts)

    @torch.no_grad()
    def score(self, queries, qmask, responses, resp_mask, prompts: list[str]) -> torch.Tensor:
        """The reward of each (prompt, response): reward model (normalised) and/or reward functions, weighted."""
        content = resp_mask.clone()
        if self.stop_id is not None:
            content &= responses != self.stop_id  # the stop token itself is not scored
        total = torch.zeros(len(prompts), device=self.device)
        if self.reward_model is not None:
            total += self.reward_model_weight * self._rm_scores(queries, qmask, responses, content, prompts)
        if self.reward_fns is not None:
            texts = [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, content)]
            update = self.update_index + 1 if self._trainer is not None else 0
            total += self.reward_fns(list(prompts), texts, update).to(self.device)
        return total

    def _rm_scores(self, queries, qmask, responses, content, prompts):
        if self.same_tokenizer:
            ids = torch.cat([queries, responses], 1)
            return reward_scores(self.reward_model, ids, torch.cat([qmask, content.long()], 1),
                                 prompt_length=self.shared_prompt(queries.shape[1]))
        texts = [p + self.tokenizer.decode(r[m]) for p, r, m in zip(prompts, responses, content)]
        enc = self.rm_tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=getattr(self.reward_model.config, "n_positions", 1024)).to(self.device)
        return reward_scores(self.reward_model, enc.input_ids, enc.attention_mask)

    # ----- the loop every algorithm runs -----
    def training_step(self, batch, batch_idx):
        c = self.cfg
        n = c.generations_per_prompt
        queries, qmask = batch["input_ids"], batch["attention_mask"]
        if queries.shape[0] * n != c.batch_size:
            raise UserError(f"rollout batch has {queries.shape[0]} prompts x {n} responses, expected "
                            f"{self.name}.batch_size={c.batch_size}")
        prompts = list(batch["prompt"])
        if n > 1:  # a group of responses per prompt, laid out consecutively
            queries, qmask = queries.repeat_interleave(n, 0), qmask.repeat_interleave(n, 0)
            prompts = [p for p in prompts for _ in range(n)]
        Q = queries.shape[1]
        self.tick(None)
        # 1. Rollout: sample responses; generation's own logits give the old log-probs, step by step.
        self.policy.eval()
        gen = self.update_generator()
        responses, logprobs = sample(self.policy, queries, qmask, c.response_length, c.temperature,
                                     self.tokenizer.pad_token_id, self.stop_id, generator=gen, logprobs=True,
                                     shared_prefix=c.shares_prompts, graph=c.decode_graph)
        responses, resp_mask, has_stop = core.truncate_after_stop(responses, self.stop_id, self.tokenizer.pad_token_id)
        ids = torch.cat([queries, responses], 1)
        mask = torch.cat([qmask, resp_mask.long()], 1)
        with torch.no_grad():
            self.tick("generation")
            # 2. Score: reward, missing-EOS penalty, reference log-probs.
            scores = self.score(queries, qmask, responses, resp_mask, prompts)
            if c.missing_eos_penalty is not None and self.stop_id is not None:
                scores = scores - c.missing_eos_penalty * (~has_stop).float()
            logprobs = torch.where(resp_mask, logprobs, core.INVALID_LOGPROB)
            ref = None
            if self.uses_reference:
                ref = torch.where(resp_mask, self.ref_logprobs(ids, mask, Q, responses), core.INVALID_LOGPROB)
        check_finite(self, self.name.upper(), scores=scores)
        self.tick("scoring")
        roll = Rollout(ids=ids, mask=mask, context_length=Q, responses=responses, resp_mask=resp_mask,
                       has_stop=has_stop, logprobs=logprobs, ref_logprobs=ref, scores=scores, prompts=prompts,
                       generator=gen)
        # 3. The algorithm: advantages, losses, optimizer steps.
        self.policy.train()
        self._grad_norms = {}
        metrics = self.update(roll)
        self.lr_schedulers().step()
        self.tick("training")
        # 4. Bookkeeping.
        self.episodes += c.batch_size * self.trainer.world_size
        self.log_update(roll, metrics)

    # metrics.csv: the reference schema's columns, then these extra ones, each from the metric named
    # (a column is written only when the update logged its metric).
    CSV_FROM_METRICS = {"policy_loss": "loss/policy_avg", "value_loss": "loss/value_avg",
                        "kl_divergence": "objective/kl", "kl_coef": "objective/kl_coef",
                        "approxkl": "policy/approxkl_avg", "clipfrac": "policy/clipfrac_avg",
                        "logprob_gap_max": "policy/logprob_gap_max"}

    def log_update(self, roll: Rollout, metrics: dict) -> None:
        """Shared objective/* metrics plus the update's, logged as global means; the CSV row; samples."""
        resp_mask, scores = roll.resp_mask, roll.scores
        lr = self.lr_schedulers().get_last_lr()[0]
        texts = [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(roll.responses, resp_mask)]
        m = {"objective/scores": scores.mean(), "objective/entropy": (-roll.logprobs * resp_mask).sum(1).mean(),
             "objective/eos_frac": roll.has_stop.float().mean(),
             "objective/response_length": resp_mask.sum(1).float().mean(), "lr": lr, "episode": float(self.episodes)}
        if roll.ref_logprobs is not None:  # k1 per sequence, unless the KL placement logged its own estimate
            kl = torch.where(resp_mask, roll.logprobs - roll.ref_logprobs, 0.0)
            m["objective/kl"] = kl.sum(1).mean()
        m.update(metrics)
        for name, norms in self._grad_norms.items():  # before clipping, mean over the update's steps
            m[f"{name}/grad_norm"] = torch.stack(norms).mean()
        if self.gold is not None:
            m["objective/gold_scores"] = sum(gold_scores(self.gold, roll.prompts, texts)) / len(texts)
        m = {k: float(v) for k, v in m.items()}
        if self.trainer.world_size > 1:  # one all-reduce for all metrics: logs and the CSV show global means
            keys = list(m)
            means = self.mean_over_ranks(torch.tensor([m[k] for k in keys], dtype=torch.float64, device=self.device))
            m = dict(zip(keys, means.tolist()))
            m["episode"] = float(self.episodes)
        self.log_dict(m, prog_bar=False)
        self.log("reward", m["objective/scores"], prog_bar=True)
        row = {"policy_loss": "", "value_loss": "", "kl_divergence": "",
               "reward_score": m["objective/scores"], "learning_rate": lr,
               "batch_size": len(roll.prompts) * self.trainer.world_size, "entropy": m["objective/entropy"],
               "response_length": m["objective/response_length"], "episode": self.episodes,
               "gold_score": m.get("objective/gold_scores", "")}
        level = self.cfg.diagnostic_level
        row.update({col + ("_seq" if col in PER_LEVEL and level == "sequence" else ""): m[name]
                    for col, name in self.CSV_FROM_METRICS.items() if name in m})
        self.csv_row = row
        step = self.update_index
        if step % self.cfg.sample_every == 0:
            self._log_samples(roll.prompts, texts, scores, step)

    def _log_samples(self, prompts, texts, scores, step):
        from pytorch_lightning.loggers import TensorBoardLogger

        rows = "\n".join(f"| {p[-120:]!r} | {t!r} | {s:.3f} |" for p, t, s in list(zip(prompts, texts, scores.tolist()))[:8])
        table = "| prompt (end) | response | score |\n|---|---|---|\n" + rows
        for lg in self.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_text("samples", table, step)

    def on_fit_start(self):
        # Lightning warns that checkpoints of manually optimised modules hold the weights after the
        # step. Here that is the point: a checkpoint after update N resumes at update N + 1.
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        if hasattr(self.gold, "to"):  # a reward model playing gold scores on the training device
            self.gold.to(self.device)
        # Under bf16-mixed the frozen models' matmuls run in bf16 anyway: hold those weights in bf16
        # once (same numbers, ~340 MB less for GPT-2 small). `finish` runs under the same autocast.
        if self.trainer.precision == "bf16-mixed":
            for frozen in (self.ref_policy, self.reward_model):
                if frozen is not None:
                    lower_matmul_weights(frozen)

    # ----- checkpoint state beyond the weights -----
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.frozen)}
        checkpoint["episodes"] = self.episodes
        checkpoint["kl_ctl"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.episodes = checkpoint.get("episodes", 0)
        self.kl_ctl.load_state_dict(checkpoint.get("kl_ctl", {"value": self.cfg.kl_coef_value}))

    def export(self, stage_dir: Path) -> Path:
        """The policy in HF format under `stage_dir/model`, and a separate critic under `stage_dir/value_model`."""
        out = export_hf(self.policy, self.tokenizer, stage_dir / "model")
        if self.cfg.value_model == "separate":
            export_hf(self.value_model, self.tokenizer, stage_dir / "value_model")
        return out

    def ensure_reference(self) -> None:
        """The start policy, to evaluate against, when training kept none (GRPO with beta 0)."""
        if self.ref_policy is None and not self.model_cfg.lora:
            self.ref_policy = freeze(load_causal_lm(self.model_cfg, self.policy_init)).to(self.device)

    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        from rlhf.evaluation.held_out import compare_policies

        out = self.export(Path(stage_dir))
        self.ensure_reference()
        with self.trainer.precision_plugin.forward_context():  # the precision training ran in
            result = compare_policies(self, dm, self.cfg.eval_prompts)
        return {**result, "model_dir": str(out), "metrics_csv": str(Path(stage_dir) / "metrics.csv")}

