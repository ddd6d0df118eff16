"""The decode step with static shapes, for capture in a CUDA graph: `sample(..., graph=True)`.

    python train.py trainer.accelerator=gpu grpo.decode_graph=true    # the rollout's decode step as a CUDA graph
    python -m rlhf.bench --kind generate --device cuda                 # ours, ours with the graph, and generate

At a decode step a small model's GPU time is mostly kernel launches: one token per row through
every layer is dozens of small kernels, each launched from Python. A CUDA graph records the step's
kernels once and replays them with one launch, which needs every tensor the step reads or writes
at a fixed address and every shape fixed. So here the key/value cache is transformers' `StaticCache`
(preallocated for prompt + response, written in place), the attention mask covers the whole
preallocated length (future positions 0, set to 1 in place step by step), and the step is compiled
once with `torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)`, the
route transformers' own static-cache generation takes (its "Static cache and torch.compile" guide).
The prefill runs eagerly as in `decode_steps` (shared prompts included) and its cache is copied in.

Only on CUDA: on CPU, attention over the whole preallocated length costs more than the dynamic
cache's concatenation and inductor's CPU code was slower than eager (docs/benchmark.md), so there
the same static step runs without capture (`backend`), for tests. The head is the fp32 head of
`head_fp32` (on CUDA that function's CPU fast path is off, so the numbers are the same).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel, StaticCache

from rlhf.models.causal_lm import head_fp32

BUCKET = 64  # the static length is prompt + response rounded up to this, so batches' prompt lengths share a graph
_STEPS: dict = {}  # backend -> the compiled step
# Each body's caches by (batch, length, dtype, device): reused across rollouts, so a graph's cache
# stays at the addresses it was recorded with (a new address means recording it again).
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step(body, head, tok: Tensor, mask: Tensor, pos: Tensor, cache: StaticCache) -> Tensor:
    hidden = body(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden[:, -1].float())


def compiled_step(backend: str | Callable | None) -> Callable:
    """The step, compiled once: CUDA graphs on CUDA (`backend` None), `backend` otherwise ("eager":
    dynamo's trace and guards alone, which is what shows a step would capture: one graph, no break)."""
    key = backend or "cudagraphs"
    if key not in _STEPS:
        opts = {"mode": "reduce-overhead"} if backend is None else {"backend": backend}
        _STEPS[key] = torch.compile(_step, fullgraph=True, dynamic=False, **opts)
    return _STEPS[key]


def static_cache(policy: PreTrainedModel, prefill_cache, max_len: int) -> StaticCache:
    """A `StaticCache` of `max_len` positions holding the prefill's keys and values at its start: the
    policy's cache of that shape from an earlier call, refilled, or a new one."""
    first = prefill_cache.layers[0].keys
    key = (first.shape[0], max_len, first.dtype, first.device)
    caches = _CACHES.setdefault(policy.base_model, {})
    if key not in caches:
        caches[key] = StaticCache(config=policy.config, max_cache_len=max_len)
    cache = caches[key]
    for src, dst in zip(prefill_cache.layers, cache.layers):
        if not dst.is_initialized:
            dst.lazy_initialization(src.keys, src.values)
        n = src.keys.shape[-2]
        dst.keys[:, :, :n].copy_(src.keys)
        dst.values[:, :, :n].copy_(src.values)
        dst.cumulative_length.fill_(n)
    return cache


def static_decode_steps(policy: PreTrainedModel, out, pos: Tensor, attention_mask: Tensor, max_new_tokens: int,
                        backend: str | Callable | None = None):
    """`decode_steps`'s loop after the prefill `out` (the body's cached output, `pos` its position ids),
    with static shapes: yields next-token logits [B, V] (fp32), is sent the tokens [B]; at most
    `max_new_tokens` - 1 tokens can be sent. `backend` None captures the step in a CUDA graph."""
    if backend is None and attention_mask.device.type != "cuda":
        raise ValueError(f"a CUDA-graph decode step needs CUDA; the model is on {attention_mask.device.type}")
    body, head = policy.base_model, policy.get_output_embeddings()
    B, P = attention_mask.shape
    length = -(-(P + max_new_tokens) // BUCKET) * BUCKET
    cache = static_cache(policy, out.cache, length)
    mask = attention_mask.new_zeros(B, length)
    mask[:, :P] = attention_mask
    next_pos = (pos[:, -1:] + 1).contiguous()
    tok_in = attention_mask.new_zeros(B, 1)
    step = compiled_step(backend)
    logits = head_fp32(head, out.last_hidden_state[:, -1])
    for t in range(max_new_tokens):
        tok = yield logits
        if t == max_new_tokens - 1:
            raise RuntimeError(f"the static cache holds {max_new_tokens} new tokens; a further one was sent")
        tok_in.copy_(tok[:, None])
        mask[:, P + t] = 1
        if backend is None:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(body, head, tok_in, mask, next_pos, cache).clone()  # a replay overwrites its output
        next_pos += 1
