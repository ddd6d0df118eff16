"""The Hydra pipeline end to end: config composition and validation, the SFT and RM stages and their
exports, local HH files, run-directory protection and the `train.py` CLI error path."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
import transformers
from hydra.errors import MissingConfigException
from safetensors.torch import load_file

from rlhf.data import DataError
from rlhf.errors import ConfigError, UserError
from rlhf.training.pipeline import train
from rlhf.training.plan import apply_root_settings, plan_stages
from rlhf.stages import stages

from conftest import REPO, RM_STEPS, SFT_STEPS, TINY_DATA, TINY_RM, compose_train


# ----------------------------------------------------------------------------- composition
def test_default_config_composes(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.stage == "all"
    assert cfg.algo == "ppo" and set(stages()) >= {"sft", "rm", "ppo"}
    assert {"sft", "rm", "ppo"} <= set(cfg)  # every stage's settings under its own name
    assert cfg.model.name == "tiny"
    assert cfg.paths.output_dir == str(tmp_path)

    cfg = compose_cfg(tmp_path, "lr=1e-5", "kl_coef=0.02", "seed=7")
    apply_root_settings(cfg)
    assert cfg.ppo.lr == pytest.approx(1e-5) and cfg.ppo.kl_coef == pytest.approx(0.02)
    assert cfg.data.seed == 7

    cfg = compose_cfg(tmp_path, "model=gpt2", "lr=3e-5", "stage=ppo")
    apply_root_settings(cfg)
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.model.tokenizer == "gpt2"
    assert cfg.ppo.lr == pytest.approx(3e-5)
    assert cfg.stage == "ppo"


def test_unknown_model_fails_at_compose(compose_cfg, tmp_path):
    with pytest.raises(MissingConfigException, match="nope"):
        compose_cfg(tmp_path, "model=nope")


# ----------------------------------------------------------------------------- validation
@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to build a model (from scratch or from_pretrained) fails the test; one on the meta
    device, which holds no weights (the free-disk floor counts parameters that way), is allowed."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was validated")

    real_init = transformers.PreTrainedModel.__init__

    def refuse_weights(self, *args, **kwargs):
        if torch.get_default_device().type != "meta":
            refuse()
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse_weights)
    import rlhf.models.causal_lm
    import rlhf.models.reward

    for mod in (rlhf.models.causal_lm, rlhf.models.reward):  # where every stage's models come from
        for name in ("load_causal_lm", "load_reward_model"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)
    for name, module in sys.modules.copy().items():  # and the names the stage modules imported
        if name.startswith("rlhf.stages."):
            for fn in ("load_causal_lm", "load_reward_model"):
                if hasattr(module, fn):
                    monkeypatch.setattr(module, fn, refuse)


BAD_VALUES = [
    (["lr=-1"], r"ppo: .*\blr\b"),
    (["sft.batch_size=0"], r"sft: .*\bbatch_size\b"),
    (["ppo.num_mini_batches=3"], r"ppo: .*\bnum_mini_batches\b"),
    (["ppo.response_length=0"], r"ppo: .*\bresponse_length\b"),
    (["kl_coef=-0.1"], r"ppo: .*\bkl_coef\b"),
    (["stage=ppo", "reward.model_path=/nonexistent"], r"reward\.model_path.*/nonexistent"),
    (["trainer.gradient_clip_val=1.0"], r"trainer\.gradient_clip_val.*ppo\.max_grad_norm"),
    (["algo=nonesuch"], r"^algo=nonesuch: unknown algorithm; expected one of sft, rm, .*ppo"),
    (["stage=nonesuch"], r"^stage=nonesuch: unknown stage; expected all or one of sft, rm, .*ppo"),
    (["stage=ppo"], r"^ppo: no reward source: set reward\.fn=.*reward\.model_path=DIR"),
    (["reward.fn=no_such_module.fn"], r"reward\.fn.*no_such_module"),
    (["reward.fn=rlhf.training.rewards.synthetic_gold", "reward.weights=[1,2]"], r"reward\.weights has 2 entries for 1"),
    (["reuse_stages=3"], r"^reuse_stages=3: expected sweep, false or a directory"),
    (["reuse_stages=/proc/no_such_store"], r"^reuse_stages: cannot create /proc/no_such_store"),
    (["paths.min_free_gb=lots"], r"^paths\.min_free_gb must be auto or a number of GiB >= 0, got 'lots'"),
    (["paths.min_free_gb=-1"], r"^paths\.min_free_gb must be auto or a number of GiB >= 0, got -1"),
    (["trainer.accelerator=cpu", "ppo.decode_graph=true"], r"^ppo\.decode_graph=true captures .*needs CUDA"),
]


@pytest.mark.parametrize("overrides,pattern", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_rejected_before_any_model(no_models, tmp_path, overrides, pattern):
    run = tmp_path / "run"
    cfg = compose_train(run, *overrides)
    with pytest.raises(ConfigError, match=pattern):
        train(cfg)
    assert not any((run / s).exists() for s in ("sft", "rm", "ppo"))
    assert not (run / "summary.json").exists()


def test_causal_lm_export_is_not_a_reward_model(trained_artifacts, no_models, tmp_path):
    run = tmp_path / "run"
    cfg = compose_train(run, "stage=ppo", f"reward.model_path={trained_artifacts['sft']}")
    with pytest.raises(ConfigError, match=r"reward\.model_path.*not a reward model"):
        train(cfg)
    assert not (run / "ppo").exists()


def test_config_error_is_user_error():
    assert issubclass(ConfigError, UserError)


# ----------------------------------------------------------------------------- SFT stage
def test_sft_loss_decreases(trained_artifacts):
    df = pd.read_csv(trained_artifacts["run"] / "sft" / "metrics.csv")
    assert df["step"].tolist() == list(range(1, SFT_STEPS + 1))
    loss = df["loss"]
    assert loss.notna().all()
    first, last = loss.iloc[:5].mean(), loss.iloc[-5:].mean()
    # From ~ln(50257) = 10.8 at random init; 40 small steps at lr 1e-3 take it well below.
    assert last < first - 1.0, (first, last)
    summary = trained_artifacts["summary_json"]
    assert summary["stages"]["sft"]["model_dir"] == str(trained_artifacts["sft"])
    assert 0 < summary["sft_val_loss"] < first


def test_sft_export_matches_trained_weights(trained_artifacts):
    model_dir = trained_artifacts["sft"]
    ckpt = torch.load(trained_artifacts["run"] / "sft" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == SFT_STEPS  # the checkpoint holds the final weights
    # last.ckpt names the newest checkpoint without a second copy of it on disk.
    ckpts = trained_artifacts["run"] / "sft" / "checkpoints"
    assert (ckpts / "last.ckpt").is_symlink() and [p.name for p in ckpts.glob("step*.ckpt")] == [
        (ckpts / "last.ckpt").readlink().name]
    trained = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert trained

    # The safetensors file holds exactly the trained numbers.
    saved = load_file(str(model_dir / "model.safetensors"))
    assert saved
    for k, v in saved.items():
        assert torch.equal(v, trained[k]), k

    # Plain transformers reloads it: every trained tensor, and the logits of the trained weights.
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.eos_token_id == 50256
    state = model.state_dict()
    for k, v in trained.items():
        assert torch.equal(state[k], v), k

    reference = transformers.GPT2LMHeadModel(model.config).eval()
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    ids = tok(["\n\nHuman: Any tips on cooking?\n\nAssistant: sure recipe oven"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # Trained, not a fresh init: the export differs from a new model of the same config.
    fresh = transformers.GPT2LMHeadModel(model.config)
    assert not torch.equal(fresh.transformer.h[0].attn.c_attn.weight, state["transformer.h.0.attn.c_attn.weight"])


# ----------------------------------------------------------------------------- RM stage
def test_rm_export_scores_match_plain_transformers(trained_artifacts):
    from rlhf.models.reward import reward_scores

    model_dir = trained_artifacts["rm"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1
    mean, std = model.config.reward_mean, model.config.reward_std
    assert isinstance(mean, float) and isinstance(std, float) and std > 0
    assert (mean, std) != (0.0, 1.0)  # the calibration was stored, not left at the identity

    texts = ["\n\nHuman: Any tips on music?\n\nAssistant: sure song guitar melody band",
             "\n\nHuman: Tell me about pets.\n\nAssistant: whatever boring stupid dumb lazy"]
    enc = [tok(t).input_ids for t in texts]
    n = min(map(len, enc))
    ids = torch.tensor([e[:n] for e in enc])  # same length: no padding anywhere
    assert not (ids == tok.pad_token_id).any()
    with torch.no_grad():
        plain = model(input_ids=ids).logits[:, 0]
        ours = reward_scores(model, ids, torch.ones_like(ids))
        raw = reward_scores(model, ids, torch.ones_like(ids), normalize=False)
    torch.testing.assert_close(ours, (plain - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw, plain, rtol=1e-5, atol=1e-5)


def test_rm_summary_and_metrics(trained_artifacts):
    summary = trained_artifacts["summary_json"]
    assert 0.0 <= summary["rm_accuracy"] <= 1.0
    assert summary["stages"]["rm"]["rm_accuracy"] == summary["rm_accuracy"]
    assert summary["stages"]["rm"]["rm_val_pairs"] == 30  # 10% of 300 pairs held out
    df = pd.read_csv(trained_artifacts["run"] / "rm" / "metrics.csv")
    assert df["step"].tolist() == list(range(1, RM_STEPS + 1))
    assert {"loss", "accuracy", "margin", "learning_rate", "batch_size", "timestamp"} <= set(df.columns)
    assert df["loss"].notna().all() and df["accuracy"].between(0, 1).all()


# ----------------------------------------------------------------------------- local HH files
def _hh_lines(n: int, pairs_per_prompt: int = 1) -> list[str]:
    lines = []
    for j in range(n):
        i = j // pairs_per_prompt
        if i % 3 == 0:  # multi-turn: an earlier exchange, then the compared last turn
            prompt = (f"\n\nHuman: What is {i} plus one?\n\nAssistant: It is {i + 1}."
                      f"\n\nHuman: And {i} plus two?\n\nAssistant:")
        else:
            prompt = f"\n\nHuman: Can you tell me about topic number {i}?\n\nAssistant:"
        chosen = prompt + f" Sure, topic {i} is interesting and here is reason {j}."
        rejected = prompt + " Whatever, I don't care."
        lines.append(json.dumps({"chosen": chosen, "rejected": rejected}))
    return lines


def test_rm_on_local_hh_file(tmp_path, compose_cfg):
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(_hh_lines(60, pairs_per_prompt=3)) + "\n")  # every prompt in three pairs
    run = tmp_path / "run"
    cfg = compose_cfg(run, "stage=rm", "data=hh_rlhf", f"data.data_files={data}", "trainer.max_steps=3", *TINY_RM)
    summary = train(cfg)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["data"] == "HHRLHF"
    # Held out by prompt: no validation prompt is also a training prompt.
    assert on_disk["eval_prompts_in_train"] == 0, on_disk
    assert on_disk["distinct_train_prompts"] + on_disk["distinct_eval_prompts"] == 20, on_disk
    assert on_disk["distinct_eval_prompts"] >= 1
    assert set(on_disk["stages"]) == {"rm"}
    assert 0.0 <= on_disk["rm_accuracy"] <= 1.0
    assert summary["rm_accuracy"] == on_disk["rm_accuracy"]
    assert pd.read_csv(run / "rm" / "metrics.csv")["step"].tolist() == [1, 2, 3]
    assert (run / "rm" / "model" / "model.safetensors").is_file()


def test_bad_hh_file_rejected_before_any_stage(tmp_path, compose_cfg, no_models):
    data = tmp_path / "hh.jsonl"
    lines = _hh_lines(5)
    lines.insert(3, "{this is not json")
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    cfg = compose_cfg(run, "stage=rm", "data=hh_rlhf", f"data.data_files={data}", "trainer.max_steps=3", *TINY_RM)
    with pytest.raises(DataError, match=re.escape(f"{data}:4")):
        train(cfg)
    assert not any((run / s).exists() for s in ("sft", "rm", "ppo"))
    assert not (run / "summary.json").exists()


# ----------------------------------------------------------------------------- run directory
def test_finished_run_is_not_overwritten(trained_artifacts, no_models):
    run = trained_artifacts["run"]
    before = (run / "summary.json").read_bytes()
    model_file = run / "sft" / "model" / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    cfg = compose_train(run, "stage=sft", "sft.max_steps=1", *TINY_DATA)
    with pytest.raises(UserError, match="summary.json"):
        train(cfg)
    assert (run / "summary.json").read_bytes() == before
    assert model_file.stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_config_error_is_one_line(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", f"paths.output_dir={run}", "lr=-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and re.search(r"\blr\b", lines[0]), lines[0]
    assert not (run / "sft").exists()


def test_hub_model_without_hub_fails_at_once_with_one_line(tmp_path):
    """The design's first command with no hub: the hub is probed once and names are read from the cache
    alone, so the error comes before any download retry loop, and the run directory is removed."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    run = tmp_path / "run"
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # nothing listens
    out = subprocess.run([sys.executable, "train.py", "model=gpt2", "lr=3e-5", f"hydra.run.dir={run}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not load tokenizer from 'gpt2'") and "Without hub access" in line, line
    assert "Retrying" not in out.stderr + out.stdout
    assert not run.exists()


def test_hub_probe_reads_names_from_the_cache_when_the_hub_is_silent(monkeypatch):
    from huggingface_hub import constants

    from rlhf.models import causal_lm

    seen = {}

    class Fake:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.update(kwargs)
            return "model"

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    causal_lm.hub_reachable.cache_clear()
    try:
        assert causal_lm.from_pretrained(Fake, "some/name", "causal LM") == "model"
        assert seen == {"local_files_only": True}
    finally:
        causal_lm.hub_reachable.cache_clear()
