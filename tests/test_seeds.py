"""Results over seeds: Student-t intervals, grouping a sweep by configuration, the CLI lines, report and figure."""
import json
import logging
import math

import numpy as np
import pytest

from analysis import confidence_interval, load_sweep, seed_curves, seed_table, sweep_table
from analysis.load import read_summary
from analysis.seeds import comparison_table, has_seeds
from test_analysis_cli import assert_png, cli, make_run

T_975_2 = 4.302652729749462  # Student t quantile 0.975 with 2 degrees of freedom (tables: 4.303)
T_975_1 = 12.706204736174698  # ... with 1 degree of freedom (tables: 12.706)
LRS = (1e-05, 1e-04)
GOLD = {1e-05: [0.5, 0.6, 0.7], 1e-04: [0.2, 0.2, 0.2]}  # gold_win_rate by lr, for seeds 0, 1, 2


def make_seed_sweep(root, seeds=(0, 1, 2), lrs=LRS, gold_column=False):
    """Jobs in Hydra's order for ``-m seed=0,1,2 lr=1e-05,1e-04``: (seed 0, lr a), (seed 0, lr b), ...,
    so that a configuration's jobs are not adjacent. Returns ``{(seed, lr): job name}``."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    jobs = {}
    for seed in seeds:
        for lr in lrs:
            job = root / str(len(jobs))
            make_run(job, n=60, seed=len(jobs), overrides=(f"seed={seed}", f"lr={lr}"))
            if gold_column:  # as the PPO stage writes it: empty cells when there is no gold scorer
                csv = job / "ppo" / "metrics.csv"
                lines = csv.read_text().splitlines()
                rows = [lines[0] + ",gold_score"] + [f"{line},{0.1 * seed + i / 100}" for i, line in
                                                     enumerate(lines[1:])]
                csv.write_text("\n".join(rows) + "\n")
            summary = {"run_dir": str(job), "stages": {"ppo": {"gold_win_rate": 0.0}}, "model": "tiny",
                       "data": "SyntheticPairs", "seed": seed, "resumed": False,
                       "gold_win_rate": GOLD[lr][seeds.index(seed) % 3], "seconds": 10 * (seed + 1)}
            (job / "summary.json").write_text(json.dumps(summary))
            jobs[(seed, lr)] = job.name
    return jobs


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2024-05-01" / "12-00-00"
    return root, make_seed_sweep(root)


def test_confidence_interval_matches_hand_computation():
    mean, half = confidence_interval([1.0, 2.0, 3.0])  # sd = 1
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(T_975_2 * 1 / math.sqrt(3)) and half == pytest.approx(2.484, abs=5e-4)
    mean, half = confidence_interval([0.0, 2.0])  # sd = sqrt(2): half = t * sqrt(2) / sqrt(2)
    assert (mean, half) == (pytest.approx(1.0), pytest.approx(T_975_1))
    assert confidence_interval([1.0, np.nan, 2.0, 3.0]) == pytest.approx((2.0, 2.484), abs=5e-4)  # NaN = missing
    mean, half = confidence_interval([5.0])
    assert mean == 5.0 and math.isnan(half)  # one seed: unknown spread, not 0
    assert confidence_interval([4.0, 4.0, 4.0]) == (4.0, 0.0)


def test_read_summary_keeps_top_level_numbers_only(sweep):
    root, jobs = sweep
    assert read_summary(root / jobs[(1, 1e-05)]) == {"gold_win_rate": 0.6, "seconds": 20.0}


def test_the_comparison_times_the_compared_stage_not_the_job(sweep):
    """In a sweep sharing SFT and the reward model, a job's total time says which job trained them;
    the comparison's time and memory columns are the last stage's own (`stages[algo]`)."""
    root, jobs = sweep
    for i, job in enumerate(jobs.values()):
        f = root / job / "summary.json"
        data = json.loads(f.read_text())
        data.update(algo="ppo", peak_rss_mb=999.0)
        data["stages"]["ppo"].update(fit_seconds=5.0 + i, peak_rss_mb=100.0)
        f.write_text(json.dumps(data))
    got = read_summary(root / jobs[(1, 1e-05)])
    assert (got["stage_seconds"], got["stage_peak_rss_mb"], got["seconds"]) == (7.0, 100.0, 20.0)
    lines = comparison_table(seed_table(sweep_table(load_sweep(root)[0], window=10), root))
    assert lines[0] == "| lr | seeds | gold win rate | wall time (s) | peak RSS (MB) |"
    assert lines[2] == "| 1e-05 | 3 | 0.600 ± 0.248 | 7 ± 5 | 100 ± 0 |"  # jobs 0, 2, 4: 5, 7, 9 s


def test_seed_table_groups_by_config_without_seed(sweep):
    root, jobs = sweep
    df, failed = load_sweep(root)
    table = sweep_table(df, window=10)
    assert not failed and has_seeds(table)
    seeds = seed_table(table, root)
    assert len(seeds) == 2 and seeds.attrs["params"] == ["lr"] and seeds.attrs["seed_param"] == "seed"
    assert list(seeds["lr"]) == list(LRS) and list(seeds["n_seeds"]) == [3, 3]
    for lr, row in zip(LRS, seeds.to_dict("records")):
        assert row["seeds"] == [0, 1, 2] and row["runs"] == [jobs[(s, lr)] for s in (0, 1, 2)]
        mine = table[table["lr"] == lr]
        for metric in ("final_reward_score", "final_kl_divergence", "reward_per_kl"):
            mean, half = confidence_interval(mine[metric])
            assert row[f"{metric}_mean"] == pytest.approx(mean) and row[f"{metric}_ci95"] == pytest.approx(half)
            assert row[f"{metric}_n"] == 3 and half > 0
    a, b = seeds.to_dict("records")
    assert a["gold_win_rate_mean"] == pytest.approx(0.6)
    assert a["gold_win_rate_ci95"] == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))  # sd of 0.5, 0.6, 0.7 = 0.1
    assert a["gold_win_rate_lo"] == pytest.approx(0.6 - a["gold_win_rate_ci95"])
    assert a["gold_win_rate_hi"] == pytest.approx(0.6 + a["gold_win_rate_ci95"])
    assert (b["gold_win_rate_mean"], b["gold_win_rate_ci95"]) == (pytest.approx(0.2), pytest.approx(0.0, abs=1e-12))
    assert a["seconds_mean"] == pytest.approx(20.0) and a["seconds_ci95"] == pytest.approx(T_975_2 * 10 / math.sqrt(3))
    metrics = seeds.attrs["metrics"]
    assert metrics[:2] == ["gold_win_rate", "seconds"]  # summary numbers first
    for not_a_metric in ("seed", "resumed", "model", "stages", "run_dir", "window", "collapse_suspected"):
        assert not_a_metric not in metrics


def test_job_without_summary_is_left_out_with_a_warning(sweep, caplog):
    root, jobs = sweep
    (root / jobs[(2, 1e-04)] / "summary.json").unlink()  # e.g. killed before the end
    (root / jobs[(1, 1e-04)] / "summary.json").write_text("{not json")
    df, _ = load_sweep(root)
    with caplog.at_level(logging.WARNING, logger="analysis"):
        seeds = seed_table(sweep_table(df, window=10), root)
    assert set(seeds.attrs["skipped"]) == {jobs[(2, 1e-04)], jobs[(1, 1e-04)]}
    assert "summary.json: no such file" in caplog.text and "not valid JSON" in caplog.text
    b = seeds.to_dict("records")[1]
    assert b["n_seeds"] == 1 and b["seeds"] == [0] and b["final_reward_score_n"] == 1
    assert math.isnan(b["final_reward_score_ci95"]) and math.isnan(b["gold_win_rate_ci95"])


def test_seed_curves_are_per_step_intervals(tmp_path):
    root = tmp_path / "sweep"
    jobs = make_seed_sweep(root, lrs=(1e-05,), gold_column=True)
    df, _ = load_sweep(root)
    seeds = seed_table(sweep_table(df, window=10), root)
    curves = seed_curves(df, seeds, window=1)  # window 1: the raw values
    assert set(curves["metric"]) == {"reward_score", "kl_divergence", "policy_loss", "value_loss", "gold_score"}
    at = curves[(curves["metric"] == "reward_score") & (curves["step"] == 30)].iloc[0]
    values = [df[(df["run"] == jobs[(s, 1e-05)]) & (df["step"] == 30)]["reward_score"].item() for s in (0, 1, 2)]
    mean, half = confidence_interval(values)
    assert (at["mean"], at["ci95"], at["n"]) == (pytest.approx(mean), pytest.approx(half), 3)
    gold = curves[(curves["metric"] == "gold_score") & (curves["step"] == 5)].iloc[0]
    assert gold["mean"] == pytest.approx(0.1 + 0.05)  # 0.1 * mean seed + step / 100

    smooth = seed_curves(df, seeds, window=5)
    first = smooth[(smooth["metric"] == "kl_divergence")].sort_values("step")
    assert len(first) == 60 and first["mean"].notna().all()  # min_periods=1: starts at step 0

    no_gold = tmp_path / "plain"
    make_seed_sweep(no_gold, lrs=(1e-05,))
    df2, _ = load_sweep(no_gold)
    assert "gold_score" not in set(seed_curves(df2, seed_table(sweep_table(df2, 10), no_gold))["metric"])


def test_cli_prints_and_emits_configurations_and_draws_bands(sweep):
    root, jobs = sweep
    res = cli(root, "--json", "--window", 10)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    runs = [r for r in rows if "kind" not in r]
    assert len(runs) == 6 and all(r["status"] == "ok" and "rank" in r for r in runs)  # run lines as before
    assert {r["run"]: r["params"]["seed"] for r in runs} == {job: s for (s, _lr), job in jobs.items()}
    configs = [r for r in rows if r.get("kind") == "seeds"]
    assert [c["params"] for c in configs] == [{"lr": lr} for lr in LRS]
    a = configs[0]
    assert a["n_seeds"] == 3 and a["seeds"] == [0, 1, 2] and a["runs"] == [jobs[(s, 1e-05)] for s in (0, 1, 2)]
    gold = a["metrics"]["gold_win_rate"]
    assert gold["mean"] == pytest.approx(0.6) and gold["ci95"] == pytest.approx(0.248414, abs=1e-6)
    assert gold["lo"] == pytest.approx(0.6 - 0.248414, abs=1e-6) and gold["n"] == 3
    ours = [r["final_reward_score"] for r in runs if r["params"]["lr"] == 1e-05]
    assert a["metrics"]["final_reward_score"]["mean"] == pytest.approx(np.mean(ours))
    assert_png(root / "seeds.png")
    report = (root / "report.md").read_text()
    assert "## Over seeds" in report and "### lr=1e-05" in report and "](seeds.png)" in report
    assert "| gold_win_rate | 0.6 | 0.248414 |" in report

    text = cli(root, "--window", 10)
    assert text.returncode == 0, text.stderr
    assert "Over seeds: 2 configuration(s)" in text.stdout
    assert "lr=1e-05: 3 seed(s) 0, 1, 2" in text.stdout and "lr=0.0001: 3 seed(s) 0, 1, 2" in text.stdout
    block = text.stdout.split("lr=1e-05: 3 seed(s)")[1]
    assert any(line.split()[:3] == ["gold_win_rate", "0.6", "0.248414"] for line in block.splitlines())
    # The comparison table (the README's algorithms table when `algo` is swept): mean ± CI per column.
    assert "| lr | seeds | gold win rate | wall time (s) |" in text.stdout
    assert "| 1e-05 | 3 | 0.600 ± 0.248 | 20 ± 25 |" in text.stdout and "| 0.0001 | 3 | 0.200 ± 0.000 |" in text.stdout
    assert "### Comparison" in report and "| 1e-05 | 3 | 0.600 ± 0.248 | 20 ± 25 |" in report


def test_sweep_with_one_seed_has_no_seed_output(tmp_path):
    root = tmp_path / "sweep"
    make_seed_sweep(root, seeds=(0,))
    res = cli(root, "--json", "--window", 10)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows) == 2 and not any("kind" in r for r in rows)
    assert not (root / "seeds.png").exists() and "Over seeds" not in (root / "report.md").read_text()


def test_sweep_without_any_summary_still_reports(sweep):
    root, _jobs = sweep
    for f in root.glob("*/summary.json"):
        f.unlink()
    res = cli(root, "--json", "--window", 10)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows) == 6 and not any("kind" in r for r in rows)
    assert res.stderr.count("left out of the statistics over seeds") == 6
    assert "No job to aggregate." in (root / "report.md").read_text() and not (root / "seeds.png").exists()
    text = cli(root, "--window", 10)
    assert text.returncode == 0 and "Over seeds: no job has a readable summary.json" in text.stdout


def test_a_sweep_over_tasks_gets_one_comparison_per_task_with_its_metrics(tmp_path):
    """`python train.py -m data=synthetic,arithmetic algo=grpo,dpo seed=0,1`: per task, the algorithms with
    that task's columns (accuracy and pass@k only for the verifiable one)."""
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    n = 0
    for task in ("synthetic", "arithmetic"):
        for algo in ("grpo", "dpo"):
            for seed in (0, 1):
                job = root / str(n)
                make_run(job, n=30, seed=n, overrides=(f"data={task}", f"algo={algo}", f"seed={seed}"))
                summary = {"seed": seed, "gold_win_rate": 0.6 + 0.1 * seed, "kl_final": 1.0 + seed}
                if task == "arithmetic":
                    acc = {"grpo": 0.5, "dpo": 0.3}[algo] + 0.1 * seed
                    summary |= {"accuracy_before": 0.4, "accuracy_after": acc,
                                "pass_at_k": {"before": {"1": 0.3, "4": 0.6}, "after": {"1": acc, "4": 0.8}}}
                (job / "summary.json").write_text(json.dumps(summary))
                n += 1
    assert read_summary(root / "4")["pass@4_after"] == 0.8 and read_summary(root / "4")["pass@1_before"] == 0.3
    res = cli(root, "--window", 5)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    synthetic, arithmetic = out.split("Task `synthetic`:")[1].split("Task `arithmetic`:")
    assert "| algo | seeds | gold win rate | KL |" in synthetic and "accuracy" not in synthetic
    assert "| algo | seeds | gold win rate | accuracy | pass@1 | pass@4 | KL |" in arithmetic
    assert "| grpo | 2 | 0.650 ± 0.635 | 0.550 ± 0.635 | 0.550 ± 0.635 | 0.800 ± 0.000 | 1.500 ± 6.353 |" in arithmetic
    assert "| dpo | 2 |" in synthetic and "| dpo | 2 |" in arithmetic
