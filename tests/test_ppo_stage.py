"""The PPO stage: sampling with left padding, what a PPO step may and may not change, its metrics.csv
schema and HF export, the shared value head, the adaptive KL controller, a reward model with its own
tokenizer, and the NaN guard."""
from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import transformers
from safetensors.torch import load_file

from rlhf.algorithms.core import logprobs_from_logits, truncate_after_stop
from rlhf.errors import UserError
from rlhf.models.sampling import response_logits, sample
from rlhf.training.pipeline import train
from rlhf.training.plan import build_stage
from rlhf.stages import Inputs
from rlhf.stages.ppo import PPOModule

from conftest import TINY_DATA, TINY_PPO, compose_train

REFERENCE_COLUMNS = "step,policy_loss,value_loss,kl_divergence,reward_score,learning_rate,batch_size,timestamp"


def _ppo_overrides(artifacts, *extra: str) -> list[str]:
    return ["stage=ppo", f"ppo.policy_path={artifacts['sft']}", f"reward.model_path={artifacts['rm']}",
            *TINY_DATA, *TINY_PPO, *extra]


def _train_capturing_module(cfg) -> tuple[dict, PPOModule]:
    """`train(cfg)`, keeping the PPO LightningModule it built (for looking at its weights after)."""
    box = {}
    orig = PPOModule.finish

    def finish(self, *args, **kwargs):
        box["module"] = self
        return orig(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PPOModule, "finish", finish)
        summary = train(cfg)
    return summary, box["module"]


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _hf_weights(model_dir: Path) -> dict:
    return load_file(str(Path(model_dir) / "model.safetensors"))


# ----------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=62, eos_token_id=62, pad_token_id=63)
    return transformers.GPT2LMHeadModel(cfg).eval()


PAD = 63
LENGTHS = (3, 6, 9)


def _left_padded(lengths=LENGTHS):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 60, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return prompts, ids, mask


def test_sample_logits_match_fresh_forward_with_left_padding(tiny_lm):
    prompts, ids, mask = _left_padded()
    R, temp = 8, 0.7
    torch.manual_seed(3)
    free, _ = sample(tiny_lm, ids, mask, R, temp, PAD, None)
    stop = int(free[0, 2])  # a token row 0 draws at step 2: rerun with it as the stop token
    first = int((free[0] == stop).nonzero()[0])
    torch.manual_seed(3)
    responses, logits = sample(tiny_lm, ids, mask, R, temp, PAD, stop)
    assert responses.shape == (3, R) and logits.shape == (3, R, 64)
    assert torch.equal(responses[:, : first + 1], free[:, : first + 1])  # same draws up to the stop
    responses, resp_mask, has_stop = truncate_after_stop(responses, stop, PAD)
    assert has_stop[0] and resp_mask[0].sum() <= 3  # row 0 really stops early
    assert (responses[~resp_mask] == PAD).all()

    full_ids = torch.cat([ids, responses], 1)
    full_mask = torch.cat([mask, resp_mask.long()], 1)
    with torch.no_grad():
        fresh = logprobs_from_logits(response_logits(tiny_lm, full_ids, full_mask, ids.shape[1]), responses, temp)
    gen = logprobs_from_logits(logits, responses, temp)
    assert (gen[resp_mask] - fresh[resp_mask]).abs().max().item() < 1e-4

    # Each left-padded row matches its prompt run alone, unpadded, over the whole response.
    for i, p in enumerate(prompts):
        n_valid = int(resp_mask[i].sum())
        seq = torch.cat([p, responses[i, :n_valid]])[None]
        with torch.no_grad():
            alone = tiny_lm(seq).logits[0, len(p) - 1: -1]
        assert (logits[i, :n_valid] - alone).abs().max().item() < 1e-4, i


