"""Stages shared by the jobs of a sweep (rlhf/training/reuse.py): which settings decide a stage's key,
a second job taking a finished stage instead of training it, and bad settings refused at once."""
from __future__ import annotations

import json
from pathlib import Path

from analysis.load import find_eval, load_run, read_summary
from rlhf.deploy.runs import RunArtifacts
from rlhf.stages import stages
from rlhf.training import reuse
from rlhf.training.pipeline import train
from rlhf.training.plan import apply_root_settings, apply_task_reward, plan_stages


def _keys(compose, out: Path, *overrides: str) -> dict[str, str]:
    """Each planned stage's key, after the settings train() applies before its stage loop."""
    cfg = compose(out, *overrides)
    apply_task_reward(cfg)
    plan = plan_stages(cfg)
    apply_root_settings(cfg)
    keys: list[str] = []
    for s in plan:
        keys.append(reuse.stage_key(cfg, s, list(stages()), out, keys))
    return dict(zip(plan, keys))


def test_a_stage_key_follows_what_decides_the_stage_and_nothing_else(compose_cfg, tmp_path):
    ppo = _keys(compose_cfg, tmp_path / "0", "algo=ppo")
    # Another algorithm, another output directory, the algorithm's own settings: SFT and RM are shared.
    grpo = _keys(compose_cfg, tmp_path / "1", "algo=grpo", "lr=1e-4", "grpo.beta=0.2")
    assert ppo["sft"] == grpo["sft"] and ppo["rm"] == grpo["rm"] and ppo["ppo"] != grpo["grpo"]
    assert _keys(compose_cfg, tmp_path / "2", "algo=ppo", "kl_coef=0.1")["rm"] == ppo["rm"]
    assert _keys(compose_cfg, tmp_path / "3", "algo=ppo", "kl_coef=0.1")["ppo"] != ppo["ppo"]
    assert _keys(compose_cfg, tmp_path / "4", "algo=ppo")["ppo"] == ppo["ppo"]
    # What changes what a stage produces changes its key, and every key after it.
    seed = _keys(compose_cfg, tmp_path / "5", "algo=ppo", "seed=1")
    assert all(seed[s] != ppo[s] for s in ppo)
    sft_lr = _keys(compose_cfg, tmp_path / "6", "algo=ppo", "sft.lr=7e-4")
    assert sft_lr["sft"] != ppo["sft"] and sft_lr["rm"] != ppo["rm"]
    rm_lr = _keys(compose_cfg, tmp_path / "7", "algo=ppo", "rm.lr=7e-4")
    assert rm_lr["sft"] == ppo["sft"] and rm_lr["rm"] != ppo["rm"]
    for other in ("data=arithmetic", "model.arch.n_layer=1", "trainer.precision=bf16-mixed", "data.n_pairs=123"):
        assert _keys(compose_cfg, tmp_path / "8", "algo=ppo", other)["sft"] != ppo["sft"], other


def test_a_second_job_takes_a_finished_stage_instead_of_training_it(compose_cfg, tmp_path):
    store = tmp_path / "store"
    common = ("algo=dpo", "debug=fast", f"reuse_stages={store}")
    first = train(compose_cfg(tmp_path / "0", *common))
    assert "reused_from" not in first["stages"]["sft"]
    assert sorted(p.name.split("-")[0] for p in store.iterdir()) == ["dpo", "sft"]
    second = train(compose_cfg(tmp_path / "1", *common, "dpo.beta=0.3"))
    sft = second["stages"]["sft"]
    assert sft["reused_from"] == str(tmp_path / "0")
    assert sft["model_dir"] == first["stages"]["sft"]["model_dir"] and Path(sft["model_dir"]).is_dir()
    assert not (tmp_path / "1" / "sft").exists()  # nothing trained, nothing written for it
    assert "reused_from" not in second["stages"]["dpo"] and (tmp_path / "1" / "dpo" / "model").is_dir()
    saved = json.loads((tmp_path / "1" / "summary.json").read_text())
    assert saved["stages"]["sft"]["reused_from"] == str(tmp_path / "0")
    # Evaluation, generation and serving find the reused export as the run's reference policy.
    art = RunArtifacts(tmp_path / "1")
    assert art.policy_dir == tmp_path / "1" / "dpo" / "model"
    assert art.reference_dir == Path(first["stages"]["sft"]["model_dir"])
    # A finished stage whose export is gone is trained again.
    (store / next(p.name for p in store.iterdir() if p.name.startswith("sft"))).write_text(
        json.dumps({"run_dir": "gone", "result": {"model_dir": str(tmp_path / "gone")}}))
    third = train(compose_cfg(tmp_path / "2", *common))
    assert "reused_from" not in third["stages"]["sft"] and (tmp_path / "2" / "sft" / "model").is_dir()
    # A job that reuses every stage ran none: no peak memory of its own, and the analysis reads the
    # last stage's logs and its own time and memory where that stage was trained.
    fourth = train(compose_cfg(tmp_path / "3", *common))
    assert all("reused_from" in r for r in fourth["stages"].values()) and "peak_rss_mb" not in fourth
    dpo_dir = Path(fourth["stages"]["dpo"]["reused_from"]) / "dpo"
    assert not (tmp_path / "3" / "dpo").exists() and (dpo_dir / "metrics.csv").is_file()
    assert load_run(tmp_path / "3").attrs["source"] == str(dpo_dir / "metrics.csv")
    assert find_eval(tmp_path / "3") == find_eval(dpo_dir.parent)
    done = read_summary(tmp_path / "3")
    assert "peak_rss_mb" not in done and done["stage_seconds"] == fourth["stages"]["dpo"]["fit_seconds"]
    assert done["stage_peak_rss_mb"] == fourth["stages"]["dpo"]["peak_rss_mb"] > 0


def test_single_runs_share_nothing_unless_asked(compose_cfg, tmp_path):
    assert reuse.store_for(compose_cfg(tmp_path)) is None  # reuse_stages: sweep, outside a multirun
    assert reuse.store_for(compose_cfg(tmp_path, "reuse_stages=false")) is None
