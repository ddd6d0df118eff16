"""Rows that share a prompt compute it once (rlhf/models/shared_prefix.py): the same hidden states,
log-probs, draws and gradients as the plain forward, with the body doing less work, and a GRPO
update that gives the same result either way."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import transformers

from rlhf.models.reward import load_reward_model, reward_scores
from rlhf.models.causal_lm import ModelConfig
from rlhf.models.sampling import backbone_hidden, response_logprobs, sample
from rlhf.models.shared_prefix import distinct_prompts
from rlhf.stages import Inputs
from rlhf.training.plan import build_stage

from conftest import TINY_DATA, compose_train

PAD = 63
P, R = 7, 5


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _groups():
    """3 left-padded prompts x 3 responses each, rows shuffled (as a minibatch draws them), one
    response ending early (right padding)."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 60, (3, P), generator=g)
    pmask = torch.ones(3, P, dtype=torch.long)
    pmask[0, :4] = 0
    pmask[2, :2] = 0
    prompts[pmask == 0] = PAD
    order = torch.tensor([4, 0, 8, 2, 6, 1, 5, 3, 7])
    q, qm = prompts.repeat_interleave(3, 0)[order], pmask.repeat_interleave(3, 0)[order]
    r = torch.randint(0, 60, (9, R), generator=g)
    rm = torch.ones(9, R, dtype=torch.long)
    rm[1, 3:] = 0
    r[rm == 0] = PAD
    return q, qm, r, torch.cat([q, r], 1), torch.cat([qm, rm], 1)


class _TokenCount:
    """Tokens (rows x positions) the first transformer block of `model` is given, per call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.base_model.h[0].register_forward_pre_hook(
            lambda mod, args: self.calls.append(args[0].shape[0] * args[0].shape[1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_distinct_prompts_finds_shared_rows_in_any_order():
    q, qm, *_ = _groups()
    first, inverse = distinct_prompts(q, qm, P)
    assert len(first) == 3
    assert torch.equal(q[first][inverse], q) and torch.equal(qm[first][inverse], qm)
    one_each = [1, 0, 2]  # rows 0, 4 and 8 before the shuffle: one response per prompt
    assert distinct_prompts(q[one_each], qm[one_each], P) is None


def test_shared_prefix_gives_the_plain_forward_with_less_work(lm):
    q, qm, r, ids, mask = _groups()
    with _TokenCount(lm) as plain:
        h0 = backbone_hidden(lm, ids, mask)
        l0 = response_logprobs(lm, ids, mask, P, r, hidden=h0)
    with _TokenCount(lm) as shared:
        h1 = backbone_hidden(lm, ids, mask, prompt_length=P)
        l1 = response_logprobs(lm, ids, mask, P, r, hidden=h1)
    assert plain.calls == [9 * (P + R)] and shared.calls == [3 * P, 9 * R]
    real = mask.bool()
    torch.testing.assert_close(h1[real], h0[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=0)
    # Gradients: each prompt's share from its three responses is summed through the copied cache.
    weights = [lm.transformer.wte.weight, lm.transformer.h[0].attn.c_attn.weight, lm.transformer.wpe.weight]
    g0 = torch.autograd.grad(l0.sum(), weights)
    g1 = torch.autograd.grad(l1.sum(), weights)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def _saved_weight_casts(lm, forward) -> int:
    """Distinct low-precision copies of the model's weights that autograd keeps for the backward."""
    shapes = {tuple(w.shape) for name, w in lm.named_parameters() if name.endswith("weight") and w.dim() == 2}
    saved = set()

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
            saved.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return len(saved)


def test_shared_prefix_casts_each_weight_once_under_bf16_autocast(lm):
    # Lightning's bf16-mixed autocast has no cast cache: a body called twice would cast (and keep
    # for the backward) every weight twice. The cache is emptied afterwards, so a weight changed in
    # place (an optimizer step) is seen by the next forward.
    q, qm, r, ids, mask = _groups()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        plain = _saved_weight_casts(lm, lambda: backbone_hidden(lm, ids, mask))
        shared = _saved_weight_casts(lm, lambda: backbone_hidden(lm, ids, mask, prompt_length=P))
        assert shared == plain > 0
        w = lm.transformer.h[0].mlp.c_fc.weight
        with torch.no_grad():
            w.mul_(2.0)
        try:
            h0, h1 = backbone_hidden(lm, ids, mask), backbone_hidden(lm, ids, mask, prompt_length=P)
        finally:
            with torch.no_grad():
                w.div_(2.0)
    real = mask.bool()
    torch.testing.assert_close(h1[real], h0[real], atol=0.05, rtol=0.02)  # bf16 rounding of two paths