@pytest.mark.parametrize("temp", [1.0, 0.7, 0.0])
def test_step_by_step_logprobs_are_those_of_the_kept_logits(tiny_lm, temp):
    """sample(..., logprobs=True), the rollout's path, keeps no [B, R, V] logits, and its log-probs are
    what logprobs_from_logits gives on the logits it would have kept, to float rounding (stops and padding too)."""
    _, ids, mask = _left_padded()
    free, _ = sample(tiny_lm, ids, mask, 8, temp, PAD, None, generator=torch.Generator().manual_seed(5))
    for stop in (None, int(free[0, 1]), int(free[:, 0].max())):
        kw = dict(generator=torch.Generator().manual_seed(5))
        responses, logits = sample(tiny_lm, ids, mask, 8, temp, PAD, stop, **kw)
        kw = dict(generator=torch.Generator().manual_seed(5))
        same, logp = sample(tiny_lm, ids, mask, 8, temp, PAD, stop, logprobs=True, **kw)
        assert torch.equal(same, responses) and logp.shape == responses.shape
        torch.testing.assert_close(logp, logprobs_from_logits(logits, responses, temp or 1.0), rtol=0, atol=1e-5)
    # Every row stopped at its first token: the rest is padding (zero logits), in both forms alike.
    one, one_mask = ids[:1], mask[:1]
    first = sample(tiny_lm, one, one_mask, 8, temp, PAD, None, generator=torch.Generator().manual_seed(5))[0][0, 0]
    responses, logits = sample(tiny_lm, one, one_mask, 8, temp, PAD, int(first), generator=torch.Generator().manual_seed(5))
    _, logp = sample(tiny_lm, one, one_mask, 8, temp, PAD, int(first), generator=torch.Generator().manual_seed(5),
                     logprobs=True)
    assert (responses[0, 1:] == PAD).all() and (logits[0, 1:] == 0).all()
    torch.testing.assert_close(logp, logprobs_from_logits(logits, responses, temp or 1.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("temp", [1.0, 0.0])
def test_tokens_only_sampling_draws_the_same_tokens_and_keeps_no_logits(tiny_lm, temp):
    """Evaluation and generation read only the tokens: sample(..., tokens_only=True) draws exactly the
    default path's tokens (stops and padding too) and builds no tensor of the [B, R, V] logits' size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, ids, mask = _left_padded()

    class Largest(TorchDispatchMode):  # the most logits any one tensor the sampler makes holds
        numel, rows, vocab = 0, ids.shape[0], tiny_lm.config.vocab_size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() > 1 and (t.shape[0], t.shape[-1]) == (Largest.rows, Largest.vocab):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    free, _ = sample(tiny_lm, ids, mask, 8, temp, PAD, None, generator=torch.Generator().manual_seed(5))
    for stop in (None, int(free[0, 1]), int(free[:, 0].max())):
        responses, logits = sample(tiny_lm, ids, mask, 8, temp, PAD, stop, generator=torch.Generator().manual_seed(5))
        Largest.numel = 0
        with Largest():
            same, none = sample(tiny_lm, ids, mask, 8, temp, PAD, stop, generator=torch.Generator().manual_seed(5),
                                tokens_only=True)
        assert none is None and torch.equal(same, responses)
        assert Largest.numel == Largest.rows * Largest.vocab < logits.numel()  # a step's [B, V], never [B, R, V]


def test_left_padded_row_next_token_logits_match_unpadded(tiny_lm):
    prompts, ids, mask = _left_padded()
    _, padded_logits = sample(tiny_lm, ids, mask, 1, 1.0, PAD, None)
    for i, p in enumerate(prompts):
        _, alone_logits = sample(tiny_lm, p[None], torch.ones(1, len(p), dtype=torch.long), 1, 1.0, PAD, None)
        with torch.no_grad():
            plain = tiny_lm(p[None]).logits[0, -1]
        torch.testing.assert_close(padded_logits[i, 0], alone_logits[0, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded_logits[i, 0], plain, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- one update, by hand
def test_ppo_step_changes_policy_and_value_only(trained_artifacts, tmp_path):
    from rlhf.data import PreferenceDataModule, SyntheticPreferences

    cfg = compose_train(tmp_path, *_ppo_overrides(trained_artifacts, "ppo.num_ppo_epochs=2", "ppo.num_mini_batches=2"))
    module = build_stage(cfg, "ppo", Inputs(policy=str(trained_artifacts["sft"]), reward_model=str(trained_artifacts["rm"])))
    assert isinstance(module, PPOModule)
    before = {name: copy.deepcopy(getattr(module, name).state_dict())
              for name in ("policy", "ref_policy", "reward_model", "value_model")}
    # The starting point is the SFT/RM exports, bit for bit.
    sft, rm = _hf_weights(trained_artifacts["sft"]), _hf_weights(trained_artifacts["rm"])
    for k, v in sft.items():
        assert torch.equal(before["policy"][k], v) and torch.equal(before["ref_policy"][k], v), k
    for k, v in rm.items():
        assert torch.equal(before["reward_model"][k], v), k

    splits = SyntheticPreferences(n_pairs=300, seed=cfg.seed).load()
    dm = PreferenceDataModule(splits, module.tokenizer, "prompts", module.cfg.batch_size,
                              module.cfg.max_prompt_length, module.cfg.response_length, seed=cfg.seed)
    trainer = pl.Trainer(max_steps=module.optimizer_steps_per_batch, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         limit_val_batches=0, max_epochs=-1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4  # E * M optimizer steps: one PPO update

    after = {name: getattr(module, name).state_dict() for name in before}
    assert _max_abs_diff(before["policy"], after["policy"]) > 0
    assert _max_abs_diff(before["value_model"], after["value_model"]) > 0
    for name in ("ref_policy", "reward_model"):
        for k, v in before[name].items():
            assert torch.equal(v, after[name][k]), f"{name}.{k} changed"
    assert not any(p.requires_grad for p in module.ref_policy.parameters())
    assert not any(p.requires_grad for p in module.reward_model.parameters())


# ----------------------------------------------------------------------------- a pipeline PPO run
@pytest.fixture(scope="module")
def ppo_run(trained_artifacts, module_tmp):
    run = module_tmp / "run"
    cfg = compose_train(run, *_ppo_overrides(trained_artifacts, "ppo.max_steps=2"))
    summary, module = _train_capturing_module(cfg)
    return {"run": run, "summary": summary, "module": module}


def test_ppo_metrics_csv_schema(ppo_run):
    path = ppo_run["run"] / "ppo" / "metrics.csv"
    header = path.read_text().splitlines()[0]
    assert header == REFERENCE_COLUMNS or header.startswith(REFERENCE_COLUMNS + ","), header
    df = pd.read_csv(path)
    assert df["step"].tolist() == [1, 2]
    for ts in df["timestamp"]:
        datetime.strptime(ts, "%Y-%m-%d %H:%M:%S")
    assert (df["batch_size"] == 8).all()
    for col in ("policy_loss", "value_loss", "kl_divergence", "reward_score", "learning_rate"):
        assert pd.api.types.is_float_dtype(df[col]) and df[col].notna().all(), col


def test_ppo_export_differs_from_sft_and_generates(ppo_run, trained_artifacts):
    model_dir = ppo_run["run"] / "ppo" / "model"
    assert ppo_run["summary"]["stages"]["ppo"]["model_dir"] == str(model_dir)
    ppo, sft = _hf_weights(model_dir), _hf_weights(trained_artifacts["sft"])
    assert _max_abs_diff(ppo, sft) > 0
    module = ppo_run["module"]
    for k, v in sft.items():  # the reference policy is still the SFT export
        assert torch.equal(module.ref_policy.state_dict()[k], v), k

    pipe = transformers.pipeline("text-generation", model=str(model_dir), device="cpu")
    prompt = "\n\nHuman: Any tips on cooking?\n\nAssistant:"
    out = pipe(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)

    # Greedy tokens through the pipeline are those of the trained in-memory policy.
    ids = pipe(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    seq = module.tokenizer(prompt, return_tensors="pt").input_ids
    n_prompt = seq.shape[1]
    policy = module.policy.eval()
    with torch.no_grad():
        for _ in range(5):
            logits = policy(seq).logits[0, -1]
            logits[module.tokenizer.eos_token_id] = float("-inf")  # min_new_tokens suppresses eos
            seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
    assert list(ids) == seq[0].tolist() and len(ids) == n_prompt + 5


# ----------------------------------------------------------------------------- variants
def test_shared_value_head_runs_a_step(trained_artifacts, tmp_path):
    run = tmp_path / "run"
    cfg = compose_train(run, *_ppo_overrides(trained_artifacts, "ppo.value_model=shared", "ppo.max_steps=1",
                                             "ppo.num_ppo_epochs=1", "callbacks.model_checkpoint=null"))
    _, module = _train_capturing_module(cfg)
    assert not hasattr(module, "value_model") and isinstance(module.value_head, torch.nn.Linear)
    assert module.value_head.bias.abs().max().item() > 0  # initialised at zero, then trained
    df = pd.read_csv(run / "ppo" / "metrics.csv")
    assert df["step"].tolist() == [1] and df["value_loss"].notna().all()
    assert _max_abs_diff(_hf_weights(run / "ppo" / "model"), _hf_weights(trained_artifacts["sft"])) > 0
    assert not (run / "ppo" / "value_model").exists()


def test_adaptive_kl_moves_coefficient_toward_target(trained_artifacts, tmp_path):
    run = tmp_path / "run"
    init, target, horizon = 0.05, 100.0, 40
    cfg = compose_train(run, *_ppo_overrides(trained_artifacts, "ppo.adaptive_kl=true", f"ppo.kl_coef={init}",
                                             f"ppo.target_kl={target}", f"ppo.kl_horizon={horizon}",
                                             "ppo.max_steps=2", "ppo.num_ppo_epochs=1",
                                             "callbacks.model_checkpoint=null"))
    train(cfg)
    df = pd.read_csv(run / "ppo" / "metrics.csv")
    assert df["step"].tolist() == [1, 2]
    coef = init
    for kl, logged in zip(df["kl_divergence"], df["kl_coef"]):
        err = min(max(kl / target - 1.0, -0.2), 0.2)
        expected = coef * (1 + err * 8 / horizon)
        assert logged == pytest.approx(expected, rel=1e-9)
        # KL far below target: the penalty must relax (and would grow were KL above it).
        assert (logged < coef) == (kl < target) and logged != coef
        coef = logged


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_reward_model_with_another_tokenizer(trained_artifacts, tmp_path, value_model):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from rlhf.data import SyntheticPreferences

    pairs = SyntheticPreferences(n_pairs=200, seed=0).load().train
    texts = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    wl = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="[PAD]", eos_token="[EOS]",
                                               unk_token="[UNK]")
    assert len(tok) < 1000
    torch.manual_seed(0)
    rm = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256, num_labels=1,
        pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    rm_dir = tmp_path / "word_rm"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)

    run = tmp_path / "run"
    cfg = compose_train(run, "stage=ppo", f"ppo.policy_path={trained_artifacts['sft']}",
                        f"reward.model_path={rm_dir}", *TINY_DATA, *TINY_PPO, "ppo.max_steps=1",
                        "ppo.num_ppo_epochs=1", "callbacks.model_checkpoint=null", f"ppo.value_model={value_model}")
    summary, module = _train_capturing_module(cfg)
    assert module.same_tokenizer is False
    assert module.rm_tokenizer.get_vocab() == tok.get_vocab()
    df = pd.read_csv(run / "ppo" / "metrics.csv")
    assert df["step"].tolist() == [1] and df["reward_score"].notna().all()
    assert "reward_after" in summary["stages"]["ppo"]


def test_nan_reward_stops_with_user_error(trained_artifacts, tmp_path, monkeypatch):
    import rlhf.stages.online as online_stage  # where every online stage scores its rollouts

    def nan_scores(model, input_ids, attention_mask, normalize=True, prompt_length=None):
        return torch.full((input_ids.shape[0],), float("nan"))

    monkeypatch.setattr(online_stage, "reward_scores", nan_scores)
    run = tmp_path / "run"
    cfg = compose_train(run, *_ppo_overrides(trained_artifacts, "ppo.max_steps=2", "callbacks.model_checkpoint=null"))
    with pytest.raises(UserError, match=r"non-finite scores at PPO step 1\b"):
        train(cfg)
    assert not (run / "ppo" / "model").exists()
    assert not (run / "summary.json").exists()


def test_ppo_checkpoint_omits_frozen_models_and_restores(ppo_run, trained_artifacts, tmp_path):
    import torch

    ckpt_path = ppo_run["run"] / "ppo" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("policy.") for k in keys) and any(k.startswith("value_model.") for k in keys)
    assert not any(k.startswith(("ref_policy.", "reward_model.")) for k in keys)
    assert "kl_ctl" in ckpt and ckpt["episodes"] > 0
    # As `resume=` restores it: the module built from its config and exports, then the checkpoint on top.
    cfg = compose_train(tmp_path, *_ppo_overrides(trained_artifacts))
    restored = build_stage(cfg, "ppo", Inputs(policy=str(trained_artifacts["sft"]), reward_model=str(trained_artifacts["rm"])))
    missing, unexpected = restored.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected and all(k.startswith(("ref_policy.", "reward_model.")) for k in missing)
    restored.on_load_checkpoint(ckpt)
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(restored.state_dict()[name], value), name
    # The frozen models come back from their exports, untouched by training.
    ref = restored.ref_policy.state_dict()
    for name, value in restored.policy.state_dict().items():
        if name in ref and not torch.equal(ref[name], value):
            break
    else:
        raise AssertionError("restored policy equals the reference: trained weights were not loaded")
    assert restored.episodes == ckpt["episodes"] and restored.kl_ctl.value == ckpt["kl_ctl"]["value"]
