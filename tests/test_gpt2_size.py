"""The reference experiment at its real size, offline: a random-weight GPT-2 small written by
`python -m rlhf.models.random_gpt2`, HH-format data written by `python -m rlhf.data.export_synthetic`,
and `experiment=gpt2_hh` run for one step of every stage; gradient checkpointing as a model key."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhf.data.synthetic import write_hh_file
from rlhf.errors import UserError
from rlhf.models.causal_lm import ModelConfig, load_causal_lm
from rlhf.models.random_gpt2 import save_random_gpt2
from rlhf.training.disk import disk_plan

from conftest import NATIVE_BF16, REPO


def test_random_gpt2_has_gpt2_small_shape_and_tokenizer(tmp_path):
    out = save_random_gpt2(tmp_path / "gpt2")
    conf = json.loads((out / "config.json").read_text())
    assert (conf["n_layer"], conf["n_embd"], conf["n_head"], conf["n_positions"], conf["vocab_size"]) == \
        (12, 768, 12, 1024, 50257)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello world").input_ids == [15496, 995] and tok.eos_token_id == 50256
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small, tied head
    with pytest.raises(UserError, match="refusing to overwrite"):
        save_random_gpt2(out)
    proc = subprocess.run([sys.executable, "-m", "rlhf.models.random_gpt2", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_export_synthetic_writes_hh_rows_and_never_overwrites(tmp_path):
    from rlhf.data import HHRLHF

    path = tmp_path / "hh.jsonl"
    assert write_hh_file(path, 50, seed=1) == 50
    splits = HHRLHF(data_files=str(path), val_fraction=0.1).load()
    assert len(splits.train) + len(splits.val) == 50 and splits.dropped == 0
    with pytest.raises(UserError, match="refusing to overwrite"):
        write_hh_file(path, 50)


def test_gradient_checkpointing_gives_the_same_gradients():
    arch = {"n_layer": 2, "n_embd": 32, "n_head": 2}
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(ModelConfig(arch=arch, gradient_checkpointing=on)).train()
        assert model.is_activation_checkpointing == on
        ids = torch.arange(12).view(2, 6)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_reference_experiment_runs_at_gpt2_size(tmp_path, compose_cfg):
    """`experiment=gpt2_hh` with its real settings (GPT-2 small, batch 16, prompts up to 384 tokens,
    64-token responses, bf16-mixed; fp32 on a CPU without bf16 instructions) for one step of SFT, RM
    and PPO: about a minute on 2 cores with bf16 instructions.

    Without the checkpoint callback: at this size its three `last.ckpt` files (weights plus Adam
    state) take 6 GB, more than a CI machine may have free; the exports (2 GB) are what is checked."""
    import shutil

    from rlhf.training.pipeline import train

    ckpt = save_random_gpt2(tmp_path / "gpt2")
    data = tmp_path / "hh.jsonl"
    write_hh_file(data, 200)
    run = tmp_path / "run"
    cfg = compose_cfg(run, "experiment=gpt2_hh", f"model.name_or_path={ckpt}", f"data.data_files={data}",
                      "trainer.max_steps=1", "model.gradient_checkpointing=true", "ppo.eval_prompts=16",
                      "sft.val_batches=1", "rm.val_batches=1", "rm.normalize_samples=32",
                      "~callbacks.model_checkpoint", "+trainer.enable_checkpointing=false", "eval.eval_every=null",
                      # Without bf16 instructions (AVX2 only) bf16 is emulated, tens of times slower.
                      *([] if NATIVE_BF16 else ["trainer.precision=32-true"]))
    assert (cfg.ppo.batch_size, cfg.ppo.max_prompt_length, cfg.ppo.response_length) == (16, 384, 64)
    # A CI machine's disk may be too small for GPT-2-size exports: say so rather than fail at the preflight.
    from rlhf.training.plan import plan_stages, stage_config

    plan = plan_stages(cfg)
    need = disk_plan(cfg, plan, {s: stage_config(cfg, s)[1] for s in plan}).need_bytes
    if (free := shutil.disk_usage(tmp_path).free) < need:
        shutil.rmtree(tmp_path)
        pytest.skip(f"GPT-2-size exports need {need / 2**30:.1f} GiB free; {free / 2**30:.1f} GiB here")
    summary = train(cfg)
    assert set(summary["stages"]) == {"sft", "rm", "ppo"}
    assert summary["eval_prompts_in_train"] == 0
    for stage in ("sft", "rm", "ppo"):
        conf = json.loads((run / stage / "model" / "config.json").read_text())
        assert (conf["n_layer"], conf["n_embd"]) == (12, 768), stage
    assert 0 < summary["stages"]["ppo"]["eval_prompts"] <= 16  # algo.eval_prompts caps the held-out set
    assert summary["stages"]["ppo"]["steps"] == 1 and summary["stages"]["ppo"]["peak_rss_mb"] > 0
    assert not any(run.rglob("*.ckpt"))
    shutil.rmtree(tmp_path)  # 2.5 GB of GPT-2-size weights; later tests need the disk
