"""Every algorithm learns the default synthetic task from the same SFT model and reward model, and
the pipeline that `algo=` implies is the one the stages' declarations ask for. The algorithms come
from the registry (`rlhf.stages.stages()`): a new one is tested here without naming it.

The learning check (as `test_end_to_end` for PPO): each algorithm's default config raises the gold
reward on held-out prompts, wins >= 70% of them against the SFT policy by gold, stays within 6 nats
of KL to it (PPO's adaptive-KL target) and raises no health alarm. Wall time is recorded in the
README's algorithms table, not asserted here.
"""
from __future__ import annotations

import json
import sys
import textwrap

import pandas as pd
import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.training.pipeline import train
from rlhf.training.plan import plan_stages
from rlhf.stages import stages
from rlhf.stages.online import OnlineRLModule

from conftest import TINY_DATA, compose_train

TARGET_KL = 6.0
# Every algorithm: a registered stage that optimises a policy after SFT and the reward model.
ALGORITHMS = [n for n, c in stages().items() if c.produces == "policy" and c.order >= 2]
ONLINE = [n for n in ALGORITHMS if issubclass(stages()[n], OnlineRLModule)]


@pytest.mark.parametrize("overrides,plan", [
    ([], ["sft", "rm", "ppo"]),
    (["algo=grpo"], ["sft", "rm", "grpo"]),
    (["algo=rloo"], ["sft", "rm", "rloo"]),
    (["algo=dpo"], ["sft", "dpo"]),
    (["algo=rm"], ["sft", "rm"]),
    (["algo=grpo", "reward.fn=rlhf.training.rewards.synthetic_gold"], ["sft", "grpo"]),
    (["algo=ppo", "reward.model_path=/some/rm"], ["sft", "ppo"]),
    (["algo=grpo", "grpo.policy_path=/some/policy", "reward.model_path=/some/rm"], ["grpo"]),
    (["stage=rm"], ["rm"]),
])
def test_plan_follows_what_each_stage_needs(tmp_path, overrides, plan):
    assert plan_stages(compose_train(tmp_path, *overrides)) == plan


def test_every_stage_declares_its_contract():
    for name, cls in stages().items():
        assert cls.name == name and cls.title and cls.description and cls.Config is not None, name
        assert cls.produces in ("policy", "reward", None) and set(cls.needs) <= {"policy", "reward"}, name
    assert {"sft", "rm", "ppo", "grpo", "rloo", "dpo"} <= set(stages())


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_root_lr_and_kl_coef_feed_the_algorithm(tmp_path, algo):
    from rlhf.training.plan import apply_root_settings

    cfg = compose_train(tmp_path, f"algo={algo}", "lr=1e-4", "kl_coef=0.02")
    apply_root_settings(cfg)
    assert cfg[algo].lr == 1e-4, algo
    kl_field = stages()[algo].kl_field
    if kl_field is not None:
        assert cfg[algo][kl_field] == 0.02, algo
    assert cfg.sft.lr != 1e-4  # SFT and RM keep their own


@pytest.mark.parametrize("data", ["synthetic", "hh_rlhf", "length_trap"])
def test_debug_fast_shortens_every_stage_of_every_algorithm(tmp_path, data):
    from rlhf.training.plan import apply_every_stage, stage_config

    cfg = compose_train(tmp_path, "debug=fast", f"data={data}")
    apply_every_stage(cfg)
    for name, cls in stages().items():
        _, conf = stage_config(cfg, name)  # still a valid config after shortening
        assert conf.max_steps == 3, name
        if hasattr(conf, "eval_prompts"):
            assert conf.eval_prompts == 16, name
    assert cfg.data.max_pairs == 256
    assert cfg.every_stage is None  # applied once: the saved config (and a resume) holds the values
    if data == "length_trap":  # the task's own every_stage merges with debug=fast's, not replaced by it
        assert all(cfg[name].response_length == 24 for name in stages() if "response_length" in cfg[name])


