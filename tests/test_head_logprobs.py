"""The fused LM head + log-softmax (`rlhf.models.sampling.response_logprobs`) against the unfused
path it replaces in the training and reference passes: same log-probs, entropies and gradients."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.algorithms.core import entropy_from_logits, logprobs_from_logits
from rlhf.models import sampling
from rlhf.models.sampling import _HeadLogProbs, response_logits, response_logprobs

V, D = 300, 16


def _inputs(seed=0, n=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, n, generator=g)
    return hidden, weight, tokens


def _unfused(hidden, weight, tokens, temperature):
    logits = hidden @ weight.T
    return logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits.detach(), temperature)


@pytest.mark.parametrize("chunk_tokens", [None, 4, 1])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_matches_unfused_values_and_gradients(temperature, chunk_tokens, monkeypatch):
    if chunk_tokens is not None:  # token slices of the [V, N] logits, recomputed in the backward (15 tokens: a ragged last slice)
        monkeypatch.setattr(sampling, "HEAD_CHUNK_BYTES", 4 * V * chunk_tokens)
    hidden, weight, tokens = _inputs()
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            logp, ent = _HeadLogProbs.apply(h, w, tokens, temperature, True)
        else:
            logp, ent = _unfused(h, w, tokens, temperature)
        (logp * upstream).sum().backward()
        grads.append((logp.detach(), ent, h.grad, w.grad))
    (lp0, e0, gh0, gw0), (lp1, e1, gh1, gw1) = grads
    assert lp1.dtype == torch.float32 and lp1.shape == tokens.shape
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)  # float rounding: log-probs here reach -30
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-4)  # lse - sum p z: cancellation at lse ~ 20
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)
    assert gw1.abs().sum() > 0 and gh1.abs().sum() > 0


def test_fused_is_fp32_under_bf16_autocast():
    hidden, weight, tokens = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = _HeadLogProbs.apply(hidden, weight, tokens, 1.0, False)
    assert logp.dtype == torch.float32
    # bf16 rounding of the head would move these by ~1e-2; fp32 keeps them at float rounding.
    torch.testing.assert_close(logp, _unfused(hidden, weight, tokens, 1.0)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_gradient_matmuls_run_in_the_autocast_dtype(chunk_tokens, monkeypatch):
    """Under bf16-mixed the head's two gradient matmuls take bf16 operands, as autocast gives every
    other layer's, while the log-probs stay fp32; the gradients agree with fp32 ones to bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if chunk_tokens is not None:
        monkeypatch.setattr(sampling, "HEAD_CHUNK_BYTES", 4 * V * chunk_tokens)

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    hidden, weight, tokens = _inputs()
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    grads = {}
    for low in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            logp, _ = _HeadLogProbs.apply(h, w, tokens, 1.0, False)
        assert logp.dtype == torch.float32
        with MatmulDtypes() as mode:
            (logp * upstream).sum().backward()
        grads[low] = (h.grad, w.grad)
        want = {torch.bfloat16} if low else {torch.float32}
        products = [d for d in mode.seen if d != {torch.float32}] if low else mode.seen
        assert len(products) >= 2 and all(d == want for d in products), mode.seen
        assert h.grad.dtype == w.grad.dtype == torch.float32
    for fp32, bf16 in zip(grads[False], grads[True]):
        assert (bf16 - fp32).abs().max() <= 2e-2 * fp32.abs().max()
        assert not torch.equal(bf16, fp32)


@pytest.mark.parametrize("chunk_tokens", [None, 2])
def test_second_backward_is_refused(chunk_tokens, monkeypatch):
    if chunk_tokens is not None:
        monkeypatch.setattr(sampling, "HEAD_CHUNK_BYTES", 4 * V * chunk_tokens)
    hidden, weight, tokens = _inputs()
    w = weight.clone().requires_grad_()
    logp, _ = _HeadLogProbs.apply(hidden, w, tokens, 1.0, False)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        logp.sum().backward()


def test_response_logprobs_on_a_model_matches_logits_path_and_trains_the_same():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    Q, responses = 4, ids[:, 4:]
    out = []
    for fused in (False, True):
        model.zero_grad()
        if fused:
            logp, ent = response_logprobs(model, ids, mask, Q, responses, 1.3, entropy=True)
        else:
            logits = response_logits(model, ids, mask, Q)
            logp, ent = logprobs_from_logits(logits, responses, 1.3), entropy_from_logits(logits.detach(), 1.3)
        logp.sum().backward()
        out.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=1e-5)
    for g1, g0 in zip(out[1][2], out[0][2]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_heads_with_a_bias_take_the_unfused_path():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=32)).eval()
    model.lm_head = torch.nn.Linear(D, V, bias=True)  # eval(): dropout off, so both paths see the same hidden
    torch.nn.init.normal_(model.lm_head.bias, std=3.0)  # a path that dropped the bias would differ a lot
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones_like(ids)
    logp = response_logprobs(model, ids, mask, 3, ids[:, 3:])
    expected = logprobs_from_logits(response_logits(model, ids, mask, 3), ids[:, 3:])
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)


def test_token_slices_bound_the_logits_the_head_materialises(monkeypatch):
    """Chunked, no [V, N] tensor is kept for the backward: what autograd saves holds at most one slice."""
    monkeypatch.setattr(sampling, "HEAD_CHUNK_BYTES", 4 * V * 4)
    hidden, weight, tokens = _inputs(n=(4, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, _ = _HeadLogProbs.apply(hidden, weight.clone().requires_grad_(), tokens, 1.0, False)
    assert logp.shape == tokens.shape
    assert max(saved) < V * tokens.numel()  # the weight [V, D] is the largest; D < N here
