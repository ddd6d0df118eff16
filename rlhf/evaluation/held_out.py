"""Sampling a policy on held-out prompts: per-sequence log-probs and KL, rollouts, the comparison of
a policy stage's policy against its start at the end of the stage, and, on a verifiable task (a data
source with `verify`), greedy accuracy and pass@k.
"""
from __future__ import annotations

import contextlib

from rlhf.evaluation.gold import gold_scores
from rlhf.evaluation.metrics import distinct_n, mean, win_rate

N_SAMPLES = 5  # example responses kept in eval.json and the stage summary
EVAL_BATCH = 32  # prompts per sampling batch in the end-of-stage comparison


# ----- model calls -----

def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int | None):
    """Left-padded prompt ids and mask, each prompt cut to its LAST `max_prompt_length` tokens (as PPO)."""
    import torch

    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if max_prompt_length:
        ids = [x[-max_prompt_length:] for x in ids]
    width = max(1, max(len(x) for x in ids))
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            out[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
    return out, mask


def sequence_logprobs(model, queries, query_mask, responses, response_mask, temperature: float = 1.0):
    """sum_t log softmax(logits_t / temperature)[y_t] over each row's response tokens where response_mask; [B]."""
    import torch

    from rlhf.models.sampling import response_logprobs

    with torch.no_grad():
        ids = torch.cat([queries, responses], 1)
        mask = torch.cat([query_mask, response_mask.long()], 1)
        logp = response_logprobs(model, ids, mask, queries.shape[1], responses, temperature)
        return torch.where(response_mask.bool(), logp, torch.zeros_like(logp)).sum(1)


def sequence_kl(policy, reference, queries, query_mask, responses, response_mask, temperature: float = 1.0):
    """k1 estimate of KL(policy || reference) per sequence: sum_t log pi(y_t) - log pi_ref(y_t); [B].

    `responses` must be samples of `policy`. Both log-probs come from the same full forward pass
    (not the sampler's cached logits), so the estimate is 0 when `policy` has the reference's weights.
    """
    lp = sequence_logprobs(policy, queries, query_mask, responses, response_mask, temperature)
    return lp - sequence_logprobs(reference, queries, query_mask, responses, response_mask, temperature)


def rollout(policy, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, stop_id: int | None,
            max_prompt_length: int | None = None, batch_size: int = 32, seed: int | None = 0, reference=None,
            device="cpu") -> dict:
    """One sampled response per prompt: {"texts", "lengths"} and, with `reference`, per-sequence "kl"."""
    import torch

    from rlhf.algorithms.core import truncate_after_stop
    from rlhf.models.sampling import sample

    if seed is not None:
        torch.manual_seed(seed)
    texts, lengths, kl = [], [], []
    for i in range(0, len(prompts), batch_size):
        q, qm = encode_prompts(tokenizer, prompts[i:i + batch_size], max_prompt_length)
        q, qm = q.to(device), qm.to(device)
        resp, _ = sample(policy, q, qm, max_new_tokens, temperature, tokenizer.pad_token_id, stop_id,
                         tokens_only=True)
        resp, rmask, _ = truncate_after_stop(resp, stop_id, tokenizer.pad_token_id)
        texts += [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, rmask)]
        lengths += rmask.sum(1).tolist()
        if reference is not None:
            kl += sequence_kl(policy, reference, q, qm, resp, rmask, temperature).tolist()
    out = {"texts": texts, "lengths": [float(x) for x in lengths]}
    if reference is not None:
        out["kl"] = kl
    return out


# ----- inside training: held-out evaluation during a policy stage and at its end -----