def test_a_stage_setting_on_the_command_line_wins_over_debug_fast(tmp_path):
    cfg = compose_train(tmp_path, "debug=fast", "ppo.max_steps=16", "++sft.batch_size=4")
    assert cfg.ppo.max_steps == 16 and cfg.sft.batch_size == 4
    assert cfg.grpo.max_steps == 3 and cfg.ppo.batch_size == 8 and cfg.sft.max_steps == 3


def test_refused_algorithm_lists_them_all_and_leaves_no_run_directory(tmp_path):
    import subprocess

    from conftest import REPO

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "train.py", "algo=nonesuch", f"hydra.run.dir={run}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: algo=nonesuch: unknown algorithm") and all(a in line for a in ALGORITHMS), line
    assert not run.exists()


def test_num_generations_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match=r"^grpo: .*batch_size=30 is not divisible by the 4 responses"):
        train(compose_train(tmp_path / "run", "algo=grpo", "grpo.batch_size=30"))
    assert not (tmp_path / "run" / "sft").exists()


# ----------------------------------------------------------------------------- one short run each
def _tiny(algo, artifacts, run, *extra):
    """`stage=<algo>` for two updates on the tiny SFT/RM exports, keeping the module it built."""
    from safetensors.torch import load_file

    cls = stages()[algo]
    box = {}
    orig = cls.finish

    def finish(self, *args, **kwargs):
        box["module"] = self
        return orig(self, *args, **kwargs)

    cfg = compose_train(run, f"algo={algo}", f"stage={algo}", f"{algo}.policy_path={artifacts['sft']}",
                        f"reward.model_path={artifacts['rm']}", *TINY_DATA, f"{algo}.batch_size=8",
                        f"{algo}.response_length=8", f"{algo}.eval_prompts=8", f"{algo}.max_prompt_length=48",
                        f"{algo}.max_steps=2", *extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "finish", finish)
        summary = train(cfg)
    return summary, box["module"], load_file(str(artifacts["sft"] / "model.safetensors"))


@pytest.mark.parametrize("algo,extra", [("grpo", ()), ("grpo", ("grpo.beta=0", "grpo.loss_agg_mode=seq_mean_token_sum_norm")),
                                        ("rloo", ("rloo.kl_estimator=k3",)), ("reinforce_pp", ()), ("gspo", ()),
                                        ("cispo", ())])
def test_online_stage_trains_the_policy_only(algo, extra, trained_artifacts, tmp_path):
    summary, module, sft = _tiny(algo, trained_artifacts, tmp_path / "run", *extra)
    moved = [k for k, v in module.policy.state_dict().items() if k in sft and not torch.equal(v, sft[k])]
    assert moved, "no policy weight changed"
    assert not hasattr(module, "value_model") and not hasattr(module, "value_head")  # no critic
    if "grpo.beta=0" in extra:  # no KL term: no reference model during training, loaded for the evaluation
        assert module.uses_reference is False and summary["stages"][algo]["kl_final"] != 0
    # The reference (kept, or loaded again at the end) is the SFT export, bit for bit.
    assert all(torch.equal(v, sft[k]) for k, v in module.ref_policy.state_dict().items() if k in sft)
    assert all(not p.requires_grad for p in module.reward_model.parameters())
    df = pd.read_csv(tmp_path / "run" / algo / "metrics.csv")
    assert list(df.columns[:8]) == ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score",
                                    "learning_rate", "batch_size", "timestamp"]
    assert df["step"].tolist() == [1, 2] and df["value_loss"].isna().all() and df["batch_size"].eq(8).all()
    # Steps per update come from the settings: epochs x minibatches optimizer steps, two updates done.
    assert module.optimizer_steps_per_batch == module.cfg.epochs * module.cfg.num_mini_batches
    assert summary["stages"][algo]["steps"] == 2 and module.trainer.global_step == 2 * module.optimizer_steps_per_batch


# ----------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def default_sft_rm(module_tmp):
    """The default run's SFT and reward model (`python train.py algo=rm`), shared by every algorithm."""
    run = module_tmp / "run"
    summary = train(compose_train(run, "algo=rm"))
    assert summary["rm_accuracy"] >= 0.90, summary
    return {"sft": run / "sft" / "model", "rm": run / "rm" / "model"}


