"""Loading and metrics of the analysis package: notebook formulas, de-duplication,
the extra measures on constructed series with known answers, and bad inputs."""
import logging
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisError, compute_metrics, load_run, load_sweep
from analysis.metrics import (kl_spikes, metric_warnings, nonfinite_counts, relative_noise, reward_per_kl,
                              stability_score, training_stability, trend)

HEADER = "step,policy_loss,value_loss,kl_divergence,reward_score,learning_rate,batch_size,timestamp\n"
PL = [2.0, 1.8, 1.5, 1.6, 1.2, 1.0]
VL = [1.0, 0.9, 0.8, 0.7, 0.65, 0.6]
KL = [0.0, 0.01, 0.03, 0.04, 0.06, 0.08]
RS = [-0.5, -0.2, 0.1, 0.3, 0.2, 0.6]


def write_csv(path, rows):
    """rows: (step, pl, vl, kl, rs) tuples; learning_rate is written as quoted-in-the-cell text."""
    lines = [f"{s},{p},{v},{k},{r},'3e-05',8,2024-01-01 00:00:{i:02d}\n" for i, (s, p, v, k, r) in enumerate(rows)]
    path.write_text(HEADER + "".join(lines))
    return path


def frame(**cols):
    n = len(next(iter(cols.values())))
    base = {"step": np.arange(n), "policy_loss": np.ones(n), "value_loss": np.ones(n),
            "kl_divergence": np.full(n, 0.1), "reward_score": np.zeros(n)}
    base.update({k: np.asarray(v, dtype=float) for k, v in cols.items()})
    return pd.DataFrame(base)


def test_notebook_metrics_equal_the_formulas(tmp_path):
    csv = write_csv(tmp_path / "metrics.csv", zip(range(6), PL, VL, KL, RS))
    df = load_run(csv)
    assert df["learning_rate"].dtype == float and (df["learning_rate"] == 3e-05).all()
    assert pd.api.types.is_datetime64_any_dtype(df["timestamp"])
    m = compute_metrics(df, window=3)
    assert m["policy_loss_reduction_pct"] == pytest.approx((PL[0] - PL[-1]) / PL[0] * 100)
    assert m["reward_improvement"] == pytest.approx(RS[-1] - RS[0])
    assert m["training_stability"] == pytest.approx(1.0 / (1.0 + statistics.variance(PL)))
    assert m["final_policy_loss_ma"] == pytest.approx(sum(PL[-3:]) / 3)
    assert m["final_reward_score_ma"] == pytest.approx(sum(RS[-3:]) / 3)
    finals = (m["final_policy_loss"], m["final_value_loss"], m["final_kl_divergence"], m["final_reward_score"])
    assert finals == pytest.approx((PL[-1], VL[-1], KL[-1], RS[-1]))
    assert m["num_steps"] == 6 and m["nan_count"] == 0 and m["first_nonfinite_step"] is None
    assert math.isnan(compute_metrics(df, window=50)["final_policy_loss_ma"])  # shorter than the window


def test_resumed_run_duplicates_sorted_last_write_wins(tmp_path, caplog):
    rows = [(0, 2.0, 1, 0.0, 0.0), (1, 1.9, 1, 0.1, 0.1), (2, 1.8, 1, 0.2, 0.2), (3, 1.7, 1, 0.3, 0.3),
            (2, 1.5, 1, 0.2, 0.9), (3, 1.4, 1, 0.3, 1.0), (4, 1.3, 1, 0.4, 1.1)]  # resumed at step 2
    with caplog.at_level(logging.WARNING, logger="analysis"):
        df = load_run(write_csv(tmp_path / "m.csv", rows))
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    assert df["policy_loss"].tolist() == [2.0, 1.9, 1.5, 1.4, 1.3]  # the rewritten rows win
    assert df.attrs["duplicate_rows_dropped"] == 2 and df.attrs["step_backjumps"] == 1
    assert any("repeat an earlier step" in r.getMessage() for r in caplog.records)
    shuffled = load_run(write_csv(tmp_path / "s.csv", [rows[2], rows[0], rows[1]]))
    assert shuffled["step"].tolist() == [0, 1, 2] and shuffled.attrs["duplicate_rows_dropped"] == 0
    assert shuffled.attrs["step_backjumps"] == 1 and len(shuffled.attrs["warnings"]) == 1