def _rollout_batch(module, policy, batch) -> dict:
    """`rollout` on one datamodule batch, with the module's settings, reward and reference."""
    import torch

    from rlhf.algorithms import core
    from rlhf.models.lora import reference_policy
    from rlhf.models.sampling import sample

    c = module.cfg
    q, qm = batch["input_ids"].to(module.device), batch["attention_mask"].to(module.device)
    with torch.no_grad():
        resp, logp = sample(policy, q, qm, c.response_length, c.temperature, module.tokenizer.pad_token_id,
                            module.stop_id, logprobs=True)
        resp, rmask, _ = core.truncate_after_stop(resp, module.stop_id, module.tokenizer.pad_token_id)
        logp = (logp * rmask).sum(1)  # the sampler's own log-probs
        with reference_policy(module.policy, module.ref_policy) as ref_policy:
            ref = sequence_logprobs(ref_policy, q, qm, resp, rmask, c.temperature)
        score = getattr(module, "score", None)  # DPO has no reward to score with
        scores = score(q, qm, resp, rmask, batch["prompt"]).tolist() if score is not None else []
    return {"scores": scores, "kl": (logp - ref).tolist(),
            "texts": [module.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, rmask)],
            "prompts": list(batch["prompt"]), "length": rmask.sum(1).float().tolist()}


def _collect(module, policy, loader, n: int) -> dict:
    out: dict = {}
    for batch in loader:
        for k, v in _rollout_batch(module, policy, batch).items():
            out.setdefault(k, []).extend(v)
        if len(out["texts"]) >= n:
            break
    return {k: v[:n] for k, v in out.items()}


def eval_loader(module, dm):
    """The held-out prompts in batches of EVAL_BATCH, in a fixed order.

    One batching for every stage: the sampled responses depend on the batch composition, so
    stages whose training batches differ (GRPO's 8 prompts, PPO's 32) are still compared on the
    same draws of the same prompts.
    """
    from rlhf.data import PreferenceDataModule

    return PreferenceDataModule(dm.splits, module.tokenizer, "prompts", EVAL_BATCH, dm.max_prompt_length,
                                dm.max_response_length).val_dataloader()


@contextlib.contextmanager
def _fixed_seed(module):
    """Seed 1234 inside, the caller's random state restored afterwards: evaluating during training leaves
    the training's random stream as it was, and every evaluation point (and the end-of-stage comparison)
    samples with the same random numbers."""
    import torch

    devices = [module.device.index or 0] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(1234)
        yield


def _sample_held_out(module, policy, loader, n: int) -> dict:
    """`_collect` under `_fixed_seed`."""
    with _fixed_seed(module):
        return _collect(module, policy, loader, n)


def _decode(module, policy, loader, n: int, temperature: float, samples: int = 1) -> tuple[list[str], list[list[str]]]:
    """The first `n` held-out prompts and `samples` responses to each at `temperature` (0: greedy), under
    `_fixed_seed`."""
    import torch

    from rlhf.algorithms.core import truncate_after_stop
    from rlhf.models.sampling import sample

    tok, prompts, texts = module.tokenizer, [], []
    with _fixed_seed(module), torch.no_grad():
        for batch in loader:
            q = batch["input_ids"].to(module.device).repeat_interleave(samples, 0)
            qm = batch["attention_mask"].to(module.device).repeat_interleave(samples, 0)
            resp, _ = sample(policy, q, qm, module.cfg.response_length, temperature, tok.pad_token_id, module.stop_id,
                             tokens_only=True)
            resp, rmask, _ = truncate_after_stop(resp, module.stop_id, tok.pad_token_id)
            out = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, rmask)]
            prompts += list(batch["prompt"])
            texts += [out[i:i + samples] for i in range(0, len(out), samples)]
            if len(prompts) >= n:
                break
    return prompts[:n], texts[:n]


def greedy_accuracy(module, policy, loader, n: int) -> float:
    """Share of the first `n` held-out prompts whose greedy response the task's verifier accepts."""
    prompts, texts = _decode(module, policy, loader, n, 0.0)
    return mean([float(bool(module.verify(p, t[0]))) for p, t in zip(prompts, texts)])


