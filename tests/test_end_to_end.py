"""The learning check: the default `python train.py` (SFT -> RM -> PPO, tiny GPT-2, synthetic data)
must improve the gold reward at bounded KL. Runs the real command in a subprocess (~2-3 min)."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import NATIVE_BF16

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score", "learning_rate",
             "batch_size", "timestamp"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", [None, pytest.param("bf16-mixed", marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no bf16 instructions: a bf16 default run takes an hour"))])
# bf16-mixed: what `python -m rlhf.bench` times
def test_default_run_learns(tmp_path, precision):
    run = tmp_path / "run"
    extra = [f"trainer.precision={precision}"] if precision else []
    proc = subprocess.run([sys.executable, "train.py", f"paths.output_dir={run}",
                           "callbacks.progress_bar.refresh_rate=0", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run) in proc.stdout  # tells the user where the outputs are
    summary = json.loads((run / "summary.json").read_text())
    # Evaluated on prompts no stage trained on (held-out phrasings of the synthetic task).
    assert summary["eval_prompts_in_train"] == 0 and summary["distinct_eval_prompts"] >= 50, summary
    target_kl = 6.0  # algo.target_kl default (rlhf/stages/ppo.py)
    assert summary["rm_accuracy"] >= 0.90, summary
    assert summary["gold_reward_after"] > summary["gold_reward_before"], summary
    assert summary["gold_win_rate"] >= 0.70, summary
    assert 0.0 < summary["kl_final"] <= target_kl, summary
    df = pd.read_csv(run / "ppo" / "metrics.csv")
    assert list(df.columns[:8]) == REFERENCE
    assert df["step"].tolist() == list(range(1, len(df) + 1))
    # The critic starts in the normalised reward's units (7.8 when it read the RM's raw head).
    assert df["value_loss"].iloc[0] < 2.0, df["value_loss"].head()
    # Only warnings a user can act on: none of Lightning's noise about this pipeline's choices.
    console = proc.stdout + proc.stderr
    for noise in ("module(s) in eval mode", "LeafSpec", "💡", "val_dataloader` but have no"):
        assert noise not in console, noise
    # The proxy reward the policy optimised rose too, and the report was written next to the run.
    assert df["reward_score"].tail(5).mean() > df["reward_score"].head(5).mean()
    assert (run / "report" / "report.md").is_file()
    for stage in ("sft", "rm", "ppo"):
        assert (run / stage / "model" / "model.safetensors").is_file()
    # The free-disk floor (paths.min_free_gb=auto) covered what the run wrote, and not by a loose guess.
    assert summary["disk_mb"]["used"] <= summary["disk_mb"]["needed"] <= 2 * summary["disk_mb"]["used"], summary
    # A healthy run: no alarm, held-out evaluation points, and its best policy reported and exported.
    assert "alarms" not in summary and summary["stages"]["ppo"]["alarms"] == [], summary.get("alarms")
    points = pd.read_csv(run / "ppo" / "eval.csv")
    # Enough points for the over-optimisation fit (a two-parameter curve through fewer is exact).
    assert points["step"].tolist() == [0, 8, 16, 24, 32, 40]
    from analysis.overoptimisation import analyse

    oo = analyse(points)
    assert oo["skipped"] == [] and oo["alpha"] is not None and oo["past_peak"] is not None, oo
    assert summary["best_metric"]["name"] == "eval/gold"
    assert summary["best_step"] == int(points.loc[points["gold"].idxmax(), "step"])
    assert (run / "ppo" / "best_model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_multirun_sweep_then_analysis(tmp_path):
    """`python train.py -m ...` runs a grid under one sweep dir; `python -m analysis` compares it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "train.py", "-m", "debug=fast", "lr=1e-4,3e-4", "kl_coef=0.02,0.1",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1", "2", "3"]
    # lr and kl_coef are PPO's settings: SFT and the reward model are trained by the first job alone.
    for job in jobs[1:]:
        summary = json.loads((sweep / job / "summary.json").read_text())
        for stage in ("sft", "rm"):
            assert summary["stages"][stage]["reused_from"] == str(sweep / "0"), (job, stage)
            assert not (sweep / job / stage).exists()
        assert "reused_from" not in summary["stages"]["ppo"]
    assert sorted(p.name.split("-")[0] for p in (sweep / ".stages").iterdir()) == ["ppo"] * 4 + ["rm", "sft"]
    out = subprocess.run([sys.executable, "-m", "analysis", str(sweep), "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 4
    # The root kl_coef shares its name with a metrics.csv column: the sweep names the override apart.
    grid = {(float(r["params"]["lr"]), float(r["params"]["override.kl_coef"])) for r in rows}
    assert grid == {(1e-4, 0.02), (1e-4, 0.1), (3e-4, 0.02), (3e-4, 0.1)}
    for r in rows:
        df = pd.read_csv(sweep / str(r["run"]) / "ppo" / "metrics.csv")
        assert r["final_reward_score"] == pytest.approx(df["reward_score"].iloc[-1])


@pytest.mark.slow
def test_reward_model_learns_gold_preferences(tmp_path, compose_cfg):
    """`python train.py stage=rm`: held-out accuracy against the gold labels >= 0.90 (about 30 s here)."""
    from rlhf.training.pipeline import train

    summary = train(compose_cfg(tmp_path, "stage=rm"))
    assert summary["rm_accuracy"] >= 0.90, summary
    assert summary["stages"]["rm"]["rm_val_pairs"] >= 300