def test_shared_prefix_falls_back_to_the_plain_forward(lm):
    q, qm, r, ids, mask = _groups()
    with _TokenCount(lm) as seen:
        backbone_hidden(lm, ids[[1, 0, 2]], mask[[1, 0, 2]], prompt_length=P)  # one response per prompt
    assert seen.calls == [3 * (P + R)]
    for no_prompt in (0, P + R):  # nothing before the responses, or nothing after the prompts
        with _TokenCount(lm) as seen:
            backbone_hidden(lm, ids, mask, prompt_length=no_prompt)
        assert seen.calls == [9 * (P + R)]
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    try:  # the cache is off while a checkpointed model trains, so there is nothing to share
        with _TokenCount(lm) as seen:
            backbone_hidden(lm, ids, mask, prompt_length=P)
        assert seen.calls == [9 * (P + R)]
    finally:
        lm.activation_checkpointing_disable()
        lm.eval()


def test_sampler_prefills_each_prompt_once_and_draws_the_same(lm):
    q, qm, *_ = _groups()
    out = {}
    for shared in (False, True):
        with _TokenCount(lm) as seen:
            g = torch.Generator().manual_seed(5)
            out[shared] = sample(lm, q, qm, R, 1.0, PAD, None, generator=g, logprobs=True, shared_prefix=shared)
        assert seen.calls[0] == (3 if shared else 9) * P and seen.calls[1:] == [9] * (R - 1)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-6, rtol=0)


def test_reward_model_scores_the_same_with_shared_prompts():
    torch.manual_seed(0)
    arch = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    model = load_reward_model(ModelConfig(arch=arch), vocab_size=64, pad_token_id=PAD).eval()
    *_, ids, mask = _groups()
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(model, ids, mask, prompt_length=P), reward_scores(model, ids, mask),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("lora", [(), ("model/lora=default", "model.lora.r=4")], ids=["full", "lora"])
def test_a_grpo_update_is_the_same_with_and_without_shared_prompts(trained_artifacts, tmp_path, lora):
    """One GRPO update (2 prompts x 4 responses, 2 passes) from the same seed: the same responses,
    scores and reference log-probs (with LoRA: the policy with its adapter off), weights equal to
    float rounding, and fewer tokens through the body."""
    from rlhf.data import PreferenceDataModule, SyntheticPreferences

    results = {}
    for shared in (False, True):
        cfg = compose_train(tmp_path / str(shared), "stage=grpo", "algo=grpo", f"grpo.policy_path={trained_artifacts['sft']}",
                            f"reward.model_path={trained_artifacts['rm']}", *TINY_DATA, "grpo.batch_size=8",
                            "grpo.num_generations=4", "grpo.response_length=6", "grpo.max_prompt_length=48",
                            "grpo.eval_prompts=8", f"grpo.shared_prefix={str(shared).lower()}", *lora)
        pl.seed_everything(cfg.seed)
        module = build_stage(cfg, "grpo", Inputs(policy=str(trained_artifacts["sft"]),
                                                 reward_model=str(trained_artifacts["rm"])))
        captured, update = {}, module.update

        def capture(roll):
            captured["roll"] = roll
            return update(roll)

        module.update = capture
        before = copy.deepcopy(module.policy.state_dict())
        splits = SyntheticPreferences(n_pairs=300, seed=cfg.seed).load()
        dm = PreferenceDataModule(splits, module.tokenizer, "prompts", module.cfg.loader_batch_size,
                                  module.cfg.max_prompt_length, module.cfg.response_length, seed=cfg.seed)
        trainer = pl.Trainer(max_steps=module.optimizer_steps_per_batch, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                             limit_val_batches=0, max_epochs=-1)
        with _TokenCount(module.policy) as seen:
            trainer.fit(module, datamodule=dm)
        results[shared] = (captured["roll"], copy.deepcopy(module.policy.state_dict()), sum(seen.calls))
    (r0, w0, n0), (r1, w1, n1) = results[False], results[True]
    assert r0.prompts[0] == r0.prompts[3] != r0.prompts[4]  # two prompts, four responses each
    assert torch.equal(r0.responses, r1.responses)
    torch.testing.assert_close(r1.scores, r0.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(r1.ref_logprobs, r0.ref_logprobs, atol=1e-5, rtol=0)
    assert max((w0[k] - before[k]).abs().max().item() for k in w0) > 1e-3  # the update moved the weights
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) < 1e-5  # and moved them the same way
    assert n1 < n0  # the policy's body saw each prompt once per group in sampling and training
