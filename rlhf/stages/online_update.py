"""The update of an online RL stage, assembled from the configured parts (`rlhf/algorithms/parts.py`):
the critic's values, the KL placement, the advantage estimator, then `epochs` shuffled passes of
`num_mini_batches` optimizer steps on the policy loss, its aggregation and the KL term (+ the value
loss). Mixed into `OnlineRLModule` (`rlhf/stages/online.py`), which owns the models and the loop.
"""
from __future__ import annotations

import torch

from rlhf.algorithms import core, parts
from rlhf.algorithms.ppo import AdaptiveKLController, compute_rewards, value_loss
from rlhf.models.causal_lm import head_fp32
from rlhf.models.reward import token_values
from rlhf.models.sampling import backbone_hidden, response_logprobs
from rlhf.stages.guards import check_finite
from rlhf.stages.online_config import Rollout


class OnlineUpdate:
    # ----- the update, assembled from the configured parts -----
    def shared_prompt(self, context_length: int) -> int | None:
        """The prompt length to share between rows with the same prompt (`backbone_hidden`), or None."""
        return context_length if self.cfg.shares_prompts else None

    def _values(self, ids, mask, context_length, hidden=None):
        """V(state before each response token), in the normalised reward's units, [B, R].

        A value model initialised from the reward model then starts out predicting the score the
        policy will receive (N+ details): at a response's stop token its value is that response's score.
        """
        if self.cfg.value_model == "separate":
            return token_values(self.value_model, ids, mask, normalize=True,
                                prompt_length=self.shared_prompt(context_length))[:, context_length - 1 : -1]
        return head_fp32(self.value_head, hidden[:, context_length - 1 : -1]).squeeze(-1)

    def advantage_inputs(self, roll: Rollout) -> tuple[parts.AdvantageInputs, dict]:
        """Values, the KL placement and the rewards the estimator reads; with the KL metrics."""
        c = self.cfg
        coef = self.kl_ctl.value
        values = None
        if c.value_model is not None:
            self.policy.eval()
            hidden = (backbone_hidden(self.policy, roll.ids, roll.mask, self.shared_prompt(roll.context_length))
                      if c.value_model == "shared" else None)
            values = torch.where(roll.resp_mask, self._values(roll.ids, roll.mask, roll.context_length, hidden), 0.0)
            self.policy.train()
        m = {"objective/kl_coef": coef}
        if c.kl_in == "reward":
            rewards, kl, non_score = compute_rewards(roll.scores, roll.logprobs, roll.ref_logprobs, roll.resp_mask,
                                                     coef, c.kl_estimator)
            kl_sum = kl.sum(1)
            sequence_rewards = roll.scores.to(kl.dtype) - coef * kl_sum
            nsr = non_score.sum(1).mean()
            m.update({"objective/kl": kl_sum.mean(), "objective/non_score_reward": nsr,
                      "objective/rlhf_reward": roll.scores.mean() + nsr})
            check_finite(self, self.name.upper(), kl=kl)
        else:  # the score alone, at the last token
            zeros = torch.zeros_like(roll.logprobs)
            rewards, _, _ = compute_rewards(roll.scores, zeros, zeros, roll.resp_mask, 0.0, "k1")
            sequence_rewards = roll.scores.to(rewards.dtype)
        if c.whiten_rewards:
            rewards = core.masked_whiten(rewards, roll.resp_mask, shift_mean=False, all_reduce=self.sum_over_ranks)
        n = c.generations_per_prompt
        if n > 1:
            std_in_group = roll.scores.view(-1, n).std(dim=1)
            m.update({"objective/reward_std_in_group": std_in_group.mean(),
                      "objective/frac_reward_zero_std": (std_in_group == 0).float().mean()})
        return parts.AdvantageInputs(rewards, sequence_rewards, roll.resp_mask, n, values, self.sum_over_ranks), m

    def update(self, roll: Rollout) -> dict:
        """Advantages from the configured estimator, then `epochs` passes of `num_mini_batches` steps on the
        configured policy loss, aggregation and KL term (+ the critic's value loss). Returns the update's
        metrics; `extra_metrics` adds an algorithm's own."""
        c = self.cfg
        with torch.no_grad():
            x, m = self.advantage_inputs(roll)
            adv = parts.ADVANTAGE_ESTIMATORS[c.advantage_estimator].fn(x, c)
        check_finite(self, self.name.upper(), advantages=adv.token)
        self.tick("scoring")
        per_sequence = parts.POLICY_LOSSES[c.policy_loss].per_sequence
        loss_fn = parts.POLICY_LOSSES[c.policy_loss].fn
        kl_term = c.kl_in == "loss" and c.kl_coef_value > 0
        ids, mask, Q, responses, old = roll.ids, roll.mask, roll.context_length, roll.responses, roll.logprobs
        values = x.values

        def step(mb):
            rm = roll.resp_mask[mb]
            h = backbone_hidden(self.policy, ids[mb], mask[mb], self.shared_prompt(Q))
            new, entropy = response_logprobs(self.policy, ids[mb], mask[mb], Q, responses[mb], c.temperature,
                                             hidden=h, entropy=True)
            a = adv[mb]
            loss, st = loss_fn(new, old[mb], a.sequence if per_sequence else a.token, rm, c)
            if kl_term:
                zeros = torch.zeros_like(new)
                kl = core.kl_penalty(torch.where(rm, new, zeros), torch.where(rm, roll.ref_logprobs[mb], zeros),
                                     c.kl_estimator)
                loss = loss + c.kl_coef_value * kl
                st["kl"] = core.masked_mean(kl.detach(), rm)
            pg_loss = parts.aggregate(loss if per_sequence else torch.where(rm, loss, 0.0), rm, c)
            st["pg_loss"] = pg_loss
            with torch.no_grad():
                st["entropy"] = core.masked_mean(entropy, rm)
            if values is None:
                self.checked_backward(pg_loss)
                return new, st
            # The models share no weight, so two backward passes give the same gradients as one, and the
            # policy's graph (activations, bf16 weight casts) is freed before the value model runs, lowering
            # the peak. DDP's gradient reducer wants one backward per step.
            separate = c.value_model == "separate" and self.trainer.world_size == 1
            if separate:
                self.checked_backward(pg_loss)
            vpred = self._values(ids[mb], mask[mb], Q, h)
            vf_loss, vf = value_loss(vpred, values[mb], adv.returns[mb], rm, c.cliprange_value)
            self.checked_backward(c.vf_coef * vf_loss if separate else pg_loss + c.vf_coef * vf_loss)
            return new, {**st, "vf_loss": vf_loss, "vf_clipfrac": vf["clipfrac"]}

        avg = self.minibatch_steps(roll, c.epochs, c.num_mini_batches, step)
        if isinstance(self.kl_ctl, AdaptiveKLController):
            # Under DDP every rank keeps the same coefficient, following the global mean KL.
            mean_kl = self.mean_over_ranks(m["objective/kl"].detach().double())
            self.kl_ctl.update(mean_kl.item(), c.batch_size * self.trainer.world_size)
        m["objective/kl_coef"] = self.kl_ctl.value  # after this update's adjustment (the next update's), as before
        m.update({"loss/policy_avg": avg["pg_loss"], "policy/clipfrac_avg": avg["clipfrac"],
                  "policy/approxkl_avg": avg["approxkl"], "policy/ratio": avg["ratio"],
                  "policy/entropy_avg": avg["entropy"], "policy/logprob_gap": avg["logprob_gap"],
                  "policy/logprob_gap_max": avg["logprob_gap_max"]})
        if kl_term:
            m["policy/kl_loss"] = avg["kl"]
        if values is not None:
            m.update({"loss/value_avg": avg["vf_loss"], "value/clipfrac_avg": avg["vf_clipfrac"]})
        m.update(self.extra_metrics(roll, adv, avg))
        return m

    def extra_metrics(self, roll: Rollout, adv: parts.Advantages, avg: dict) -> dict:
        """An algorithm's own metrics beyond the shared ones (slash-namespaced; logged as global means)."""
        return {}

    def minibatch_steps(self, roll: Rollout, epochs: int, num_mini_batches: int, step) -> dict[str, torch.Tensor]:
        """`epochs` shuffled passes over the rollout, `num_mini_batches` optimizer steps each.

        `step(mb)` runs one minibatch (indices `mb`): forward, losses, `checked_backward`; it returns
        the new log-probs of the minibatch's responses and a dict of scalar stats. Returns each stat's
        mean over the steps, plus `logprob_gap` and `logprob_gap_max` from the first minibatch (before
        any optimizer step, where every ratio must be exactly 1).
        """
        opt = self.optimizers()
        stats: dict[str, list] = {}
        gap = None
        for _ in range(epochs):
            order = torch.randperm(roll.ids.shape[0], device=self.device, generator=roll.generator)
            for mb in order.split(self.cfg.batch_size // num_mini_batches):
                new_logprobs, st = step(mb)
                if gap is None:
                    gap = self.logprob_gap(new_logprobs.detach(), roll.logprobs[mb], roll.resp_mask[mb])
                opt.step()  # clips each trained model's gradients first (`on_before_optimizer_step`)
                opt.zero_grad(set_to_none=True)  # freed now, not held through the next rollout
                for k, v in st.items():
                    stats.setdefault(k, []).append(v.detach())
        avg = {k: torch.stack(v).mean() for k, v in stats.items()}
        avg["logprob_gap"], avg["logprob_gap_max"] = gap
        return avg

    def logprob_gap(self, new_logprobs, old_logprobs, resp_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and max |training forward - rollout| log-prob of the same tokens, before any step.

        Should be ~1e-6 (float rounding): anything larger means the sampler and the training forward
        compute different distributions (low-precision heads, another attention kernel), and every
        ratio starts away from 1. Warns once per run above `logprob_gap_warn`.
        """
        diff = torch.where(resp_mask, (new_logprobs - old_logprobs).abs(), 0.0)
        mean, worst = core.masked_mean(diff, resp_mask), diff.max()
        if not self._gap_warned and worst.item() > self.cfg.logprob_gap_warn:
            self._gap_warned = True
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"policy/logprob_gap_max={worst.item():.3g} nats (> {self.name}.logprob_gap_warn="
                           f"{self.cfg.logprob_gap_warn:g}): the rollout's log-probs differ from the training "
                           "forward's before any step, so ratios start off 1; check precision and "
                           "model.attn_implementation")
        return mean, worst
