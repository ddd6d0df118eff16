"""The free-disk preflight (rlhf/training/disk.py): a floor from what the run will write, checked
after the settings and the data and before the tokenizer or any model is loaded."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
from omegaconf import OmegaConf

from rlhf.errors import UserError
from rlhf.models.causal_lm import ModelConfig, count_parameters, load_causal_lm
from rlhf.stages import get_stage
from rlhf.training.disk import disk_plan, parameter_counts, stage_bytes
from rlhf.training.pipeline import train
from rlhf.training.plan import plan_stages, stage_config

from conftest import compose_train

GIB = 2**30
Usage = namedtuple("usage", "total used free")


class PastPreflight(Exception):
    pass


@pytest.fixture
def free_space(monkeypatch):
    """Set the free space the preflight sees; loading the tokenizer, the first step past it, raises PastPreflight."""
    def set_free(free: int):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * GIB, 10 * GIB - free, free))

    def refuse(*a, **k):
        raise PastPreflight

    monkeypatch.setattr("rlhf.training.pipeline.load_tokenizer", refuse)
    return set_free


def floor(cfg, finished=frozenset()):
    plan = plan_stages(cfg)
    return disk_plan(cfg, plan, {s: stage_config(cfg, s)[1] for s in plan}, finished)


def test_a_fixed_floor_fails_before_any_model(tmp_path, free_space):
    free_space(GIB // 4)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"has 0\.2 GiB free; paths\.min_free_gb=1 \(checkpoints"):
        train(compose_train(run, "debug=fast", "paths.min_free_gb=1"))
    assert not any((run / s).exists() for s in ("sft", "rm", "ppo", "summary.json"))
    free_space(GIB // 4)
    with pytest.raises(PastPreflight):  # 0 turns the check off
        train(compose_train(tmp_path / "run0", "debug=fast", "paths.min_free_gb=0"))


def test_auto_floor_is_what_the_run_writes_and_decides_at_that_byte(tmp_path, free_space):
    cfg = compose_train(tmp_path / "a", "debug=fast")
    need = floor(cfg).need_bytes
    # The tiny default model's stages ask for less than the old fixed default floor, which refused them on a small disk.
    assert 0.3 * GIB < need < 0.9 * GIB, need / GIB
    free_space(need - 2**20)
    with pytest.raises(UserError, match=r"GiB free; this run writes up to 0\.\d\d GiB \(3 stage\(s\) training a "
                                        r"6\.9M-parameter model; paths\.min_free_gb=auto\)"):
        train(compose_train(tmp_path / "a", "debug=fast"))
    free_space(need + 2**20)
    with pytest.raises(PastPreflight):
        train(compose_train(tmp_path / "b", "debug=fast"))


def test_the_floor_counts_each_saved_model_and_only_the_stages_left(tmp_path):
    tiny = floor(compose_train(tmp_path, "algo=ppo"))
    gpt2 = floor(compose_train(tmp_path, "algo=ppo", "model.arch={n_layer: 12, n_embd: 768, n_head: 12}"))
    assert 120e6 < gpt2.parameters < 130e6 and gpt2.need_bytes > 10 * tiny.need_bytes
    # PPO saves its critic as a second model; GRPO has none.
    assert get_stage("ppo").saved_models(stage_config(compose_train(tmp_path), "ppo")[1]) == 2
    assert get_stage("grpo").saved_models(stage_config(compose_train(tmp_path, "algo=grpo"), "grpo")[1]) == 1
    assert floor(compose_train(tmp_path, "algo=grpo")).need_bytes < tiny.need_bytes
    # Without the checkpoint callback (as the GPT-2-size test runs) only the exports are asked for.
    bare = floor(compose_train(tmp_path, "algo=ppo", "~callbacks.model_checkpoint"))
    ckpt_bytes = 12 * tiny.parameters * (1 + 1 + 2)  # sft, rm, ppo's policy and critic
    transient = 12 * tiny.parameters * 2  # ppo's next checkpoint while the last still exists
    assert tiny.need_bytes - bare.need_bytes == ckpt_bytes + transient
    # On resume, stages that finished are on disk already: only what is left is asked for.
    left = floor(compose_train(tmp_path, "algo=ppo"), finished={"sft", "rm"})
    assert left.stages == 1
    assert tiny.need_bytes - left.need_bytes == 2 * stage_bytes(tiny.parameters, 1, best_model=False)[0]


def test_parameters_are_counted_from_the_config_alone(trained_artifacts, tmp_path):
    cfg = compose_train(tmp_path)
    built = count_parameters(load_causal_lm(ModelConfig(arch=dict(cfg.model.arch))))
    assert parameter_counts(cfg.model) == (built, built)  # tied head and embedding counted once, as saved
    exported = compose_train(tmp_path, f"model.name_or_path={trained_artifacts['sft']}")
    assert parameter_counts(exported.model) == (built, built)
    # With LoRA only the adapter trains: the checkpoint holds the weights and the adapter's AdamW moments.
    lora = compose_train(tmp_path, "model/lora=default")
    model = load_causal_lm(ModelConfig.from_dict(OmegaConf.to_container(lora.model, resolve=True)))
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < adapter < built / 10 and parameter_counts(lora.model) == (count_parameters(model), adapter)
    # A model that cannot be read here: no floor from it; loading it fails with its own message.
    missing = compose_train(tmp_path, f"model.name_or_path={tmp_path}")
    assert parameter_counts(missing.model) is None


def test_a_run_stays_under_its_floor(trained_artifacts):
    disk = trained_artifacts["summary_json"]["disk_mb"]
    assert 0 < disk["used"] <= disk["needed"] <= 2 * disk["used"], disk
