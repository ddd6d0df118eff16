"""Sampling responses and reading log-probs back, the two model calls PPO makes most.

Generation runs a KV-cached sampling loop (left padding, position ids from the mask) and keeps
the raw logits it already computed, so the rollout's old log-probs cost no second forward pass. Scoring passes
run the backbone once and apply the LM head only to response positions: the prompt's logits
over a 50k vocabulary would be most of the work and are never used. Training and reference passes
go further (`response_logprobs`): the head and the log-softmax are one autograd function that keeps
only the logits, and turns them into their own gradient in place.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlhf.algorithms.core import logprobs_from_logits, position_ids_from_mask
from rlhf.models.causal_lm import cached_autocast, fast_fp32_matmul, head_fp32
from rlhf.models.graph_decode import static_decode_steps
from rlhf.models.packed import packed_linears
from rlhf.models.shared_prefix import distinct_prompts, prefill_shared, shared_prefix_hidden


@torch.no_grad()
def sample(policy: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, response_length: int,
           temperature: float, pad_token_id: int, stop_token_id: int | None = None,
           generator: torch.Generator | None = None, logprobs: bool = False,
           tokens_only: bool = False, shared_prefix: bool = False, graph: bool = False,
           graph_backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Sample `response_length` tokens per left-padded prompt; returns (responses [B,R], logits [B,R,V]),
    or with `logprobs` (responses, log-probs [B,R]) of the drawn tokens instead of the logits, or with
    `tokens_only` (responses, None): evaluation and generation, which read only the tokens, then keep
    no [B, R, V] tensor (at 256 rows x 8 tokens of GPT-2's vocabulary, 0.4 GB, and as much again stacked).

    Pure sampling from softmax(logits / temperature), as PPO's ratio assumes the policy is the
    sampler; `temperature` 0 decodes greedily (evaluation only: the logits are then untempered). A KV-cached loop rather than `generate`: the prefill computes LM-head logits for the
    last prompt token only, and tokens are drawn by inverse CDF (one uniform per row), which on
    CPU is ~25x cheaper than `torch.multinomial` over a 50k vocabulary. Rows past their stop
    token get `pad_token_id`; when every row has stopped the rest is padding with zero logits.
    `generator` makes the draws reproducible independently of any other use of the global RNG.
    The log-probs are `logprobs_from_logits(logits, responses, temperature)` (untempered when
    greedy), computed step by step as the tokens are drawn, so the rollout's old log-probs need
    no [B, R, V] tensor: at batch 32 and 256 tokens of GPT-2's vocabulary that is 1.6 GB.
    With `shared_prefix`, rows with the same prompt share one prefill (`rlhf/models/shared_prefix.py`).
    With `graph`, the decode steps replay a CUDA graph (`rlhf/models/graph_decode.py`).
    """
    with cached_autocast(input_ids.device.type), packed_linears(policy):
        return _sample(policy, input_ids, attention_mask, response_length, temperature, pad_token_id,
                       stop_token_id, generator, logprobs, tokens_only, shared_prefix,
                       response_length if graph else None, graph_backend)


def decode_steps(policy: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, shared_prefix: bool = False,
                 graph_tokens: int | None = None, graph_backend: str | None = None):
    """The KV-cached decode loop as a generator: yields the next-token logits [B, V] (fp32, `head_fp32`),
    and is sent the tokens [B] chosen from them, which it feeds back through the cache.

    Left-padded prompts, position ids counted from each row's first real token; the prefill applies
    the LM head to the last prompt position only. Shared by the training sampler (`sample`) and the
    HTTP server's batched engine, which chooses tokens its own way (per-row temperature, stop strings).
    With `shared_prefix`, identical prompts are prefilled once and their cache copied to their rows.
    With `graph_tokens`, the steps after the prefill run with static shapes for up to that many tokens,
    captured in a CUDA graph (`rlhf.models.graph_decode`; `graph_backend` compiles them otherwise).
    """
    body, head = policy.base_model, policy.get_output_embeddings()
    pos = position_ids_from_mask(attention_mask)
    groups = distinct_prompts(input_ids, attention_mask, input_ids.shape[1]) if shared_prefix else None
    if groups is not None:
        out = prefill_shared(body, input_ids, attention_mask, pos, groups)
    else:
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True)
    if graph_tokens is not None:
        yield from static_decode_steps(policy, out, pos, attention_mask, graph_tokens, graph_backend)
        return
    next_pos = pos[:, -1:] + 1
    mask = attention_mask
    while True:
        tok = yield head_fp32(head, out.last_hidden_state[:, -1])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = body(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, cache=out.cache, use_cache=True)
        next_pos = next_pos + 1


