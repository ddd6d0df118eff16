"""The analysis CLI (subprocess), reports and figures, TensorBoard loading and Chinese labels."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from analysis import AnalysisError, compute_metrics, load_run, write_report
from analysis import fonts, plots
from analysis.synthetic import synthetic_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path


def make_run(root, n=120, seed=0, collapse_from=None, overrides=("lr=1e-05",)):
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text("lr: 1e-05\n")
    (root / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (root / "ppo").mkdir()
    (root / "summary.json").write_text("{}")
    df = synthetic_log(n, seed=seed, collapse_from=collapse_from)
    df.to_csv(root / "ppo" / "metrics.csv", index=False)
    return root


def make_multirun(root):
    """3 jobs: 0 healthy (lr=1e-05), 1 failed (no metrics.csv), 2 collapsing (lr=1e-04)."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    make_run(root / "0", seed=0, overrides=("lr=1e-05", "kl_coef=0.05"))
    (root / "1" / ".hydra").mkdir(parents=True)
    (root / "1" / ".hydra" / "overrides.yaml").write_text("- lr=3e-05\n- kl_coef=0.05\n")
    make_run(root / "2", seed=1, collapse_from=90, overrides=("lr=1e-04", "kl_coef=0.05"))
    return root


def test_cli_json_on_csv_matches_compute_metrics(tmp_path):
    csv = tmp_path / "log.csv"
    synthetic_log(200).to_csv(csv, index=False)
    res = cli(csv, "--json", "--window", 20)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    expected = compute_metrics(load_run(csv), window=20)
    for key in ("policy_loss_reduction_pct", "reward_improvement", "training_stability", "reward_per_kl"):
        assert out[key] == pytest.approx(expected[key])
    assert out["num_steps"] == 200 and out["window"] == 20
    for name in ("report.md", "dashboard.png", "moving_average.png"):  # written next to the CSV
        assert (tmp_path / name).stat().st_size > 0


def test_cli_table_on_run_dir(tmp_path):
    run = make_run(tmp_path / "outputs" / "runs" / "2024-05-01" / "12-00-00")
    res = cli(run, "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr
    assert "policy_loss_reduction_pct" in res.stdout and "reward_per_kl" in res.stdout
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Metrics" in report and "](dashboard.png)" in report
    assert_png(tmp_path / "rep" / "dashboard.png")


def test_cli_sweep_json_ranks_runs_and_lists_failed_job(tmp_path):
    root = make_multirun(tmp_path / "multirun" / "2024-05-01" / "12-00-00")
    res = cli(root, "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["rank"] for r in ok] == [1, 2]
    assert sorted(r["run"] for r in ok) == ["0", "2"]
    assert ok[0]["final_reward_score"] >= ok[1]["final_reward_score"]
    assert {r["run"]: r["params"]["lr"] for r in ok} == {"0": 1e-05, "2": 1e-04}
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["run"] for r in failed] == ["1"] and "no training log" in failed[0]["error"]
    collapsed = next(r for r in ok if r["run"] == "2")
    assert collapsed["collapse_suspected"] is True and collapsed["final_kl_divergence"] > 1
    for name in ("sweep_reward_vs_kl.png", "sweep_final_reward.png"):
        assert_png(root / name)
    assert "job 1:" in (root / "report.md").read_text()

    bounded = [json.loads(line) for line in cli(root, "--json", "--max-kl", 1.0).stdout.splitlines()]
    by_run = {r["run"]: r for r in bounded}
    assert by_run["0"]["rank"] == 1 and by_run["2"]["rank"] is None and by_run["2"]["eligible"] is False

    table = cli(root)
    assert table.returncode == 0 and "Failed jobs:" in table.stdout and "1:" in table.stdout


@pytest.mark.parametrize("make_bad", ["missing", "bad_csv"])
def test_cli_error_is_one_line_and_nonzero(tmp_path, make_bad):
    target = tmp_path / "missing.csv"
    if make_bad == "bad_csv":
        target = tmp_path / "bad.csv"
        target.write_text("step,policy_loss\n0,1\n")
    res = cli(target, "--json")
    assert res.returncode != 0 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(target) in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_bad_argument_is_one_line(tmp_path):
    usage = cli(tmp_path, "--window", "zero")
    assert usage.returncode == 2 and usage.stdout == ""
    assert len(usage.stderr.strip().splitlines()) == 1 and "--window" in usage.stderr


def test_tensorboard_run_dir_loads_mapped_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    writer = SummaryWriter(str(run / "ppo" / "tb"))
    tags = {"loss/policy_avg": 1.0, "loss/value_avg": 2.0, "objective/kl": 0.01, "objective/scores": 0.5, "lr": 1e-5}
    for step in range(10):
        for tag, base in tags.items():
            writer.add_scalar(tag, base * (step + 1), step)
    for step in (5, 6):  # a resumed run logs steps 5 and 6 again
        for tag in tags:
            writer.add_scalar(tag, -1.0, step)
    writer.add_scalar("other/ignored", 3.0, 0)
    writer.close()
    df = load_run(run)
    assert df.attrs["source_kind"] == "tensorboard" and df["step"].tolist() == list(range(10))
    assert df["policy_loss"].tolist()[:3] == pytest.approx([1.0, 2.0, 3.0])
    assert df["value_loss"].iloc[9] == pytest.approx(20.0) and df["learning_rate"].iloc[0] == pytest.approx(1e-5)
    assert df["reward_score"].iloc[5] == -1.0 and df["kl_divergence"].iloc[6] == -1.0  # last write wins
    assert df.attrs["duplicate_rows_dropped"] == 2
    assert compute_metrics(df, window=3)["num_steps"] == 10
    assert cli(run, "--json").returncode == 0


def test_write_report_figures_and_default_location(tmp_path):
    csv = tmp_path / "metrics.csv"
    synthetic_log(100_000, collapse_from=99_000).to_csv(csv, index=False)
    report = write_report(csv)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    assert "possible collapse" in text and "| policy_loss_reduction_pct |" in text
    for name in ("dashboard.png", "moving_average.png"):
        assert_png(tmp_path / name)


def test_decimate_keeps_spikes():
    y = np.zeros(100_000)
    y[12_345] = 7.0
    xs, ys = plots.decimate(np.arange(y.size), y, max_points=1000)
    assert len(ys) <= 1000 and np.nanmax(ys) == 7.0


def test_zh_without_cjk_font_raises_naming_a_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "CJK_FAMILIES", ())
    monkeypatch.setattr(fonts, "CJK_FILE_HINTS", ())
    monkeypatch.setattr(fonts, "_found", {})
    with pytest.raises(AnalysisError, match="fonts-noto-cjk"):
        plots.dashboard(synthetic_log(60), tmp_path / "d.png", lang="zh")
    assert not (tmp_path / "d.png").exists()


def test_zh_figures_render_with_cjk_font(tmp_path):
    try:
        family = fonts.find_cjk_font("".join(plots.LABELS["zh"].values()))
    except AnalysisError as exc:
        pytest.skip(f"no CJK font installed ({exc})")
    df = synthetic_log(120)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.dashboard(df, tmp_path / "zh_dash.png", lang="zh")
        plots.moving_average_figure(df, tmp_path / "zh_ma.png", lang="zh")
    assert not [w for w in caught if "missing from" in str(w.message) or "Glyph" in str(w.message)], family
    assert_png(tmp_path / "zh_dash.png") and assert_png(tmp_path / "zh_ma.png")
    csv = tmp_path / "m.csv"
    df.to_csv(csv, index=False)
    assert cli(csv, "--lang", "zh", "--json").returncode == 0
