"""Linear layers on oneDNN-prepacked weights while a model decodes on CPU.

    with packed_linears(policy):      # what `rlhf.models.sampling.sample` does around a rollout
        ...                           # every Linear / Conv1D runs on a weight reordered once

A decode step multiplies a few rows by every weight matrix. PyTorch's default CPU path for that
(`addmm`) reorders nothing in advance, and at 1-32 rows it streams the weights at a fraction of the
memory bandwidth; oneDNN's linear on a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the layout `torch.compile` freezing also prepacks)
runs the same products 1.5-2x faster (docs/benchmark.md). A rollout
reuses its weights for every step, so the reorder is paid once per rollout, as the bf16 casts of
`cached_autocast` (`rlhf.models.causal_lm`) are.

Numbers: only inside a bf16 autocast (bf16-mixed), where each layer computes as its ordinary
forward would (the body in bf16, the output heads in fp32, as `head_fp32` runs them), and where the
sampled tokens and logits came out bit-identical to the unpacked path's on the machine this was
measured on. fp32 runs are not packed: oneDNN's fp32 kernels round differently from the default
ones (logits within 5e-6), enough to move a seeded run onto another trajectory. Nothing is packed
while autograd records (the packed forward has no backward), nor off CPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from rlhf.models.causal_lm import output_heads


@functools.lru_cache(maxsize=None)
def _supported(dtype: torch.dtype) -> bool:
    """Whether this build and CPU run oneDNN's prepacked linear in `dtype`, checked once on a small layer
    at GPT-2's logit magnitudes: in fp32 the results must be fp32-exact, as the heads' log-probs need."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(256, generator=g)
    direction /= direction.norm()
    w = torch.randn(512, 256, generator=g) * 0.05 + direction * 2.0
    h = torch.randn(8, 256, generator=g) - direction * 50.0  # logits near -100, as GPT-2's
    try:
        y = torch.ops.mkldnn._linear_pointwise(h.to(dtype), torch.ops.mkldnn._reorder_linear_weight(w.to(dtype)),
                                               None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    # fp32 must stay fp32 (a global oneDNN setting could let it round inputs to bf16); bf16 only has to compute
    exact = h.to(dtype).double() @ w.to(dtype).double().T
    return bool(((y.double() - exact).abs().max() / exact.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-2))


def _packed_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    if torch.is_grad_enabled():  # the packed op has no backward: a caller that records autograd gets the usual layer
        return type(module).forward(module, x)
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).to(dtype), weight, bias, "none", [], "")
    return y.view(*shape[:-1], y.shape[-1])


@contextlib.contextmanager
def packed_linears(model: nn.Module):
    """Inside, `model`'s Linear and Conv1D layers on CPU run on weights prepacked for oneDNN (see the
    module docstring); on leaving, their own forwards come back."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, weight [in, out]

    device = next(model.parameters()).device.type
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if device != "cpu" or torch.is_grad_enabled() or autocast != torch.bfloat16:
        yield
        return
    heads = {id(m) for h in output_heads(model) for m in h.modules()}
    patched = []
    try:
        for m in model.modules():
            if not isinstance(m, (nn.Linear, Conv1D)) or "forward" in vars(m):
                continue
            dtype = torch.float32 if id(m) in heads else torch.bfloat16
            if m.weight.dtype not in (torch.float32, torch.bfloat16) or not _supported(dtype):
                continue
            w = m.weight.detach().to(dtype)
            w = w.t().contiguous() if isinstance(m, Conv1D) else w.contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            bias = None if m.bias is None else m.bias.detach().to(dtype)
            m.forward = functools.partial(_packed_forward, m, weight=packed, bias=bias, dtype=dtype)
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
