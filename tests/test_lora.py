"""LoRA (`model/lora=default`) in every stage: only the adapter (and a new scalar head) trains, exports
are plain Hugging Face models, PPO's reference is the policy with its adapter off (no second copy),
and what that saves in parameter + optimizer memory. Bad LoRA values fail at config time."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from rlhf.algorithms.core import logprobs_from_logits
from rlhf.errors import ConfigError
from rlhf.models.lora import LoRAConfig, add_lora, adapter_disabled, has_lora
from rlhf.models.sampling import response_logits, sample
from rlhf.training.pipeline import train
from rlhf.stages.ppo import PPOModule
from rlhf.stages.reward_model import RewardModelModule
from rlhf.stages.sft import SFTModule

from conftest import TINY_DATA, TINY_PPO, TINY_RM, TINY_SFT, compose_train

LORA = ["model/lora=default", "model.lora.r=4"]


def _train_keeping(cfg, cls) -> tuple[dict, object, dict]:
    """`train(cfg)`, keeping the `cls` module it built and a copy of its weights before the first step."""
    box = {}
    finish = cls.finish

    def on_fit_start(self):
        box["before"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def keep(self, *args, **kwargs):
        box["module"] = self
        return finish(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "on_fit_start", on_fit_start)
        mp.setattr(cls, "finish", keep)
        summary = train(cfg)
    return summary, box["module"], box["before"]


def _only_adapter_changed(module, before: dict, trainable: tuple[str, ...] = ("lora_",)) -> None:
    after = module.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed, "training changed nothing"
    assert all(any(t in k for t in trainable) for k in changed), sorted(changed)
    assert all(k in changed for k in before if "lora_B" in k), "an adapter was not trained"
    may_train = {n for n in before if any(t in n for t in trainable)}
    assert {n for n, p in module.named_parameters() if p.requires_grad} <= may_train


def _optimizer_holds_trainable_only(module) -> None:
    opt = module.trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert in_opt == trainable
    assert {id(p) for p in opt.state} <= trainable


def _plain_export(model_dir: Path, auto_cls, **kwargs):
    """The export loads with plain transformers, no missing or leftover (LoRA) weights."""
    assert not (model_dir / "adapter_config.json").exists()
    keys = load_file(str(model_dir / "model.safetensors")).keys()
    assert not [k for k in keys if "lora_" in k or "base_layer" in k or "modules_to_save" in k or "original_module" in k]
    model, info = auto_cls.from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


# ----------------------------------------------------------------------------- the adapter itself
def test_adapter_disabled_nests_and_restores():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=63, eos_token_id=63)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    model = add_lora(copy.deepcopy(base), LoRAConfig(r=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # a trained adapter
    ids = torch.randint(0, 64, (2, 7))
    logits = lambda m: m(ids).logits  # noqa: E731
    with torch.no_grad():
        plain, adapted = logits(base), logits(model)
        assert (adapted - plain).abs().max() > 1e-3
        with adapter_disabled(model):
            torch.testing.assert_close(logits(model), plain)
            with adapter_disabled(model):
                torch.testing.assert_close(logits(model), plain)
            torch.testing.assert_close(logits(model), plain)  # still off after the inner block
        torch.testing.assert_close(logits(model), adapted)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with adapter_disabled(base):  # no LoRA: nothing to switch
        pass


# ----------------------------------------------------------------------------- SFT and RM
def test_sft_with_lora_trains_adapter_only_and_exports_plain_model(tmp_path):
    cfg = compose_train(tmp_path / "run", "stage=sft", *LORA, *TINY_DATA, *TINY_SFT, "sft.max_steps=5")
    summary, module, before = _train_keeping(cfg, SFTModule)
    assert has_lora(module.model)
    _only_adapter_changed(module, before)
    _optimizer_holds_trainable_only(module)

    model_dir = Path(summary["stages"]["sft"]["model_dir"])
    exported = _plain_export(model_dir, transformers.AutoModelForCausalLM)
    w = exported.state_dict()
    name = "transformer.h.0.attn.c_attn"
    assert not torch.equal(w[f"{name}.weight"], before[f"model.{name}.base_layer.weight"])  # the adapter, merged
    assert torch.equal(w["transformer.wte.weight"], before["model.transformer.wte.weight"])  # not adapted
    ids = torch.randint(0, 50000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module.model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_rm_with_lora_trains_adapter_and_score_head(tmp_path):
    cfg = compose_train(tmp_path / "run", "stage=rm", *LORA, *TINY_DATA, *TINY_RM, "rm.max_steps=5")
    summary, module, before = _train_keeping(cfg, RewardModelModule)
    _only_adapter_changed(module, before, trainable=("lora_", "score.modules_to_save"))
    assert not torch.equal(module.model.score.modules_to_save["default"].weight,
                           before["model.score.modules_to_save.default.weight"])  # the head trained in full
    _optimizer_holds_trainable_only(module)
    assert 0 <= summary["stages"]["rm"]["rm_accuracy"] <= 1

    exported = _plain_export(Path(summary["stages"]["rm"]["model_dir"]), transformers.AutoModelForSequenceClassification,
                             num_labels=1)
    assert not torch.equal(exported.score.weight, before["model.score.original_module.weight"])
    ids = torch.randint(0, 50000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module.model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- PPO
def _ppo(artifacts, run, *extra: str) -> tuple[dict, PPOModule, dict]:
    cfg = compose_train(run, "stage=ppo", f"ppo.policy_path={artifacts['sft']}",
                        f"reward.model_path={artifacts['rm']}", *TINY_DATA, *TINY_PPO, *extra)
    return _train_keeping(cfg, PPOModule)


@pytest.fixture(scope="module")
def lora_ppo(trained_artifacts, module_tmp):
    run = module_tmp / "run"
    summary, module, before = _ppo(trained_artifacts, run, *LORA, "ppo.max_steps=2")
    return {"run": run, "summary": summary, "module": module, "before": before}


def test_ppo_with_lora_reference_is_the_base_model(lora_ppo, trained_artifacts):
    module = lora_ppo["module"]
    # No second copy of the policy: one causal LM in the module; the reward model lost its (unused) adapter.
    assert module.ref_policy is None
    assert sum(isinstance(m, transformers.GPT2LMHeadModel) for m in module.modules()) == 1
    assert has_lora(module.policy) and has_lora(module.value_model) and not has_lora(module.reward_model)
    _only_adapter_changed(module, lora_ppo["before"], trainable=("lora_", "score.modules_to_save"))
    _optimizer_holds_trainable_only(module)

    sft = transformers.AutoModelForCausalLM.from_pretrained(str(trained_artifacts["sft"])).eval()
    tok = module.tokenizer
    enc = tok(["\n\nHuman: Any tips on cooking?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"],
              return_tensors="pt", padding=True)
    q, qm = enc.input_ids, enc.attention_mask
    module.policy.eval()
    torch.manual_seed(0)
    resp, _ = sample(module.policy, q, qm, 8, 1.0, tok.pad_token_id, None)
    ids, mask = torch.cat([q, resp], 1), torch.cat([qm, torch.ones_like(resp)], 1)
    Q = q.shape[1]
    with torch.no_grad():
        policy_lp = logprobs_from_logits(response_logits(module.policy, ids, mask, Q), resp, 1.0)
        ref_lp = module.ref_logprobs(ids, mask, Q, resp)
        base_lp = logprobs_from_logits(response_logits(sft, ids, mask, Q), resp, 1.0)
        again = logprobs_from_logits(response_logits(module.policy, ids, mask, Q), resp, 1.0)
    torch.testing.assert_close(ref_lp, base_lp, atol=1e-5, rtol=1e-5)  # reference = SFT export, adapter off
    assert (policy_lp - ref_lp).abs().max() > 1e-4  # the trained adapter moved the policy
    torch.testing.assert_close(again, policy_lp)  # and it is back on after the reference pass
    assert all(p.requires_grad for n, p in module.policy.named_parameters() if "lora_" in n)

    ppo = _plain_export(lora_ppo["run"] / "ppo" / "model", transformers.AutoModelForCausalLM)
    assert any(not torch.equal(v, sft.state_dict()[k]) for k, v in ppo.state_dict().items())
    _plain_export(lora_ppo["run"] / "ppo" / "value_model", transformers.AutoModelForSequenceClassification, num_labels=1)
    assert torch.isfinite(torch.tensor(lora_ppo["summary"]["stages"]["ppo"]["kl_final"]))  # evaluation ran


def _held_bytes(module) -> tuple[int, int]:
    """Bytes of the module's parameters (tied ones once) and of its optimizer's state."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    opt = module.trainer.optimizers[0]
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return params, state


