"""The decode step with static shapes (rlhf/models/graph_decode.py), which `sample(graph=True)` captures
in a CUDA graph: here, without CUDA, the same step under dynamo's trace alone must draw what the
dynamic-cache loop draws, compile to one graph with no break for every step and every prompt length
of a bucket, and keep its cache at one address across rollouts (what a graph's replay needs)."""
from __future__ import annotations

import pytest
import torch
import transformers

from rlhf.models import graph_decode
from rlhf.models.sampling import sample

PAD, P, R = 63, 7, 6


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _prompts(n_rows: int, length: int, groups: int = 1):
    g = torch.Generator().manual_seed(length)
    q = torch.randint(0, 60, (n_rows // groups, length), generator=g).repeat_interleave(groups, 0)
    qm = torch.ones_like(q)
    qm[0, :3] = 0  # left padding
    q[qm == 0] = PAD
    return q, qm


class _Counting:
    """A dynamo backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("shared", [False, True])
def test_static_step_draws_what_the_dynamic_loop_draws(lm, shared):
    q, qm = _prompts(6, P, groups=3 if shared else 1)
    out = {}
    for graph in (False, True):
        g = torch.Generator().manual_seed(5)
        out[graph] = sample(lm, q, qm, R, 1.0, PAD, stop_token_id=7, generator=g, logprobs=True,
                            shared_prefix=shared, graph=graph, graph_backend="eager" if graph else None)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    greedy = sample(lm, q, qm, R, 0.0, PAD, generator=g1)
    static = sample(lm, q, qm, R, 0.0, PAD, generator=g2, graph=True, graph_backend="eager")
    assert torch.equal(greedy[0], static[0])
    torch.testing.assert_close(greedy[1], static[1], atol=1e-5, rtol=0)


def test_one_graph_for_every_step_and_prompt_length_and_one_cache_address(lm):
    backend = _Counting()
    addresses = set()
    for length in (P, P + 2, P):  # the batches' prompt lengths differ; one bucket holds them all
        q, qm = _prompts(4, length)
        sample(lm, q, qm, R, 1.0, PAD, generator=torch.Generator().manual_seed(0), graph=True, graph_backend=backend)
        caches = [c for key, c in graph_decode._CACHES[lm.base_model].items() if key[0] == 4]
        addresses |= {c.layers[0].keys.data_ptr() for c in caches}
    assert backend.graphs == 1
    assert len(caches) == 1 and len(addresses) == 1


def test_a_graph_without_cuda_is_refused_by_name(lm):
    q, qm = _prompts(2, P)
    with pytest.raises(ValueError, match="needs CUDA; the model is on cpu"):
        sample(lm, q, qm, R, 1.0, PAD, graph=True)
