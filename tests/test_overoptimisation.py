"""Over-optimisation (Gao et al. 2023): the fit recovers known curves, the peak and past_peak are judged
right, a log without gold is analysed on the proxy, and the CLI writes both report sections and JSON keys."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import load_eval
from analysis.overoptimisation import analyse, fit_gao, gao_curve, peak_d
from analysis.synthetic import synthetic_online_log
from test_analysis_cli import assert_png, cli

ALPHA, BETA = 0.6, 0.2  # peak at d* = exp(0.6 / 0.2 - 1) = e^2 = 7.39, KL* = e^4 = 54.6, gain beta d* = 1.48
D_STAR = math.exp(ALPHA / BETA - 1)
NOISE = 0.03


def eval_frame(d_end, n=21, seed=0, gold=True, proxy_slope=1.5):
    """Evaluations on the Gao curve with N(0, NOISE) gold noise; step 0 is the start policy (d = 0)."""
    rng = np.random.default_rng(seed)
    d = np.linspace(0.0, d_end, n)
    g = gao_curve(d, ALPHA, BETA) + NOISE * rng.standard_normal(n)
    g[0] = 0.0
    df = pd.DataFrame({"step": np.arange(n) * 10, "kl": d ** 2, "reward": 0.5 + proxy_slope * d,
                       "response_length": 7.0, "distinct_2": 0.8})
    if gold:
        df.insert(3, "gold", 0.1 + g)
    return df


def test_gao_curve_and_peak_formula():
    d = np.array([0.0, 1.0, D_STAR])
    assert gao_curve(d, ALPHA, BETA) == pytest.approx([0.0, ALPHA, BETA * D_STAR])
    assert peak_d(ALPHA, BETA) == pytest.approx(math.e ** 2)
    assert peak_d(0.5, -0.1) is None and peak_d(0.5, 0.0) is None


@pytest.mark.parametrize("seed", range(5))
def test_fit_recovers_alpha_beta_and_peak_within_10pct(seed):
    ev = eval_frame(2 * D_STAR, n=31, seed=seed)
    d, gain = np.sqrt(ev["kl"]), ev["gold"] - ev["gold"].iloc[0]
    alpha, beta = fit_gao(d, gain)
    assert alpha == pytest.approx(ALPHA, rel=0.10) and beta == pytest.approx(BETA, rel=0.10)
    res = analyse(ev)
    assert res["alpha"] == pytest.approx(alpha) and res["beta"] == pytest.approx(beta)
    assert res["gold_peak_kl"] == pytest.approx(D_STAR ** 2, rel=0.10)
    assert res["gold_peak_gain"] == pytest.approx(BETA * D_STAR, rel=0.10)
    assert res["gold_noise"] == pytest.approx(NOISE, rel=0.5)
    # the best evaluation lies near the peak: within the grid spacing and noise of d*
    assert abs(math.sqrt(res["observed_peak_kl"]) - D_STAR) < 0.3 * D_STAR
    assert res["observed_peak_step"] == ev["step"].iloc[int(np.argmax(ev["gold"]))]


def test_exact_curve_is_fitted_exactly():
    d = np.linspace(0, 12, 13)
    assert fit_gao(d, gao_curve(d, 1.1, 0.35)) == pytest.approx((1.1, 0.35))
    assert all(math.isnan(v) for v in fit_gao([0.0, 1.0], [0.0, 0.5]))  # one point with d > 0


@pytest.mark.parametrize("seed", range(5))
def test_past_peak_true_beyond_and_false_before(seed):
    beyond = analyse(eval_frame(2 * D_STAR, seed=seed))
    assert beyond["past_peak"] is True and "d*" in beyond["past_peak_reason"]
    assert beyond["gold_gain_end"] < beyond["observed_peak_gain"]
    before = analyse(eval_frame(0.5 * D_STAR, seed=seed))
    assert before["past_peak"] is False
    # proxy gain keeps rising: at the end it exceeds the gold gain by the gap
    assert beyond["proxy_gold_gap_end"] == pytest.approx(beyond["proxy_gain_end"] - beyond["gold_gain_end"])
    assert beyond["proxy_gold_gap_end"] > 1.0


def test_decline_alone_marks_past_peak():
    """A fit whose d* lies beyond the data (beta ~ 0) but gold clearly falling at the end."""
    ev = eval_frame(0.5 * D_STAR, seed=0)
    ev.loc[ev.index[-4:], "gold"] -= 0.5
    res = analyse(ev)
    assert res["past_peak"] is True and "below its best" in res["past_peak_reason"]


@pytest.mark.parametrize("how", ["absent", "empty"])
def test_no_gold_gives_proxy_only_and_one_skip_line(how):
    ev = eval_frame(2 * D_STAR, gold=how == "empty")
    if how == "empty":
        ev["gold"] = np.nan
    res = analyse(ev)
    assert res["alpha"] is None and res["beta"] is None and res["past_peak"] is None
    assert res["gold_peak_kl"] is None and res["observed_peak_kl"] is None
    assert res["proxy_alpha"] == pytest.approx(1.5, rel=1e-6) and res["proxy_beta"] == pytest.approx(0.0, abs=1e-6)
    assert res["proxy_gain_end"] == pytest.approx(1.5 * 2 * D_STAR)
    assert len(res["skipped"]) == 1 and "gold" in res["skipped"][0] and "skipped" in res["skipped"][0]


def make_run(root, with_eval=True, gold=True, algo="ppo", seed=0):
    (root / algo).mkdir(parents=True)
    (root / "config.yaml").write_text(f"algo: {algo}\nseed: {seed}\n")
    synthetic_online_log(120, seed=seed).to_csv(root / algo / "metrics.csv", index=False)
    if with_eval:
        eval_frame(2 * D_STAR, seed=seed, gold=gold).to_csv(root / algo / "eval.csv", index=False)
    return root


def test_load_eval_beside_the_log(tmp_path):
    run = make_run(tmp_path / "run")
    ev = load_eval(run)
    assert list(ev.columns[:4]) == ["step", "kl", "reward", "gold"] and ev["step"].iloc[0] == 0
    assert load_eval(run / "ppo" / "metrics.csv")["kl"].equals(ev["kl"])
    assert load_eval(make_run(tmp_path / "bare", with_eval=False)) is None


def test_cli_run_writes_alarms_and_overoptimisation(tmp_path):
    run = make_run(tmp_path / "run")
    res = cli(run, "--json", "--window", 10)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["alarms"] == [] and isinstance(out["skipped"], list)
    oo = out["overoptimisation"]
    assert oo["past_peak"] is True and oo["gold_peak_kl"] == pytest.approx(D_STAR ** 2, rel=0.10)
    report = (run / "report.md").read_text()
    assert "## Alarms" in report and "## Over-optimisation" in report and "| past_peak | yes |" in report
    for name in ("health.png", "overoptimisation.png", "dashboard.png"):
        assert_png(run / name)

    faulty = make_run(tmp_path / "faulty", gold=False)
    log = pd.read_csv(faulty / "ppo" / "metrics.csv")
    log.loc[log["step"] == 60, "reward_score"] = np.nan
    log.to_csv(faulty / "ppo" / "metrics.csv", index=False)
    out = json.loads(cli(faulty, "--json").stdout)
    assert [(a["name"], a["step"]) for a in out["alarms"]] == [("non_finite", 60)]
    assert set(out["alarms"][0]) == {"name", "step", "value", "threshold", "message"}
    assert out["overoptimisation"]["alpha"] is None and any("gold" in s for s in out["skipped"])
    text = cli(faulty)
    assert text.returncode == 0 and "non_finite at step 60" in text.stdout and "Skipped:" in text.stdout
    assert "| non_finite | 60 |" in (faulty / "report.md").read_text()


def test_cli_without_eval_says_it_skipped(tmp_path):
    run = make_run(tmp_path / "run", with_eval=False)
    out = json.loads(cli(run, "--json").stdout)
    assert "overoptimisation" not in out
    assert any(s.startswith("over-optimisation skipped: no eval.csv") for s in out["skipped"])
    report = (run / "report.md").read_text()
    assert "## Alarms" in report and "## Over-optimisation" not in report


def test_cli_sweep_per_run_alarms_and_frontier(tmp_path):
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for job, (algo, seed) in enumerate([("ppo", 0), ("ppo", 1), ("grpo", 0), ("grpo", 1)]):
        run = make_run(root / str(job), algo=algo, seed=seed, with_eval=job != 3)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(f"- algo={algo}\n- seed={seed}\n")
    res = cli(root, "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    runs = {r["run"]: r for r in rows if "run" in r}
    assert set(runs) == {"0", "1", "2", "3"}
    assert all(r["alarms"] == [] for r in runs.values())
    assert "overoptimisation" in runs["0"] and "overoptimisation" not in runs["3"]
    assert_png(root / "frontier.png")
    report = (root / "report.md").read_text()
    assert "## Alarms" in report and "### Run 3" in report and "![KL-reward frontier](frontier.png)" in report
    assert "no eval.csv for run(s) 3" in report


@pytest.mark.parametrize("n_eval", [3, 5])
def test_too_few_points_give_no_fit_and_no_past_peak(n_eval):
    """The default run's old schedule (updates 0, 25, 40) gave 2 points past the baseline: the fit went
    through them exactly and claimed a peak. Below MIN_FIT_POINTS there is no fit, no peak, no verdict."""
    from analysis.overoptimisation import MIN_FIT_POINTS

    ev = eval_frame(2 * D_STAR, n=n_eval, seed=0)
    res = analyse(ev)
    assert n_eval - 1 < MIN_FIT_POINTS
    for k in ("alpha", "beta", "gold_peak_kl", "gold_peak_kl_ci", "past_peak", "past_peak_reason", "proxy_alpha"):
        assert res[k] is None, k
    assert res["observed_peak_kl"] is not None  # what was observed is still reported
    assert len(res["skipped"]) == 1 and f"needs >= {MIN_FIT_POINTS}" in res["skipped"][0]
    ok = analyse(eval_frame(2 * D_STAR, n=MIN_FIT_POINTS + 1, seed=0))
    assert ok["alpha"] is not None and ok["skipped"] == []


def test_peak_interval_covers_the_true_peak_and_narrows_with_points():
    covered, widths = 0, {}
    for n in (11, 41):
        w = []
        for seed in range(20):
            res = analyse(eval_frame(2 * D_STAR, n=n, seed=seed))
            lo, hi = res["gold_peak_kl_ci"]
            covered += lo <= D_STAR ** 2 <= hi
            w.append(math.log(hi / lo))
            assert res["alpha_se"] > 0 and res["beta_se"] > 0
        widths[n] = np.median(w)
    assert covered >= 34  # of 40 nominal-95% intervals
    assert widths[41] < widths[11]


def test_a_run_that_does_not_start_at_its_reference_is_not_judged():
    """ORPO trains from the base model and is compared with the SFT policy: its first evaluation is the
    untrained model, tens of nats from that reference, whose random text the gold scores above any SFT
    policy. Gains from it fell 'from the best' on every seed (past_peak on 3 of 3 on the length trap);
    they measure learning from scratch, so the analysis and the frontier skip such a run, saying why."""
    from analysis.overoptimisation import frontier_curve, sweep_frontier

    kl = [60.0, 50.0, 30.0, 10.0, 5.0, 2.0, 1.5, 1.2, 1.0]
    gold = [0.0, -0.05, -0.1, -0.15, -0.2, -0.18, -0.17, -0.19, -0.18]
    ev = pd.DataFrame({"step": np.arange(9) * 8, "kl": kl, "reward": np.nan, "gold": gold, "response_length": 24.0})
    res = analyse(ev)
    assert res["past_peak"] is None and res["alpha"] is None and res["observed_peak_kl"] is None
    assert len(res["skipped"]) == 1 and "60 nats from the reference" in res["skipped"][0]
    assert frontier_curve(ev, None, "gold") is None
    _, info = sweep_frontier({"0": (ev, None), "1": (eval_frame(D_STAR), None)}, {"0": "orpo", "1": "ppo"})
    assert any("frontier skipped for run(s) 0" in s and "away from the reference" in s for s in info["skipped"])
    # A start at the reference up to float rounding is judged as before.
    near = eval_frame(2 * D_STAR, seed=0).assign(kl=lambda d: d["kl"] + 1e-6)
    assert analyse(near)["past_peak"] is True
