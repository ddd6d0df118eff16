"""Held-out evaluation during a policy stage, the best policy export, a reward model as gold, and the
health monitor stopping a stage at an alarm with its last healthy checkpoint kept."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from rlhf.errors import ConfigError
from rlhf.training.pipeline import train

from conftest import TINY_DATA, TINY_PPO, compose_train


def _ppo(artifacts, run, *extra):
    return compose_train(run, "stage=ppo", f"ppo.policy_path={artifacts['sft']}", f"reward.model_path={artifacts['rm']}",
                         *TINY_DATA, *TINY_PPO, *extra)


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_eval_points_best_policy_and_summary(trained_artifacts, tmp_path):
    run = tmp_path / "run"
    summary = train(_ppo(trained_artifacts, run, "ppo.max_steps=3", "eval.eval_every=2", "trainer.log_every_n_steps=1"))
    res = summary["stages"]["ppo"]
    ev = pd.read_csv(run / "ppo" / "eval.csv")
    # Update 0 (the start policy), every eval_every updates, and the last.
    assert ev["step"].tolist() == [0, 2, 3]
    assert list(ev.columns) == ["step", "kl", "reward", "gold", "response_length", "distinct_2"]
    # The same prompts and random numbers as the end-of-stage comparison: its "before" is point 0,
    # its "after" the last point.
    assert ev["kl"].iloc[0] == pytest.approx(0.0, abs=1e-5)
    assert ev["reward"].iloc[0] == pytest.approx(res["reward_before"], rel=1e-6, abs=1e-9)
    assert ev["reward"].iloc[-1] == pytest.approx(res["reward_after"], rel=1e-6, abs=1e-9)
    assert ev["gold"].iloc[-1] == pytest.approx(res["gold_reward_after"], abs=1e-9)
    assert ev["kl"].iloc[-1] == pytest.approx(res["kl_final"], rel=1e-6, abs=1e-9)
    # The best point by gold (the synthetic task knows it), first on ties; exported and reported.
    best = int(ev.loc[ev["gold"].idxmax(), "step"])
    assert summary["best_step"] == res["best_step"] == best
    assert summary["best_metric"] == {"name": "eval/gold", "value": pytest.approx(ev["gold"].max())}
    exported = _weights(run / "ppo" / "best_model")
    same_as = _weights(trained_artifacts["sft"]) if best == 0 else _weights(run / "ppo" / "model") if best == 3 else None
    if same_as is not None:
        assert all(torch.equal(v, same_as[k]) for k, v in exported.items())
    assert (run / "ppo" / "best_model" / "README.md").is_file()
    # TensorBoard gets the eval/* scalars.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from analysis.tb_events import find_event_files

    tags = {v.tag for f in find_event_files(run / "ppo" / "tb") for e in EventFileLoader(str(f)).Load()
            for v in e.summary.value}
    assert {"eval/gold", "eval/reward", "eval/kl", "eval/response_length", "eval/distinct_2"} <= tags
    # ... and a custom-scalars layout whose every PPO panel names tags the run logged.
    from callbacks.tb_layout import LAYOUT

    assert "custom_scalars__config__" in tags
    assert {t for chart in LAYOUT["health"].values() for t in chart[1]} <= tags


def test_evaluating_leaves_training_unchanged(trained_artifacts, tmp_path):
    # Evaluation samples from its own seeded random stream and restores the training's: the same
    # updates with and without evaluation points.
    rows = {}
    for every in ("1", "null"):
        train(_ppo(trained_artifacts, tmp_path / every, "ppo.max_steps=2", f"eval.eval_every={every}"))
        rows[every] = pd.read_csv(tmp_path / every / "ppo" / "metrics.csv").drop(columns=["timestamp"])
    pd.testing.assert_frame_equal(rows["1"], rows["null"])


def test_eval_off_and_best_by_reward(trained_artifacts, tmp_path):
    summary = train(_ppo(trained_artifacts, tmp_path / "off", "ppo.max_steps=1", "eval.eval_every=null"))
    assert not (tmp_path / "off" / "ppo" / "eval.csv").exists() and "best_step" not in summary
    summary = train(_ppo(trained_artifacts, tmp_path / "rw", "ppo.max_steps=2", "eval.eval_every=1",
                         "eval.best_metric=reward"))
    ev = pd.read_csv(tmp_path / "rw" / "ppo" / "eval.csv")
    assert summary["best_metric"]["name"] == "eval/reward"
    assert summary["best_step"] == int(ev.loc[ev["reward"].idxmax(), "step"])


def test_a_reward_model_plays_gold(trained_artifacts, tmp_path):
    # A reward model whose every score is 3: its head zeroed, its normalisation (raw - mean) / std
    # with mean -3, std 1. Every gold number of the run must be that model's, not the synthetic gold.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    gold_dir = tmp_path / "gold_rm"
    rm = AutoModelForSequenceClassification.from_pretrained(trained_artifacts["rm"])
    torch.nn.init.zeros_(rm.score.weight)
    rm.config.reward_mean, rm.config.reward_std = -3.0, 1.0
    rm.save_pretrained(gold_dir)
    AutoTokenizer.from_pretrained(trained_artifacts["rm"]).save_pretrained(gold_dir)
    run = tmp_path / "run"
    summary = train(_ppo(trained_artifacts, run, "ppo.max_steps=1", "eval.eval_every=1",
                         f"eval.gold_reward_model_path={gold_dir}"))
    ev = pd.read_csv(run / "ppo" / "eval.csv")
    assert ev["gold"].tolist() == pytest.approx([3.0, 3.0])
    assert ev["reward"].tolist() != pytest.approx([3.0, 3.0])  # the proxy is still the run's reward model
    assert summary["gold_reward_before"] == summary["gold_reward_after"] == pytest.approx(3.0)
    assert summary["gold_win_rate"] == 0.5
    gold_csv = pd.read_csv(run / "ppo" / "metrics.csv")["gold_score"]
    assert gold_csv.tolist() == pytest.approx([3.0])  # the per-update gold column too


@pytest.mark.parametrize("override,message", [
    ("eval.eval_every=0", r"^eval\.eval_every must be a positive integer or null, got 0$"),
    ("eval.best_metric=loss", r"^eval\.best_metric must be auto, gold or reward, got 'loss'$"),
    ("callbacks.health.on_alarm=panic", r"^callbacks\.health\.on_alarm must be warn or stop, got 'panic'$"),
])
def test_bad_eval_settings_fail_before_training(trained_artifacts, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(_ppo(trained_artifacts, tmp_path / "run", override))
    assert not (tmp_path / "run" / "ppo").exists()


def test_gold_path_that_is_not_a_reward_model(trained_artifacts, tmp_path):
    with pytest.raises(ConfigError, match=r"^eval\.gold_reward_model_path: .* is not a reward model"):
        train(_ppo(trained_artifacts, tmp_path / "run", f"eval.gold_reward_model_path={trained_artifacts['sft']}"))
    assert not (tmp_path / "run" / "ppo").exists()


def test_alarm_stops_the_stage_keeping_the_last_healthy_checkpoint(trained_artifacts, tmp_path, monkeypatch):
    import analysis.alarms as alarms

    real = alarms.detect

    def detect(df, thresholds=None):  # a fault at update 3, seen by the real detectors
        df = df.copy()
        if len(df) >= 3:
            df.loc[df["step"] == 3, "kl_divergence"] = float("nan")
        return real(df, thresholds)

    monkeypatch.setattr(alarms, "detect", detect)
    run = tmp_path / "run"
    summary = train(_ppo(trained_artifacts, run, "ppo.max_steps=6", "eval.eval_every=1",
                         "callbacks.health.on_alarm=stop", "callbacks.model_checkpoint.every_n_train_steps=1"))
    res = summary["stages"]["ppo"]
    assert summary["stopped"]["name"] == "non_finite" and summary["stopped"]["step"] == 3
    assert summary["stopped"]["stage"] == "ppo" and res["steps"] == 3
    assert [a["name"] for a in summary["alarms"]] == ["non_finite"]
    # The last checkpoint is update 2's: nothing was saved from the alarmed update on.
    from rlhf.stages.ppo import PPOConfig

    per_update = PPOConfig().num_ppo_epochs * PPOConfig().num_mini_batches  # optimizer steps per update
    ckpt = torch.load(run / "ppo" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2 * per_update
    assert [p.name for p in (run / "ppo" / "checkpoints").glob("step*.ckpt")] == [f"step{2 * per_update:06d}.ckpt"]
    # The stage still ended cleanly: exported, evaluated, its best policy kept.
    assert (run / "ppo" / "model" / "model.safetensors").is_file() and (run / "ppo" / "best_model").is_dir()
    assert json.loads((run / "summary.json").read_text())["stopped"]["name"] == "non_finite"


def test_a_stage_that_does_not_sample_gets_length_alarms_from_its_evaluation_points(trained_artifacts, tmp_path,
                                                                                     monkeypatch):
    """DPO logs no response lengths while training, so the length rules read its held-out evaluation
    points, live (summary.json) and afterwards (`python -m analysis`'s run health on eval.csv): the same
    alarm at the same step. Its evaluated lengths double from update 3 on (the real sampler's lengths,
    scaled), so the 5-point mean over the start's passes x1.5 at update 5, (1 + 1 + 2 + 2 + 2) / 5."""
    import rlhf.evaluation.held_out as held_out
    from analysis import load_eval, load_run
    from analysis.report import run_health

    real = held_out.evaluate_policy
    calls = []

    def evaluate_policy(module, loader, n):
        m = real(module, loader, n)
        calls.append(m)
        return {**m, "response_length": m["response_length"] * (2.0 if len(calls) > 3 else 1.0)}

    monkeypatch.setattr(held_out, "evaluate_policy", evaluate_policy)
    run = tmp_path / "run"
    summary = train(compose_train(run, "algo=dpo", "stage=dpo", f"dpo.policy_path={trained_artifacts['sft']}",
                                  *TINY_DATA, "dpo.batch_size=4", "dpo.max_steps=6", "dpo.eval_prompts=8",
                                  "dpo.response_length=8", "dpo.val_batches=1", "eval.eval_every=1"))
    ev = pd.read_csv(run / "dpo" / "eval.csv")
    assert ev["step"].tolist() == list(range(7)) and ev["kl"].iloc[0] == pytest.approx(0.0, abs=1e-5)
    assert "response_length" not in pd.read_csv(run / "dpo" / "metrics.csv").columns
    live = [(a["name"], a["step"]) for a in summary["stages"]["dpo"]["alarms"]]
    assert ("length_drift", 5) in live
    health = run_health(load_run(run), load_eval(run))
    assert ("length_drift", 5) in [(a["name"], a["step"]) for a in health["alarms"]]
    assert "held-out evaluations" in next(a["message"] for a in health["alarms"] if a["name"] == "length_drift")
    # No reward model: length_hacking has no proxy to compare lengths with, and says so.
    assert any(s.startswith("length_hacking (held-out evaluations) skipped: reward column") for s in health["skipped"])