def verified_comparison(module, dm, n: int, num_samples: int, temperature: float, ks) -> dict:
    """A verifiable task's measures of a policy stage's policy against its start on `n` held-out
    prompts: greedy accuracy (`accuracy_before`, `accuracy_after`) and `pass_at_k`
    ({"before": {k: ...}, "after": {k: ...}}, the unbiased estimator over `num_samples` samples per
    prompt at `temperature`, for each k <= num_samples)."""
    from rlhf.evaluation.metrics import pass_at_k
    from rlhf.models.lora import reference_policy

    was_training = module.policy.training
    module.policy.eval()
    loader = eval_loader(module, dm)
    result: dict = {"pass_at_k": {}}
    with reference_policy(module.policy, module.ref_policy) as ref_policy:
        for when, policy in (("before", ref_policy), ("after", module.policy)):
            result[f"accuracy_{when}"] = greedy_accuracy(module, policy, loader, n)
            prompts, texts = _decode(module, policy, loader, n, temperature, num_samples)
            correct = [sum(bool(module.verify(p, t)) for t in ts) for p, ts in zip(prompts, texts)]
            result["pass_at_k"][when] = {k: mean([pass_at_k(num_samples, c, k) for c in correct])
                                         for k in ks if k <= num_samples}
    module.policy.train(was_training)
    return result


def evaluate_policy(module, loader, n: int) -> dict:
    """The current policy on `n` held-out prompts: reward (the proxy, when the stage has one), gold (when
    known), KL to the reference (k1, nats per sequence), response length, distinct-2."""
    was_training = module.policy.training
    module.policy.eval()
    out = _sample_held_out(module, module.policy, loader, n)
    m = {"kl": mean(out["kl"]), "response_length": mean(out["length"]), "distinct_2": distinct_n(out["texts"], 2)}
    if out["scores"]:
        m["reward"] = mean(out["scores"])
    if module.gold is not None:
        m["gold"] = mean(gold_scores(module.gold, out["prompts"], out["texts"]))
    if getattr(module, "verify", None) is not None:  # a verifiable task: greedy accuracy besides the samples
        m["accuracy"] = greedy_accuracy(module, module.policy, loader, n)
    module.policy.train(was_training)
    return m


def compare_policies(module, dm, n: int) -> dict:
    """A policy stage's policy against its starting policy on `n` validation prompts, at the end of the stage.

    The same measures as `evaluate_run` (reward, win rate, k1 KL from the sampler's log-probs, gold,
    length), computed from the live module and its datamodule instead of a run's exports. The
    module provides `policy`, `ref_policy`, `tokenizer`, `stop_id`, `gold`, `device`, `cfg`
    (`response_length`, `temperature`) and, when it has a reward, `score`.
    """
    from rlhf.models.lora import reference_policy

    was_training = module.policy.training
    module.policy.eval()
    loader = eval_loader(module, dm)
    with reference_policy(module.policy, module.ref_policy) as ref_policy:
        before = _sample_held_out(module, ref_policy, loader, n)
    after = _sample_held_out(module, module.policy, loader, n)
    module.policy.train(was_training)
    result = {"eval_prompts": len(after["texts"]), "kl_final": mean(after["kl"]),
              "response_length_before": mean(before["length"]), "response_length_after": mean(after["length"])}
    if after["scores"]:  # the proxy the stage optimised: reward model and/or reward functions
        result.update(reward_before=mean(before["scores"]), reward_after=mean(after["scores"]),
                      rm_win_rate=win_rate(after["scores"], before["scores"]))
    if module.gold is not None:
        g0 = gold_scores(module.gold, before["prompts"], before["texts"])
        g1 = gold_scores(module.gold, after["prompts"], after["texts"])
        result.update(gold_reward_before=mean(g0), gold_reward_after=mean(g1), gold_win_rate=win_rate(g1, g0))
    result["samples"] = [{"prompt": p[-200:], "sft": b, "policy": a}
                         for p, b, a in list(zip(after["prompts"], before["texts"], after["texts"]))[:N_SAMPLES]]
    return result