def test_relative_noise_known_answers():
    t = np.arange(101)
    assert relative_noise(pd.Series(5.0 - 0.03 * t)) == pytest.approx(0.0, abs=1e-12)
    assert stability_score(pd.Series(5.0 - 0.03 * t)) == pytest.approx(1.0)
    d = 0.5  # x = 10 + d(-1)^t: diffs are +-2d, so std(diff)/sqrt(2) = sqrt(2) d; mean|x| = 10 + d/101
    x = pd.Series(10.0 + d * (-1.0) ** t)
    assert relative_noise(x) == pytest.approx(math.sqrt(2) * d / (10.0 + d / 101))
    assert stability_score(x) == pytest.approx(1.0 / (1.0 + math.sqrt(2) * d / (10.0 + d / 101)))
    # scale-free, unlike the notebook's 1 / (1 + var)
    assert stability_score(1000 * x) == pytest.approx(stability_score(x))
    assert training_stability(frame(policy_loss=1000 * x)) != pytest.approx(training_stability(frame(policy_loss=x)))
    # a linear trend under the same noise leaves std(diff) unchanged; only the level moves
    y = pd.Series(100.0 + 0.5 * t + (-1.0) ** t)
    assert relative_noise(y) == pytest.approx(math.sqrt(2) / np.abs(y).mean())


def test_reward_per_kl_known_answers():
    t = np.arange(100)
    df = frame(reward_score=t, kl_divergence=np.full(100, 0.5))
    assert reward_per_kl(df, window=10) == pytest.approx((94.5 - 4.5) / 0.5)  # means of 90..99 and 0..9
    assert compute_metrics(df, window=10)["reward_per_kl"] == pytest.approx(180.0)
    assert math.isnan(reward_per_kl(frame(reward_score=t, kl_divergence=np.zeros(100)), window=10))


def test_trend_and_collapse_flag():
    x = np.arange(10.0)
    slope, t = trend(x, 3 * x + 1)
    assert slope == pytest.approx(3.0) and t == math.inf
    n, w = 200, 50
    step = np.arange(n)
    wiggle = 0.01 * (-1.0) ** step
    rising_kl = 0.001 * step + wiggle
    falling = np.where(step < n - w, 0.01 * step, 0.01 * (n - w) - 0.02 * (step - (n - w))) + wiggle
    m = compute_metrics(frame(reward_score=falling, kl_divergence=rising_kl), window=w)
    assert m["collapse_suspected"] is True
    assert m["reward_slope_last_window"] == pytest.approx(-0.02, abs=1e-3) and m["kl_trend_t"] > 2
    healthy = compute_metrics(frame(reward_score=0.01 * step + wiggle, kl_divergence=rising_kl), window=w)
    assert healthy["collapse_suspected"] is False
    flat_kl = compute_metrics(frame(reward_score=falling, kl_divergence=0.1 + wiggle), window=w)
    assert flat_kl["collapse_suspected"] is False


def test_kl_spikes_known_answers():
    """The report counts spikes by the kl_spike alarm's rule: a steady climb is not spiky, single
    rows far above the trailing window that fall back are, and the alarm fires at the first."""
    from analysis.alarms import detect

    t = np.arange(300.0)
    steep = 0.01 * t
    assert kl_spikes(frame(kl_divergence=steep)).sum() == 0
    spiky = steep.copy()
    spiky[[50, 150, 297]] *= 10.0  # single batches at ten times the trend (a jump of 4.5x is within clean noise)
    assert np.flatnonzero(kl_spikes(frame(kl_divergence=spiky))).tolist() == [50, 150, 297]
    wavy = 0.1 + 0.001 * np.sin(t)
    wavy[[20, 200]] += 1.0
    df = frame(kl_divergence=wavy)
    assert compute_metrics(df)["kl_spike_count"] == 2
    assert [(a.name, a.step) for a in detect(df)[0] if a.name == "kl_spike"] == [("kl_spike", df["step"][21])]