def draw(logits: Tensor, temperature: float | Tensor, generator: torch.Generator | None = None,
         u: Tensor | None = None) -> Tensor:
    """One token per row from softmax(logits / temperature) by inverse CDF (one uniform per row).

    `temperature` is a float or a [B, 1] tensor, and `u` the rows' uniforms in [0, 1) [B, 1] when the
    caller draws them (the server batches requests with their own temperatures and seeds).
    """
    probs = torch.softmax(logits / temperature, -1)
    cdf = probs.cumsum(-1)
    # u in (0, total]: torch.rand can return exactly 0, and searchsorted would then pick the first
    # token even at probability 0 (cdf 0 >= 0). With u > 0 only a token with mass can be drawn.
    if u is None:
        u = torch.rand(logits.shape[0], 1, device=cdf.device, dtype=cdf.dtype, generator=generator)
    u = (1.0 - u.to(cdf.dtype)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _sample(policy, input_ids, attention_mask, response_length, temperature, pad_token_id, stop_token_id, generator,
            keep_logprobs=False, tokens_only=False, shared_prefix=False, graph_tokens=None, graph_backend=None):
    B = input_ids.shape[0]
    steps = decode_steps(policy, input_ids, attention_mask, shared_prefix, graph_tokens, graph_backend)
    step_logits = next(steps)
    tokens, logits = [], []
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for t in range(response_length):
        if temperature == 0:  # greedy decoding (evaluation's accuracy), no draw
            tok = step_logits.argmax(-1)
        else:
            tok = draw(step_logits, temperature, generator)
        tok = torch.where(done, pad_token_id, tok)
        tokens.append(tok)
        if not tokens_only:
            logits.append(logprobs_from_logits(step_logits[:, None], tok[:, None], temperature or 1.0)[:, 0]
                          if keep_logprobs else step_logits)
        if stop_token_id is not None:
            done |= tok == stop_token_id
        if t == response_length - 1 or bool(done.all()):
            break
        step_logits = steps.send(tok)
    steps.close()
    responses = torch.stack(tokens, 1)
    missing = response_length - responses.shape[1]
    if tokens_only:
        return torch.nn.functional.pad(responses, (0, max(missing, 0)), value=pad_token_id), None
    logits = torch.stack(logits, 1)
    if missing > 0:
        responses = torch.nn.functional.pad(responses, (0, missing), value=pad_token_id)
        if keep_logprobs:  # what the zero logits of the padding would give
            zero = logprobs_from_logits(step_logits.new_zeros(B, 1, step_logits.shape[-1]), responses[:, -1:])
            logits = torch.cat([logits, zero.expand(B, missing)], 1)
        else:
            logits = torch.nn.functional.pad(logits, (0, 0, 0, missing))
    return responses, logits


def backbone_hidden(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                    prompt_length: int | None = None) -> Tensor:
    """Last hidden states, with position ids counted from each row's first real token. With
    `prompt_length`, rows whose first `prompt_length` tokens are the same compute them once
    (`shared_prefix_hidden`)."""
    if prompt_length is not None:
        hidden = shared_prefix_hidden(model, input_ids, attention_mask, prompt_length)
        if hidden is not None:
            return hidden
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state


def response_logits(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, context_length: int,
                    hidden: Tensor | None = None) -> Tensor:
    """Logits that predicted each response token: positions context_length-1 .. T-2 (fp32, `head_fp32`)."""
    if hidden is None:
        hidden = backbone_hidden(model, input_ids, attention_mask)
    return head_fp32(model.get_output_embeddings(), hidden[:, context_length - 1 : -1])


HEAD_CHUNK_BYTES = 1 << 28  # the most fp32 logits [V, tokens] the fused head materialises at once
VOCAB_SLICE = 8192  # rows of the vocabulary per slice where the head works on [V, c] a slice at a time


def _logsumexp0(z: Tensor, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """logsumexp over dim 0 of [V, N] in vocabulary slices (`torch.logsumexp` would allocate a second
    [V, N] tensor for exp(z - max)); with `entropy`, also -sum_v p_v log p_v = lse - sum_v p_v z_v from
    the same exponentials (one pass over the logits, not a second one after the logsumexp)."""
    m = z.amax(0)
    acc = torch.zeros_like(m)
    dot = torch.zeros_like(m) if entropy else None
    for i in range(0, z.shape[0], VOCAB_SLICE):
        zc = z[i:i + VOCAB_SLICE]
        e = torch.exp(zc - m)
        acc += e.sum(0)
        if entropy:
            dot += (e.mul_(zc)).sum(0)
    lse = m + acc.log()
    return lse, (lse - dot / acc if entropy else None)


class _HeadLogProbs(torch.autograd.Function):
    """log softmax(hidden @ W.T / temperature) at `tokens` (and, on request, the entropy), in fp32.

    Unfused, autograd keeps the [N, V] logits for logsumexp and gather, and the backward builds three
    more [N, V] tensors (softmax, the gather's scatter, their sum) before the head's matmuls. Here
    the logits are the only [N, V] tensor: the backward overwrites them with d logp / d logits =
    onehot - softmax, scaled by the incoming gradient, and feeds that to the two matmuls. The logits
    are laid out [V, N] (`W @ h.T`): on the 2-core AVX2 CPU this was measured on, MKL runs the head
    matmul and its gradients faster that way than as `h @ W.T` (docs/benchmark.md).

    Token-chunked: when the [V, N] logits would exceed `HEAD_CHUNK_BYTES`, they are computed a slice
    of tokens at a time and not kept; the backward recomputes each slice (one more head matmul), so
    the fused head's memory is bounded whatever the batch and response length (the memory that
    set the peak of long-response PPO, docs/benchmark.md).

    Called inside a bf16/fp16 autocast (bf16-mixed training), the two gradient matmuls run in that
    dtype, as autocast runs every other layer's, while the logits and log-probs stay fp32: the
    precision the ratios and the KL need is the forward's, and the fp32 gradient matmuls ran at
    fp32 speed in an otherwise bf16 update (docs/benchmark.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, want_entropy):
        device = hidden.device.type
        ctx.grad_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(hidden.device.type, enabled=False), fast_fp32_matmul(hidden.device.type):
            h = hidden.reshape(-1, hidden.shape[-1]).float()
            w = weight.float()
            n = h.shape[0]
            chunk = max(1, HEAD_CHUNK_BYTES // (4 * w.shape[0]))
            idx = tokens.reshape(1, -1)
            logp, lse = h.new_empty(n), h.new_empty(n)
            entropy = h.new_empty(n) if want_entropy else None
            kept = None
            for s in range(0, n, chunk):
                z = _slice_logits(w, h[s:s + chunk], temperature)  # [V, c]
                part, ent = _logsumexp0(z, want_entropy)
                lse[s:s + chunk] = part
                logp[s:s + chunk] = z.gather(0, idx[:, s:s + chunk]).squeeze(0) - part
                if want_entropy:
                    entropy[s:s + chunk] = ent
                if n <= chunk:
                    kept = z  # one slice: kept for the backward instead of recomputed
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.used = False
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(h, weight, kept, idx, lse)
        if entropy is not None:
            entropy = entropy.view(tokens.shape)
            ctx.mark_non_differentiable(entropy)
        return logp.view(tokens.shape), entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if ctx.used:
            raise RuntimeError("response_logprobs: its backward reuses the logits in place and runs once "
                               "(retain_graph is not supported)")
        ctx.used = True
        h, weight, kept, idx, lse = ctx.saved_tensors
        g = grad_logp.reshape(1, -1).float()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False), fast_fp32_matmul(h.device.type):
            w = weight.float()
            low = ctx.grad_dtype or w.dtype  # the gradient matmuls' dtype
            grad_h = h.new_empty(h.shape) if want_h else None
            # fp32 accumulates each token slice onto zeros; the low-precision path writes its first.
            grad_w = (torch.zeros_like(w) if low == w.dtype else torch.empty_like(w)) if want_w else None
            for s in range(0, h.shape[0], ctx.chunk):
                e = s + ctx.chunk
                z = kept if kept is not None else _slice_logits(w, h[s:e], ctx.temperature)
                gs = g[:, s:e]
                z.sub_(lse[s:e]).exp_().mul_(-gs)  # -g * softmax ...
                z.scatter_add_(0, idx[:, s:e], gs)  # ... + g at the token
                if ctx.temperature != 1.0:
                    z.div_(ctx.temperature)
                if low == w.dtype:
                    if want_h:
                        torch.mm(z.t(), w, out=grad_h[s:e])
                    if want_w:
                        grad_w.addmm_(z, h[s:e])
                    continue
                # In vocabulary slices, so that no full-size low-precision copy of z or W is made:
                # the backward's memory stays what it is in fp32.
                h_low, gh = h[s:e].to(low), 0.0
                for i in range(0, z.shape[0], VOCAB_SLICE):
                    zi = z[i:i + VOCAB_SLICE].to(low)
                    if want_h:
                        gh = gh + (zi.t() @ w[i:i + VOCAB_SLICE].to(low)).float()
                    if want_w and s == 0:
                        grad_w[i:i + VOCAB_SLICE] = zi @ h_low
                    elif want_w:
                        grad_w[i:i + VOCAB_SLICE] += zi @ h_low
                if want_h:
                    grad_h[s:e] = gh
        if want_h:
            grad_h = grad_h.view(*grad_logp.shape, -1)
        if want_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def _slice_logits(w: Tensor, h: Tensor, temperature: float) -> Tensor:
    """The [V, c] fp32 logits of c tokens' hidden states, divided by the temperature."""
    z = w @ h.t().contiguous()
    return z.div_(temperature) if temperature != 1.0 else z


def response_logprobs(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, context_length: int,
                      tokens: Tensor, temperature: float = 1.0, hidden: Tensor | None = None,
                      entropy: bool = False, shared_prefix: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs [B, R] of the response `tokens` (fp32, as `logprobs_from_logits(response_logits(...))`),
    with the head fused into the log-softmax (`_HeadLogProbs`); with `entropy`, also each position's
    entropy [B, R] (no gradient). Heads other than a bias-free linear layer take the unfused path.
    `shared_prefix`: rows sharing a prompt run it once (`backbone_hidden`)."""
    from rlhf.algorithms.core import entropy_from_logits, logprobs_from_logits

    if hidden is None:
        hidden = backbone_hidden(model, input_ids, attention_mask, context_length if shared_prefix else None)
    hidden = hidden[:, context_length - 1 : -1]
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        logits = head_fp32(head, hidden)
        logp = logprobs_from_logits(logits, tokens, temperature)
        return (logp, entropy_from_logits(logits.detach(), temperature)) if entropy else logp
    logp, ent = _HeadLogProbs.apply(hidden, head.weight, tokens, temperature, entropy)
    return (logp, ent) if entropy else logp
