"""Held-out comparison of the PPO policy with its starting (SFT) policy.

Both sample one response per held-out prompt; each response is scored by the reward model and,
where the data has one, by the gold function. Win rate counts ties as half a win.
KL is the policy's mean sequence log-ratio to the reference on its own samples (k1, unbiased).
"""
from __future__ import annotations

import torch

from rlhf.algorithms import ppo as F
from rlhf.models.lora import reference_policy
from rlhf.models.sampling import response_logits, sample


@torch.no_grad()
def rollout(module, policy, batch) -> dict:
    c = module.cfg
    q = batch["input_ids"].to(module.device)
    qm = batch["attention_mask"].to(module.device)
    resp, logits = sample(policy, q, qm, c.response_length, c.temperature, module.tokenizer.pad_token_id,
                          module.stop_id)
    resp, rmask, has_stop = F.truncate_after_stop(resp, module.stop_id, module.tokenizer.pad_token_id)
    logp = F.logprobs_from_logits(logits, resp, c.temperature)
    ids, mask = torch.cat([q, resp], 1), torch.cat([qm, rmask.long()], 1)
    with reference_policy(module.policy, module.ref_policy) as ref_policy:
        ref = F.logprobs_from_logits(response_logits(ref_policy, ids, mask, q.shape[1]), resp, c.temperature)
    texts = [module.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, rmask)]
    return {"scores": module.score(q, qm, resp, rmask, batch["prompt"]).cpu(),
            "kl": ((logp - ref) * rmask).sum(1).cpu(), "texts": texts, "prompts": list(batch["prompt"]),
            "length": rmask.sum(1).float().cpu()}


def _collect(module, policy, loader, n: int) -> dict:
    parts, seen = [], 0
    for batch in loader:
        parts.append(rollout(module, policy, batch))
        seen += len(parts[-1]["texts"])
        if seen >= n:
            break
    out = {k: (torch.cat([p[k] for p in parts])[:n] if torch.is_tensor(parts[0][k]) else sum((p[k] for p in parts), [])[:n])
           for k in parts[0]}
    return out


def compare_policies(module, dm, n: int) -> dict:
    was_training = module.policy.training
    module.policy.eval()
    loader = dm.val_dataloader()
    torch.manual_seed(1234)
    with reference_policy(module.policy, module.ref_policy) as ref_policy:
        before = _collect(module, ref_policy, loader, n)
    torch.manual_seed(1234)
    after = _collect(module, module.policy, loader, n)
    module.policy.train(was_training)
    result = {"eval_prompts": len(after["texts"]),
              "reward_before": before["scores"].mean().item(), "reward_after": after["scores"].mean().item(),
              "rm_win_rate": _win_rate(after["scores"], before["scores"]),
              "kl_final": after["kl"].mean().item(),
              "response_length_before": before["length"].mean().item(),
              "response_length_after": after["length"].mean().item()}
    if module.gold is not None:
        g0 = torch.tensor([module.gold(p, t) for p, t in zip(before["prompts"], before["texts"])])
        g1 = torch.tensor([module.gold(p, t) for p, t in zip(after["prompts"], after["texts"])])
        result.update(gold_reward_before=g0.mean().item(), gold_reward_after=g1.mean().item(),
                      gold_win_rate=_win_rate(g1, g0))
    result["samples"] = [{"prompt": p[-200:], "sft": b, "ppo": a}
                         for p, b, a in list(zip(after["prompts"], before["texts"], after["texts"]))[:5]]
    return result


def _win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a > b).float() + 0.5 * (a == b).float()).mean().item()