def test_nonfinite_counts(tmp_path):
    rows = [(i, 1.0, 1.0, 0.1, 0.1) for i in range(8)]
    rows[3] = (3, 1.0, 1.0, 0.1, "nan")
    rows[5] = (5, 1.0, 1.0, "inf", 0.1)
    rows[6] = (6, 1.0, "", 0.1, 0.1)
    df = load_run(write_csv(tmp_path / "m.csv", rows))
    m = compute_metrics(df)
    assert (m["nan_count"], m["inf_count"], m["first_nonfinite_step"]) == (2, 1, 3)
    counts = nonfinite_counts(df)
    assert counts["reward_score"] == {"nan": 1, "inf": 0} and counts["kl_divergence"] == {"nan": 0, "inf": 1}
    assert counts["value_loss"] == {"nan": 1, "inf": 0} and counts["policy_loss"] == {"nan": 0, "inf": 0}
    assert any("NaN" in w and "step 3" in w for w in metric_warnings(m))


def _sweep(tmp_path, failed_job="1"):
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for job, lr in zip("012", ("1e-05", "3e-05", "1e-04")):
        (root / job / ".hydra").mkdir(parents=True)
        (root / job / ".hydra" / "overrides.yaml").write_text(f"- lr={lr}\n- kl_coef=0.05\n- +tag=run{job}\n")
        (root / job / "ppo").mkdir()
        if job == failed_job:
            (root / job / "ppo" / "metrics.csv").write_text("")
        else:
            write_csv(root / job / "ppo" / "metrics.csv", [(s, 1.0, 1.0, 0.1 * s, s * (1 + int(job))) for s in range(5)])
    return root


def test_load_sweep_adds_run_and_override_columns(tmp_path):
    df, failed = load_sweep(_sweep(tmp_path))
    assert failed == ["1"] and "empty" in df.attrs["failed_jobs"]["1"]
    assert df["run"].unique().tolist() == ["0", "2"]
    assert df.groupby("run")["lr"].first().to_dict() == {"0": 1e-05, "2": 1e-04}
    assert (df["kl_coef"] == 0.05).all() and df.groupby("run")["tag"].first()["2"] == "run2"


@pytest.mark.parametrize("case", ["missing_column", "empty_file", "header_only", "no_logs_dir", "non_numeric",
                                  "missing_path", "bad_step", "sweep_all_failed"])
def test_bad_input_raises_analysis_error_naming_the_file(tmp_path, case):
    target = tmp_path / "metrics.csv"
    if case == "missing_column":
        target.write_text("step,policy_loss,value_loss,kl_divergence\n0,1,1,0.1\n")
    elif case == "empty_file":
        target.write_text("")
    elif case == "header_only":
        target.write_text(HEADER)
    elif case == "no_logs_dir":
        target = tmp_path / "run"
        (target / "ppo").mkdir(parents=True)
    elif case == "non_numeric":
        write_csv(target, [(0, 1.0, 1.0, 0.1, 0.0), (1, 1.0, 1.0, "oops", 0.0)])
    elif case == "missing_path":
        target = tmp_path / "nowhere.csv"
    elif case == "bad_step":
        write_csv(target, [(0, 1.0, 1.0, 0.1, 0.0), ("", 1.0, 1.0, 0.1, 0.0)])
    loader = load_run
    if case == "sweep_all_failed":
        target = _sweep(tmp_path)
        for job in "02":
            (target / job / "ppo" / "metrics.csv").unlink()
        loader = lambda p: load_sweep(p)  # noqa: E731
    with pytest.raises(AnalysisError) as err:
        loader(target)
    msg = str(err.value)
    assert str(target) in msg and "\n" not in msg
    expected = {"missing_column": "reward_score", "empty_file": "empty", "header_only": "no data rows",
                "no_logs_dir": "no training log", "non_numeric": "'oops'", "missing_path": "no such file",
                "bad_step": "step", "sweep_all_failed": "none of the 3 jobs"}[case]
    assert expected in msg
