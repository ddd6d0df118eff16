"""Responses that share a prompt run it through the model once: the Prefix Grouper idea.

    python train.py algo=grpo                      # on by default; grpo.shared_prefix=false turns it off

Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward"
(arXiv:2506.05433; verl's `actor.use_prefix_grouper`). GRPO, RLOO and their relatives sample a
group of responses per prompt, and every pass over the rollout (the reference's log-probs, the
reward model's score, each training forward and backward) would otherwise recompute the same
prompt once per response. Here the distinct prompts run once, their key/value cache is copied to
the rows that share them (`Cache.reorder_cache`, an `index_select`, so in a training pass the
gradients of the rows sharing a prompt are summed through it), and the responses run on top of
it. The hidden states are those of the plain forward (the same positions, mask and attention;
equal to float rounding, which the tests bound at 1e-6; bit-identical where measured), so
nothing an algorithm computes changes: only the body's work does, from B x (P + R) tokens to
U x P + B x R for U distinct prompts. Rows need not be consecutive: minibatches drawn in a
shuffled order share whatever prompts they have in common.

The token embeddings of both parts are looked up in one call, so the tied embedding's gradient is
built once (a second lookup would add a second dense [vocab, width] gradient). For the same
reason, under a bf16 autocast each weight is cast once for both calls: autograd would keep both
casts for the backward. Rows that share no prompt, models under gradient checkpointing (which
switch the cache off while training), and callers that do not say where the prompt ends take the
plain forward.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlhf.algorithms.core import position_ids_from_mask
from rlhf.models.causal_lm import cached_autocast


def distinct_prompts(input_ids: Tensor, attention_mask: Tensor, context_length: int) -> tuple[Tensor, Tensor] | None:
    """(index of one row per distinct prompt [U], each row's prompt among them [B]), or None when
    no two rows share a prompt (the ids and the mask of the first `context_length` positions)."""
    prompt = torch.cat([input_ids[:, :context_length], attention_mask[:, :context_length].to(input_ids.dtype)], 1)
    unique, inverse = torch.unique(prompt, dim=0, return_inverse=True)
    if unique.shape[0] == prompt.shape[0]:
        return None
    # The first row holding each distinct prompt: the smallest row index that maps to it.
    rows = torch.arange(prompt.shape[0], device=prompt.device)
    first = torch.full((unique.shape[0],), prompt.shape[0], dtype=rows.dtype, device=rows.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def _can_share(model: PreTrainedModel) -> bool:
    body = model.base_model
    return not (getattr(body, "gradient_checkpointing", False) and body.training and torch.is_grad_enabled())


def prefill_shared(body: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                   groups: tuple[Tensor, Tensor]):
    """The cached forward of left-padded prompts with duplicates run once; returns the body's output
    with `last_hidden_state` and `cache` expanded back to every row (the sampler's prefill)."""
    first, inverse = groups
    out = body(input_ids=input_ids[first], attention_mask=attention_mask[first], position_ids=position_ids[first],
               use_cache=True)
    out.cache.reorder_cache(inverse)
    out.last_hidden_state = out.last_hidden_state.index_select(0, inverse)
    return out


def shared_prefix_hidden(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                         context_length: int) -> Tensor | None:
    """Last hidden states [B, T, d] of every row, each distinct prompt (the first `context_length`
    positions) computed once; None when the plain forward should run instead (see the module doc)."""
    if not 0 < context_length < input_ids.shape[1] or not _can_share(model):
        return None
    groups = distinct_prompts(input_ids, attention_mask, context_length)
    if groups is None:
        return None
    first, inverse = groups
    body, Q = model.base_model, context_length
    U, (B, T) = first.shape[0], input_ids.shape
    embed = model.get_input_embeddings()(torch.cat([input_ids[first, :Q].reshape(-1), input_ids[:, Q:].reshape(-1)]))
    pos = position_ids_from_mask(attention_mask)
    with cached_autocast(input_ids.device.type):  # one bf16 cast of each weight for both calls
        prompt = body(inputs_embeds=embed[: U * Q].view(U, Q, -1), attention_mask=attention_mask[first, :Q],
                      position_ids=pos[first, :Q], use_cache=True)
        cache = prompt.cache
        cache.reorder_cache(inverse)
        rest = body(inputs_embeds=embed[U * Q :].view(B, T - Q, -1), attention_mask=attention_mask,
                    position_ids=pos[:, Q:], cache=cache, use_cache=False)
    return torch.cat([prompt.last_hidden_state.index_select(0, inverse), rest.last_hidden_state], 1)