def test_lora_saves_memory_in_ppo(lora_ppo, trained_artifacts, tmp_path):
    _, full, _ = _ppo(trained_artifacts, tmp_path / "run", "ppo.max_steps=1")
    assert full.ref_policy is not None
    policy_copy = sum(p.numel() * p.element_size() for p in full.ref_policy.parameters())
    (fp, fs), (lp, ls) = _held_bytes(full), _held_bytes(lora_ppo["module"])
    mb = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"\nPPO module, tiny GPT-2 ({policy_copy / 4 / 1e6:.2f}M parameters per model), LoRA r=4:"
          f"\n  full fine-tuning: parameters {mb(fp)} + optimizer state {mb(fs)} = {mb(fp + fs)}"
          f"\n  LoRA:             parameters {mb(lp)} + optimizer state {mb(ls)} = {mb(lp + ls)}"
          f"\n  saved {mb(fp + fs - lp - ls)} ({(fp + fs) / (lp + ls):.2f}x less); one policy copy is {mb(policy_copy)}")
    assert fp - lp >= policy_copy * 0.99  # the reference copy is gone (LoRA adds a few small matrices)
    assert (fp + fs) - (lp + ls) >= policy_copy


# ----------------------------------------------------------------------------- config
def test_lora_override_composes(tmp_path):
    assert compose_train(tmp_path).model.lora is None  # full fine-tuning by default
    lora = compose_train(tmp_path, "model/lora=default", "model.lora.r=16", "model.lora.alpha=32").model.lora
    assert (lora.r, lora.alpha, lora.dropout, list(lora.target_modules)) == (16, 32, 0.0, ["c_attn", "c_proj", "c_fc"])


BAD_LORA = [("model.lora.r=0", r"model\.lora: r must be an integer > 0, got 0"),
            ("model.lora.alpha=-1", r"model\.lora: alpha must be > 0"),
            ("model.lora.dropout=1.0", r"model\.lora: dropout must be in \[0, 1\)"),
            ("model.lora.target_modules=[]", r"model\.lora: target_modules")]


@pytest.mark.parametrize("override,pattern", BAD_LORA, ids=[o for o, _ in BAD_LORA])
def test_bad_lora_value_fails_at_config_time(tmp_path, monkeypatch, override, pattern):
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=pattern) as e:
        train(compose_train(run, "model/lora=default", override))
    assert "\n" not in str(e.value)
    assert not any((run / s).exists() for s in ("sft", "rm", "ppo"))