def _run(algo, sft_rm, tmp_path, *extra):
    run = tmp_path / "run"
    reward = [f"reward.model_path={sft_rm['rm']}"] if "reward" in stages()[algo].needs else []
    summary = train(compose_train(run, f"algo={algo}", f"stage={algo}", f"{algo}.policy_path={sft_rm['sft']}",
                                  *reward, *extra))
    return run, summary


@pytest.mark.slow
@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if a != "ppo"])  # PPO: test_end_to_end (the default run)
def test_default_config_learns(algo, default_sft_rm, tmp_path):
    run, summary = _run(algo, default_sft_rm, tmp_path)
    assert summary["eval_prompts_in_train"] == 0
    assert summary["gold_reward_after"] > summary["gold_reward_before"], summary
    assert summary["gold_win_rate"] >= 0.70, summary
    assert 0.0 < summary["kl_final"] <= TARGET_KL, summary
    assert not summary.get("alarms"), summary["alarms"]
    conf = stages()[algo].Config()
    if hasattr(conf, "diagnostic_level"):  # clipfrac / approxkl named by their declared level
        suffix = "_seq" if conf.diagnostic_level == "sequence" else ""
        assert {f"clipfrac{suffix}", f"approxkl{suffix}"} <= set(pd.read_csv(run / algo / "metrics.csv").columns)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["gold_win_rate"] == summary["gold_win_rate"]  # the learning figures reach summary.json
    assert (run / algo / "model" / "model.safetensors").is_file()
    card = (run / algo / "model" / "README.md").read_text()
    assert stages()[algo].title in card and f"`{algo}` stage" in card


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_short_small_batch_run_raises_no_alarm(algo, default_sft_rm, tmp_path):
    """Clean runs at debug=fast's batch of 8, past one alarm window (12 updates): every detector that
    the stage's columns allow has judged at least two rows, and none fires (RLOO's per-response
    clipfrac and approxkl used to, judged with PPO's per-token limits)."""
    run, summary = _run(algo, default_sft_rm, tmp_path, "debug=fast", f"{algo}.max_steps=12")
    assert len(pd.read_csv(run / algo / "metrics.csv")) == 12
    assert summary["stages"][algo]["alarms"] == [], summary["stages"][algo]["alarms"]


@pytest.mark.slow
def test_reward_function_from_outside_the_project_drives_grpo(default_sft_rm, tmp_path, monkeypatch):
    """`reward.fn=outside_reward.their_function`: no reward model, and GRPO raises that function's mean."""
    (tmp_path / "outside_reward.py").write_text(textwrap.dedent('''
        CALLS = []

        def their_function(prompts, responses):
            CALLS.append(len(responses))
            return [float(r.split().count("glad")) for r in responses]  # say "glad" more
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    summary = train(compose_train(run, "algo=grpo", f"grpo.policy_path={default_sft_rm['sft']}",
                                  "reward.fn=outside_reward.their_function", "grpo.max_steps=20", "grpo.beta=0.0",
                                  "grpo.eval_prompts=16"))
    import outside_reward

    monkeypatch.delitem(sys.modules, "outside_reward")  # a module of this test only

    assert list(summary["stages"]) == ["grpo"]  # no SFT (a policy was given) and no reward model
    assert outside_reward.CALLS and set(outside_reward.CALLS) == {32}
    df = pd.read_csv(run / "grpo" / "metrics.csv")
    assert df["reward_score"].tail(5).mean() > df["reward_score"].head(5).mean() + 0.2, df["reward_score"].tolist()


def test_progress_bar_counts_updates_not_optimizer_steps():
    """40 updates of 4 optimizer steps each: the bar shows 40, not min(epoch, 160)."""
    from types import SimpleNamespace

    from callbacks import UpdatesProgressBar

    bar = UpdatesProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=160, global_step=0, num_training_batches=112,
                                   lightning_module=SimpleNamespace(optimizer_steps_per_batch=4))
    assert bar.total_train_batches == 40
    bar._trainer.global_step = 100  # resumed after 25 updates
    assert bar.total_train_batches == 15
