"""Run-health alarms: a clean synthetic log raises none; each injected fault is found by name within
one window of where it starts; alarms never move as rows are appended; missing columns are skipped."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis.alarms import NAMES, Alarm, Thresholds, detect
from analysis.synthetic import synthetic_log, synthetic_online_log

N, AT = 300, 150  # log length and the step each fault starts at (steps are 1-based)
W = Thresholds().window


def clean(seed=0):
    return synthetic_online_log(N, seed=seed)


def rows_from(df, step):
    return df["step"] >= step


def kl_blowup(df):
    m = rows_from(df, AT)
    df.loc[m, "kl_divergence"] = 30.0 * np.exp(0.1 * np.arange(m.sum()))


def entropy_collapse(df):
    m = rows_from(df, AT)
    df.loc[m, "entropy"] *= np.exp(-0.5 * np.arange(1, m.sum() + 1)).clip(0.01)


def length_hacking(df):
    m = rows_from(df, AT)
    j = np.arange(1, m.sum() + 1).clip(max=30)
    growth = 1.0 + 0.15 * j
    df.loc[m, "entropy"] *= growth  # per-token entropy unchanged: only the length moves
    df.loc[m, "response_length"] *= growth
    df.loc[m, "reward_score"] += 0.05 * j


def nan(df):
    df.loc[df["step"] == AT, "reward_score"] = np.nan


def inf(df):
    df.loc[df["step"] == AT, "entropy"] = np.inf


def negative_kl(df):
    m = rows_from(df, AT) & (df["step"] < AT + 50)
    df.loc[m, "kl_divergence"] = -0.4 + 0.05 * np.random.default_rng(1).standard_normal(m.sum())


def clipfrac(df):
    m = rows_from(df, AT)
    df.loc[m, "clipfrac"] = 0.45 + 0.05 * np.random.default_rng(2).standard_normal(m.sum())


def approxkl(df):
    df.loc[rows_from(df, AT), "approxkl"] = 0.2


def value_loss(df):
    m = rows_from(df, AT)
    df.loc[m, "value_loss"] = 0.05 * np.exp(0.5 * np.arange(m.sum()))


def kl_spike(df):
    df.loc[df["step"] == AT, "kl_divergence"] = 15.0


FAULTS = {"kl_blowup": kl_blowup, "entropy_collapse": entropy_collapse, "length_hacking": length_hacking,
          "non_finite": nan, "negative_kl": negative_kl, "clipfrac_high": clipfrac, "approxkl_high": approxkl,
          "value_loss_divergence": value_loss, "kl_spike": kl_spike}


@pytest.mark.parametrize("seed", range(5))
def test_clean_logs_raise_no_alarm(seed):
    for n in (40, 100, N, 1000):
        alarms, skipped = detect(synthetic_online_log(n, seed=seed))
        assert alarms == [] and skipped == [], (n, alarms, skipped)


@pytest.mark.parametrize("name", list(FAULTS))
def test_injected_fault_found_within_one_window(name):
    df = clean()
    FAULTS[name](df)
    alarms, _ = detect(df)
    by_name = {a.name: a for a in alarms}
    assert name in by_name, alarms
    assert AT <= by_name[name].step <= AT + W, by_name[name]
    assert all(a.step >= AT for a in alarms), alarms  # nothing fires on the clean part
    assert all(isinstance(a.message, str) and "\n" not in a.message for a in alarms)


def test_nan_fires_at_its_step_and_inf_too():
    for fault in (nan, inf):
        df = clean()
        fault(df)
        (alarm,) = [a for a in detect(df)[0] if a.name == "non_finite"]
        assert alarm.step == AT and alarm.threshold == 0.0
        assert alarm.to_dict()["step"] == AT


def test_length_drift_both_ways():
    df = clean()
    length_hacking(df)
    assert "length_drift" in {a.name for a in detect(df)[0]}
    short = clean()
    short.loc[rows_from(short, AT), ["response_length", "entropy"]] *= 0.1  # answers all but vanish
    alarms = {a.name: a for a in detect(short)[0]}
    assert AT <= alarms["length_drift"].step <= AT + W and "length_hacking" not in alarms


def test_length_doubling_within_the_first_window_is_judged_against_the_start():
    # The length trap's PPO doubles its responses in its first updates, then holds them: judged
    # against a first window that already holds the jump, length_hacking never fired on two of three seeds.
    df = clean()
    m = rows_from(df, 2)
    j = np.arange(1, m.sum() + 1).clip(max=6)
    growth = 1.0 + 0.17 * j  # x2 by step 7, then flat
    df.loc[m, "entropy"] *= growth
    df.loc[m, "response_length"] *= growth
    df.loc[m, "reward_score"] += 0.1 * j
    alarms = {a.name: a for a in detect(df)[0]}
    assert alarms["length_hacking"].step == W and alarms["length_drift"].step <= W + 5


def test_each_name_once_at_its_first_step():
    df = clean()
    for fault in (kl_spike, clipfrac, nan):
        fault(df)
    late = df["step"] >= AT + 60
    df.loc[late, "kl_divergence"] = 20 * df.loc[late, "kl_divergence"]  # a second spike later on
    alarms, _ = detect(df)
    names = [a.name for a in alarms]
    assert len(names) == len(set(names)) and set(names) <= set(NAMES)
    assert {a.name: a.step for a in alarms}["kl_spike"] == AT + 1  # known when KL falls back


def _key(a: Alarm):
    return a.name, a.step, round(a.value, 9) if math.isfinite(a.value) else None


def test_appending_rows_never_moves_an_alarm():
    df = clean()
    for fault in (kl_spike, entropy_collapse, nan, value_loss):
        fault(df)
    df.loc[df["step"].between(60, 90), "clipfrac"] = 0.5
    full = {_key(a) for a in detect(df)[0]}
    assert len(full) >= 5
    seen: dict[str, int] = {}
    for n in range(1, len(df) + 1, 3):
        prefix = df.iloc[:n]
        alarms = detect(prefix)[0]
        last = prefix["step"].iloc[-1]
        # detection at step s uses rows <= s only: a prefix sees exactly the full log's alarms so far
        assert {_key(a) for a in alarms} == {k for k in full if k[1] <= last}, n
        for a in alarms:
            assert seen.setdefault(a.name, a.step) == a.step


def test_missing_columns_give_skip_lines_not_errors():
    alarms, skipped = detect(synthetic_log(200))  # the notebook's 8 reference columns
    assert alarms == []
    assert skipped == ["entropy_collapse skipped: no entropy column", "length_drift skipped: no response_length column",
                       "length_hacking skipped: no response_length column", "clipfrac_high skipped: no clipfrac or clipfrac_seq column",
                       "approxkl_high skipped: no approxkl column; no approxkl_seq column"]
    grpo = clean().drop(columns=["approxkl"]).assign(value_loss=np.nan)  # GRPO: no critic, no approxkl
    alarms, skipped = detect(grpo)
    assert alarms == []  # an empty-by-design column is not a NaN fault
    assert skipped == ["approxkl_high skipped: no approxkl column; no approxkl_seq column",
                       "value_loss_divergence skipped: value_loss column is empty"]
    dpo = pd.DataFrame({"step": np.arange(1, 51), "policy_loss": np.linspace(0.7, 0.3, 50),
                        "value_loss": np.nan, "kl_divergence": np.nan, "reward_score": np.linspace(0, 1, 50)})
    alarms, skipped = detect(dpo)
    assert alarms == [] and "kl_spike skipped: kl_divergence column is empty" in skipped
    assert len(skipped) == len(NAMES) - 1  # every detector but non_finite
    one_row, _ = detect(clean().iloc[:1])
    assert one_row == []


def test_entropy_without_length_uses_the_summed_entropy():
    df = clean().drop(columns=["response_length"])
    entropy_collapse(df)
    alarms, skipped = detect(df)
    assert "entropy_collapse" in {a.name for a in alarms}
    assert not any(s.startswith("entropy_collapse") for s in skipped)


def test_thresholds_are_configurable():
    df = clean()
    df.loc[rows_from(df, AT), "clipfrac"] = 0.2  # below the default 0.3
    assert "clipfrac_high" not in {a.name for a in detect(df)[0]}
    assert "clipfrac_high" in {a.name for a in detect(df, Thresholds(clipfrac_max=0.15))[0]}
    with pytest.raises(ValueError):
        Thresholds(window=1)


def test_sequence_level_diagnostics_are_judged_with_sequence_limits():
    """RLOO's clipfrac and approxkl are per response (`<stat>_seq` columns): its healthy values (clipfrac
    ~0.42, approxkl ~0.10 over 16-token responses) raise nothing, while the same numbers logged as
    per-token diagnostics would (the false alarms a clean RLOO run used to raise)."""
    rng = np.random.default_rng(4)
    df = clean()
    values = {"clipfrac": 0.42 + 0.05 * rng.standard_normal(N), "approxkl": 0.10 * np.exp(0.3 * rng.standard_normal(N))}
    df["response_length"] = 16.0
    seq = df.drop(columns=["clipfrac", "approxkl"]).assign(**{f"{k}_seq": v for k, v in values.items()})
    assert detect(seq)[0] == []
    tok = df.assign(**values)
    assert {a.name for a in detect(tok)[0]} == {"clipfrac_high", "approxkl_high"}
    # A sequence-level fault still fires, with the level in its message.
    seq.loc[rows_from(seq, AT), "clipfrac_seq"] = 0.95
    seq.loc[rows_from(seq, AT), "approxkl_seq"] = 16 * 0.2  # 0.2 per token
    alarms = {a.name: a for a in detect(seq)[0]}
    assert set(alarms) == {"clipfrac_high", "approxkl_high"}
    assert all(AT <= a.step < AT + W for a in alarms.values())
    assert "(per response)" in alarms["clipfrac_high"].message
    assert "(per response / mean length)" in alarms["approxkl_high"].message and alarms["approxkl_high"].value >= 0.05
    _, skipped = detect(seq.drop(columns=["response_length"]))
    assert "approxkl_high skipped: no approxkl column; no response_length column" in skipped


# ----------------------------------------------------------------------------- scale-free KL rules
SCALES = (0.1, 1.0, 10.0)


@pytest.mark.parametrize("name", [n for n in FAULTS if n != "kl_blowup"])  # kl_blowup: the absolute second line
def test_no_alarm_moves_when_kl_is_rescaled(name):
    """Every rule but kl_blowup's ceiling judges KL against the run's own history: a log whose KL is in
    other units (x0.1, x10) raises the same alarms at the same steps."""
    found = {}
    for scale in SCALES:
        df = clean()
        FAULTS[name](df)
        df["kl_divergence"] *= scale
        found[scale] = {a.name: a.step for a in detect(df)[0] if a.name != "kl_blowup"}
    assert found[0.1] == found[1.0] == found[10.0] and name in found[1.0], found


def plateau_then_growth(scale, rate=0.017, noise=0.03, seed=0, n=N, at=AT):
    """The seed-schema case: KL rises from 0, sits near 0.16 nats, then grows by `rate` per update from
    step `at` (times `scale`, with multiplicative noise)."""
    rng = np.random.default_rng(seed)
    df = synthetic_online_log(n, seed=seed)
    step = df["step"].to_numpy()
    kl = 0.16 * (1 - np.exp(-step / 10)) * np.exp(rate * np.clip(step - at, 0, None) + noise * rng.standard_normal(n))
    df["kl_divergence"] = scale * kl
    return df


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("seed", range(3))
def test_kl_accelerating_after_a_plateau_is_found_within_about_one_window(scale, seed):
    alarms = {a.name: a for a in detect(plateau_then_growth(scale, seed=seed))[0]}
    assert "kl_growth" in alarms and AT <= alarms["kl_growth"].step <= AT + 3 * W // 2, alarms
    assert all(a.step >= AT for a in alarms.values()), alarms  # the early rise and the plateau: silent
    # The same log without the growth raises nothing.
    assert detect(plateau_then_growth(scale, rate=0.0, seed=seed))[0] == []


def test_fast_early_rise_from_zero_is_silent():
    """KL doubling every update from near zero, then levelling off, as a policy leaving its reference."""
    df = clean()
    step = df["step"].to_numpy()
    df["kl_divergence"] = 2.0 / (1 + np.exp(-(step - 12) * np.log(2))) * np.exp(0.05 * np.random.default_rng(3).standard_normal(N))
    assert detect(df)[0] == []


@pytest.mark.parametrize("scale", SCALES)
def test_kl_spike_needs_the_fall_back(scale):
    df = clean()
    df["kl_divergence"] *= scale
    df.loc[df["step"] == AT, "kl_divergence"] = 15.0 * scale  # one batch far out, then back
    relative = lambda frame: {a.name: a.step for a in detect(frame)[0] if a.name != "kl_blowup"}  # noqa: E731
    assert relative(df) == {"kl_spike": AT + 1}
    step_up = clean()
    step_up["kl_divergence"] *= scale
    step_up.loc[rows_from(step_up, AT), "kl_divergence"] *= 6  # a new level, not a spike
    assert "kl_spike" not in relative(step_up)


def test_few_rows_constant_or_zero_kl_give_skip_lines():
    few = clean().iloc[:6]
    alarms, skipped = detect(few)
    assert alarms == [] and "kl_spike skipped: the log has 6 rows, it needs >= 12" in skipped
    assert "entropy_collapse skipped: the log has 6 rows, it needs >= 10" in skipped
    for value in (0.0, 0.3):
        flat = clean().assign(kl_divergence=value)
        alarms, skipped = detect(flat)
        assert alarms == [], alarms
        assert {f"kl_spike skipped: kl_divergence is constant ({value:g})",
                f"kl_growth skipped: kl_divergence is constant ({value:g})"} <= set(skipped)


def test_kl_spike_on_real_rising_kl():
    """The first 20 updates of two real runs (the 2026-12-05 algorithms sweep): RLOO seed 1 while KL
    still rises (2.58 against a window median near 0.5 but a level near 1.3) is no spike; CISPO seed
    1's single batch at 10.7 nats against a level near 1.4 is, confirmed at the next update."""
    rloo = [0.0, 0.11, 0.19, 0.25, 0.38, 0.6, 0.68, 0.42, 0.6, 1.34, 1.41, 2.58, 1.25, 2.52, 1.19, 0.99, 1.38,
            1.57, 0.93, 1.53]
    cispo = [0.0, 0.28, 0.68, 1.94, 0.63, 0.54, 0.78, 0.84, 1.42, 2.89, 10.71, 1.15, 0.58, 0.82, 1.51, 1.96,
             1.14, 1.35, 1.55, 1.64]
    for kl, expected in ((rloo, []), (cispo, [("kl_spike", 12)])):
        df = pd.DataFrame({"step": np.arange(1, 21), "policy_loss": 0.0, "reward_score": 0.0, "kl_divergence": kl})
        assert [(a.name, a.step) for a in detect(df)[0]] == expected


