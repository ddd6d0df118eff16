"""Tensor math every algorithm shares: masked statistics, log-probs and entropy from logits, KL
estimators, stop-token truncation. Pure tensor code, batch-first [batch, response_len].
"""

from __future__ import annotations

import torch
from torch import Tensor

# TRL fills log-probs at padded positions with 1.0 (not 0) so that a bug which
# forgets the mask shows up as a visibly wrong ratio/KL instead of silently
# looking like probability 1.
INVALID_LOGPROB = 1.0

_FAST_DTYPES = (torch.float32, torch.float64)


def _as_weights(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    w = _as_weights(mask, x)
    # torch.where rather than x * w so inf/nan at padded positions cannot leak in.
    xw = torch.where(w != 0, x, torch.zeros_like(x)) * w
    if dim is None:
        return xw.sum() / w.sum()
    return xw.sum(dim=dim) / w.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _as_weights(mask, x).sum()
        # TRL raises when n <= 1; we avoid a host sync and instead fall back to
        # the biased estimate (which is 0 for a single element) so whitening a
        # one-token batch yields zeros rather than NaN.
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce=None) -> Tensor:
    """(x - mean) / std over the masked entries.

    `all_reduce` (a function summing a tensor over processes) makes the statistics global: under
    data parallelism every rank then whitens with the same mean and std, as one big batch would.
    """
    if all_reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        w = _as_weights(mask, x).double()
        xd = torch.where(w != 0, x.double(), 0.0)
        n, s1, s2 = all_reduce(torch.stack([w.sum(), (xd * w).sum(), (xd * xd * w).sum()])).unbind()
        mean = s1 / n
        var = ((s2 / n - mean**2) * n / (n - 1).clamp(min=1)).clamp(min=0)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at ``tokens``; returns float32 (or float64).

    Rows are processed one at a time so peak extra memory is one [T, V] slice
    rather than a full [B, T, V] log-softmax copy. Low-precision logits are
    upcast per row, because bf16 log-probs are too coarse for PPO ratios.
    """
    out_dtype = logits.dtype if logits.dtype in _FAST_DTYPES else torch.float32
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row_logits = row_logits.to(out_dtype)
        if temperature != 1.0:
            row_logits = row_logits / temperature
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    out_dtype = logits.dtype if logits.dtype in _FAST_DTYPES else torch.float32
    rows = []
    for row_logits in logits:
        row_logits = row_logits.to(out_dtype)
        if temperature != 1.0:
            row_logits = row_logits / temperature
        # H = logsumexp(z) - sum p*z avoids log(p) = -inf for underflowed probs.
        p = torch.softmax(row_logits, dim=-1)
        rows.append(torch.logsumexp(row_logits, dim=-1) - (p * row_logits).sum(-1))
    return torch.stack(rows)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy.

    Estimators from Schulman, "Approximating KL Divergence" (2020):
    k1 is unbiased but can be negative per token; k3 is unbiased and >= 0;
    k2 (0.5 * logr^2) is biased but low-variance.
    """
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def truncate_after_stop(responses: Tensor, stop_token_id, pad_token_id) -> tuple[Tensor, Tensor, Tensor]:
    if stop_token_id is None:
        b = responses.shape[0]
        mask = torch.ones_like(responses, dtype=torch.bool)
        return responses.clone(), mask, torch.zeros(b, dtype=torch.bool, device=responses.device)
    is_stop = responses == stop_token_id
    # Valid = no stop token strictly before this position. Derived from stop
    # positions, never from pad, because GPT-2-style tokenizers use eos as pad.
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    mask = stops_before == 0
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, mask, is_stop.any(dim=1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    # Left padding would otherwise shift every real token's position; HF
    # generate uses the same convention, so training and rollout agree.
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_index(mask: Tensor) -> Tensor:
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(dim=-1).values
