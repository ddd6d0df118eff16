"""Numbers PPO reports must be trustworthy: the critic starts in the reward's units, heads compute in
fp32 under bf16 autocast (rollout and training log-probs agree before any step), the sampler never
draws a zero-probability token, weight decay is explicit, and the policy and value model are
clipped each on its own."""
from __future__ import annotations

import json
import shutil

import pytest
import pytorch_lightning as pl
import torch
import transformers

from rlhf.algorithms.core import truncate_after_stop
from rlhf.models.causal_lm import fast_fp32_matmul
from rlhf.models.reward import token_values
from rlhf.models.sampling import response_logits, sample
from rlhf.stages.common import adamw, clip_each
from rlhf.training.plan import build_stage
from rlhf.stages import Inputs
from rlhf.stages.ppo import PPOModule

from conftest import TINY_DATA, TINY_PPO, compose_train


def _module(artifacts, tmp_path, *extra, reward_init=None) -> PPOModule:
    cfg = compose_train(tmp_path, "stage=ppo", f"ppo.policy_path={artifacts['sft']}",
                        f"reward.model_path={reward_init or artifacts['rm']}", *TINY_DATA, *TINY_PPO, *extra)
    return build_stage(cfg, "ppo", Inputs(policy=str(artifacts["sft"]), reward_model=str(reward_init or artifacts["rm"])))


def _rm_with_normalisation(artifacts, tmp_path, mean: float, std: float):
    rm = tmp_path / "rm"
    shutil.copytree(artifacts["rm"], rm)
    conf = json.loads((rm / "config.json").read_text())
    conf.update(reward_mean=mean, reward_std=std)
    (rm / "config.json").write_text(json.dumps(conf))
    return rm


# ----------------------------------------------------------------------------- critic units
def test_value_model_starts_equal_to_the_normalised_reward(trained_artifacts, tmp_path):
    """At a response's stop token the value model (a copy of the RM) predicts that response's score."""
    rm = _rm_with_normalisation(trained_artifacts, tmp_path, mean=2.5, std=3.0)
    module = _module(trained_artifacts, tmp_path, reward_init=rm)
    tok, eos = module.tokenizer, module.tokenizer.eos_token_id
    prompts = ["\n\nHuman: Any tips on cooking?\n\nAssistant:", "\n\nHuman: Help me with money, please.\n\nAssistant:"]
    answers = [" sure recipe oven", " glad budget"]
    q = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    r = [tok(a, add_special_tokens=False).input_ids + [eos] for a in answers]
    Q, R = max(map(len, q)), max(map(len, r)) + 2  # two columns of padding after the longest answer
    queries = torch.full((2, Q), tok.pad_token_id)
    qmask = torch.zeros(2, Q, dtype=torch.long)
    responses = torch.full((2, R), tok.pad_token_id)
    for i in range(2):
        queries[i, Q - len(q[i]):], qmask[i, Q - len(q[i]):] = torch.tensor(q[i]), 1
        responses[i, : len(r[i])] = torch.tensor(r[i])
    responses, resp_mask, has_stop = truncate_after_stop(responses, eos, tok.pad_token_id)
    assert has_stop.all()
    with torch.no_grad():
        scores = module.score(queries, qmask, responses, resp_mask, prompts)  # before any missing-EOS penalty
        values = module._values(torch.cat([queries, responses], 1), torch.cat([qmask, resp_mask.long()], 1), Q)
    at_eos = values[torch.arange(2), torch.tensor([len(x) - 1 for x in r])]
    torch.testing.assert_close(at_eos, scores, atol=1e-5, rtol=1e-5)
    # and these are the normalised units: the raw head is mean + std * score
    ids = torch.cat([queries, responses], 1)
    raw = token_values(module.value_model, ids, torch.cat([qmask, resp_mask.long()], 1))[:, Q - 1:-1]
    torch.testing.assert_close(raw[torch.arange(2), torch.tensor([len(x) - 1 for x in r])], 2.5 + 3.0 * scores,
                               atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- fp32 heads
def test_heads_compute_in_fp32_under_bf16_autocast(trained_artifacts, tmp_path):
    module = _module(trained_artifacts, tmp_path)
    policy, head = module.policy.eval(), module.policy.get_output_embeddings()
    tok = module.tokenizer
    enc = tok(["\n\nHuman: Any tips on music?\n\nAssistant:"] * 2, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = policy.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = response_logits(policy, ids, mask, 3)
        values = token_values(module.value_model, ids, mask)
        _, gen_logits = sample(policy, ids, mask, 2, 1.0, tok.pad_token_id, None, generator=torch.Generator().manual_seed(0))
    assert logits.dtype == values.dtype == gen_logits.dtype == torch.float32
    # Exactly the fp32 product of the (fp32) hidden states with the head: nothing was rounded to bf16.
    # (Computed as the heads compute it: on oneDNN's fp32 kernels where `fast_fp32_matmul` found them exact.)
    with fast_fp32_matmul("cpu"):
        expected, expected_gen = hidden[:, 2:-1].float() @ head.weight.float().T, hidden[:, -1].float() @ head.weight.float().T
    assert torch.equal(logits, expected)
    assert torch.equal(gen_logits[:, 0], expected_gen)
    # ... and that kernel agrees with the default fp32 one to float rounding (bf16 would be off by ~1e-2 here).
    torch.testing.assert_close(logits, hidden[:, 2:-1].float() @ head.weight.float().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen_logits[:, 0], hidden[:, -1].float() @ head.weight.float().T, rtol=1e-5, atol=1e-5)


def _gpt2_like_logits(model, offset: float = -100.0) -> None:
    """Shift every logit by about `offset` without changing the distribution, as GPT-2's are (~ -100).

    The LM head gets its own weights, wte + 10 r (r a unit vector), and the final norm's bias
    gains offset / 10 * r: each logit moves by offset + h.r * 10 + O(0.2), the same for every token.
    """
    r = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
    r /= r.norm()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone() + 10 * r)
        model.transformer.ln_f.bias += offset / 10 * r


def test_bf16_update_with_sdpa_starts_at_ratio_one(trained_artifacts, tmp_path):
    """Before any optimizer step the training forward must reproduce the rollout's log-probs.

    With logits at GPT-2's magnitudes, bf16 rounding steps are 0.5 nats: with the LM head under
    autocast, the sampler's log-probs and the training forward's differed by up to 0.5 nats here,
    and 1-2% of tokens started outside the 0.2 clip (sdpa's cached decode and full forward round
    differently). With the heads in fp32 the gap is float noise.
    """
    module = _module(trained_artifacts, tmp_path, "model.attn_implementation=sdpa", "ppo.num_ppo_epochs=1",
                     "ppo.num_mini_batches=1", "ppo.batch_size=32", "ppo.response_length=16")
    _gpt2_like_logits(module.policy)
    _gpt2_like_logits(module.ref_policy)
    from rlhf.data import PreferenceDataModule, SyntheticPreferences

    dm = PreferenceDataModule(SyntheticPreferences(n_pairs=300, seed=0).load(), module.tokenizer, "prompts", 32,
                              module.cfg.max_prompt_length, 16, seed=0)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0,
                         max_epochs=-1, precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)  # one minibatch of one epoch: every number below is pre-step
    m = {k: float(v) for k, v in trainer.logged_metrics.items()}
    assert m["policy/logprob_gap_max"] < 0.02, m
    assert m["policy/clipfrac_avg"] == 0.0, m
    assert abs(m["policy/ratio"] - 1.0) < 1e-3, m