def test_evaluation_points_feed_the_length_rules_for_a_stage_that_does_not_sample():
    """An offline stage's log has no lengths; its eval.csv points do (the same prompts each time, the
    first at the start policy): lengths doubling from the fourth point fire length_drift where the
    3-point mean passes x1.5, (1 + 2 + 2) / 3, and steady lengths fire nothing."""
    from analysis.alarms import EVAL_WINDOW, detect_eval

    assert EVAL_WINDOW == 5
    steps = np.arange(8) * 10
    grow = pd.DataFrame({"step": steps, "kl": np.linspace(0, 3, 8), "reward": np.nan,
                         "response_length": 9.0 * np.array([1, 1, 1, 2, 2, 2, 2, 2])})
    alarms, skipped = detect_eval(grow)
    assert [(a.name, a.step) for a in alarms] == [("length_drift", 50)]
    assert "over 5 evaluations" in alarms[0].message and alarms[0].message.startswith("held-out evaluations")
    assert skipped == ["length_hacking (held-out evaluations) skipped: reward column is empty"]
    # With a proxy that rises with the length, length_hacking fires too.
    hacked = grow.assign(reward=grow["response_length"] / 9.0 + 0.01 * np.arange(8))
    assert {a.name for a in detect_eval(hacked)[0]} == {"length_drift", "length_hacking"}
    assert detect_eval(grow.assign(response_length=9.0)) == ([], ["length_hacking (held-out evaluations) skipped: "
                                                                  "reward column is empty"])
    # Started away from the reference (ORPO, from the base model): no start to compare with.
    alarms, skipped = detect_eval(grow.assign(kl=60.0 - grow["kl"]))
    assert alarms == [] and len(skipped) == 2 and all("nats from the reference" in s for s in skipped)