# ----------------------------------------------------------------------------- sampler
def test_sampler_never_draws_a_zero_probability_token(monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.lm_head = torch.nn.Linear(16, 16, bias=True)  # untied, with a bias that rules token 0 out
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[0] = float("-inf")
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(*a[:2], dtype=k.get("dtype")))
    ids = torch.randint(1, 16, (4, 5))
    responses, logits = sample(model, ids, torch.ones_like(ids), 6, 1.0, 15, None)
    assert (responses != 0).all()
    logp = torch.log_softmax(logits, -1).gather(-1, responses[..., None])
    assert torch.isfinite(logp).all()


# ----------------------------------------------------------------------------- optimizer
def test_weight_decay_is_explicit_and_spares_biases_and_norms(trained_artifacts, tmp_path):
    module = _module(trained_artifacts, tmp_path)
    trainer = type("T", (), {"precision": "32-true", "max_steps": 4})()
    module._trainer = trainer
    opt = module.configure_optimizers()["optimizer"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0]  # not torch's hidden 0.01
    module.cfg.weight_decay = 0.1
    opt = module.configure_optimizers()["optimizer"]
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    none = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert id(p) in (decay if p.ndim >= 2 else none), name
    ln = module.policy.transformer.ln_f
    assert id(ln.weight) in none and id(ln.bias) in none
    assert id(module.policy.transformer.h[0].attn.c_attn.weight) in decay
    assert adamw([torch.nn.Parameter(torch.ones(2))], trainer).param_groups[0]["weight_decay"] == 0.0


def test_policy_and_value_model_are_clipped_separately(trained_artifacts, tmp_path):
    module = _module(trained_artifacts, tmp_path, "ppo.max_grad_norm=1.0")
    for p in module.policy.parameters():
        p.grad = torch.full_like(p, 1e-4)
    for p in module.value_model.parameters():
        p.grad = torch.full_like(p, 10.0)  # a critic gradient far above the limit
    policy_before = [p.grad.clone() for p in module.policy.parameters()]
    module.on_before_optimizer_step(None)
    assert all(torch.equal(p.grad, g) for p, g in zip(module.policy.parameters(), policy_before))
    value_norm = torch.nn.utils.get_total_norm([p.grad for p in module.value_model.parameters()])
    assert value_norm.item() == pytest.approx(1.0, rel=1e-2)  # fp32 sums over ~7M equal squares
    assert set(module._grad_norms) == {"policy", "value"} and module._grad_norms["value"][0] > 100
    # The function itself: each group on its own, the norms before clipping returned.
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])
    norms = clip_each({"a": [a], "b": [b]}, 1.0)
    assert norms["a"].item() == pytest.approx(5.0) and norms["b"].item() == pytest.approx(0.5)
    assert a.grad.norm().item() == pytest.approx(1.0) and torch.equal(b.grad, torch.tensor([0.3, 0.4, 0.0]))
