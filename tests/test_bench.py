"""`python -m rlhf.bench`: the model-FLOP count, and the command's JSON lines on a tiny shape
(ours only; the TRL comparison when the optional `.[bench]` extra is installed)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.bench.common import Shape, body_params, grpo_flops_per_episode, ppo_flops_per_episode, rm_flops_per_pair
from rlhf.bench.scaling import exponent
from rlhf.models.causal_lm import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "small", "--precision", "fp32", "--layers", "1", "--dim", "32", "--heads", "2", "--vocab", "50257", "--batch", "4", "--episodes", "8",
        "--warmup", "1", "--response-length", "4", "--rounds", "1"]


def test_flops_by_hand():
    # 1 layer, d=2: the block's matmul weights are qkv 2x6, proj 2x2, fc 2x8, mlp proj 8x2 = 48 = 12*d^2.
    assert body_params(1, 2) == 2 * 6 + 2 * 2 + 2 * 8 + 8 * 2 == 48
    s = Shape(layers=1, dim=2, heads=1, vocab=10, batch=1, prompt_length=3, response_length=2, ppo_epochs=1)
    T, R, body, head = 5, 2, 48, 20
    gen = 2 * (body * T + head * R)  # 2 FLOPs per weight per token; LM head on the 2 response positions
    ref = 2 * (body * T + head * R)
    value = reward = 2 * body * T
    train = 6 * (body * T + head * R) + 6 * body * T  # policy + value model, forward + backward
    assert gen + ref + value + reward + train == 2 * (240 + 40) * 2 + 2 * 240 * 2 + 6 * 280 + 6 * 240
    assert ppo_flops_per_episode(s) == gen + ref + value + reward + train == 5200
    assert ppo_flops_per_episode(Shape(**{**s.__dict__, "ppo_epochs": 4})) == 5200 + 3 * train
    assert rm_flops_per_pair(s, 10) == 6 * 48 * 10


def test_grpo_flops_by_hand():
    s = Shape(layers=1, dim=2, heads=1, vocab=10, batch=4, prompt_length=3, response_length=2, num_iterations=1)
    T, R, body, head = 5, 2, 48, 20
    policy_fwd = 2 * (body * T + head * R)  # generation, and the reference (beta > 0)
    reward = 2 * body * T
    train = 6 * (body * T + head * R)  # policy only: GRPO has no value model
    assert grpo_flops_per_episode(s) == 2 * policy_fwd + reward + train
    assert grpo_flops_per_episode(Shape(**{**s.__dict__, "num_iterations": 3})) == 2 * policy_fwd + reward + 3 * train
    assert grpo_flops_per_episode(Shape(**{**s.__dict__, "beta": 0.0})) == policy_fwd + reward + train


def test_scaling_exponent_recovers_known_powers():
    # seconds per episode = c_B * R^1.5 * B^-0.5: one slope per axis, whatever each group's constant.
    rows = [{"batch": b, "response_length": r, "training": 0.01 * (1 + b % 3) * r**1.5 * b**-0.5}
            for b in (8, 16, 32) for r in (32, 64, 128, 256)]
    assert exponent(rows, "training", "response_length", "batch") == pytest.approx(1.5, abs=1e-9)
    rows = [{**r, "training": r["training"] / (1 + r["batch"] % 3)} for r in rows]  # constant per R for the B slope
    assert exponent(rows, "training", "batch", "response_length") == pytest.approx(-0.5, abs=1e-9)
    assert exponent(rows[:1], "training", "batch", "response_length") is None  # one point: no slope


def _bench(*args: str, timeout: int = 300) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "rlhf.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _check_measurement(line: dict, kind: str, impl: str) -> None:
    unit = "pairs_per_s" if kind == "rm" else "episodes_per_s"
    assert line["kind"] == kind and line["impl"] == impl
    assert line["shape"].startswith("L1-d32-h2-V50257-B4-P")
    for key in (unit, "peak_rss_mb", "mfu", "peak_tflops", "threads"):
        assert line[key] > 0, key
    assert line["precision"] == "fp32"
    assert line["weights_changed"] is True
    assert all(v >= 0 for k, v in line["seconds"].items() if k != "other")
    if kind != "rm":
        assert {"generation", "scoring", "training"} <= set(line["seconds"])
        assert line["seconds"]["training"] > 0 and line["seconds"]["generation"] > 0


def test_bench_ours_json_lines():
    lines = _bench("--kind", "ppo,rm", *TINY)
    assert [(x["kind"], x["impl"]) for x in lines] == [("ppo", "ours"), ("rm", "ours")]
    for line in lines:
        _check_measurement(line, line["kind"], "ours")


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed (pip install -e '.[bench]')")
def test_bench_vs_trl_comparison_lines():
    lines = _bench("--kind", "ppo,rm", "--vs-trl", "--trl-precision", "fp32", *TINY, timeout=600)
    comparisons = [x for x in lines if "ratio" in x]
    assert [x["kind"] for x in comparisons] == ["ppo", "rm"]
    for x in comparisons:
        for key in ("ours", "trl", "ratio", "ours_peak_rss_mb", "trl_peak_rss_mb", "mfu"):
            assert x[key] > 0, key
        assert x["ratio"] == pytest.approx(x["ours"] / x["trl"], rel=1e-2)
        assert x["shape"].startswith("L1-d32")
    for line in lines:
        if "impl" in line:
            _check_measurement(line, line["kind"], line["impl"])  # includes: TRL's weights really changed


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed (pip install -e '.[bench]')")
def test_bench_grpo_vs_trl_comparison_line():
    lines = _bench("--algo", "grpo", "--vs-trl", "--trl-precision", "fp32", *TINY, timeout=600)
    assert [(x["kind"], x.get("impl")) for x in lines] == [("grpo", "ours"), ("grpo", "trl"), ("grpo", None)]
    ours, trl, cmp = lines
    for line in (ours, trl):
        _check_measurement(line, "grpo", line["impl"])  # both sides' policies really changed
        assert line["shape"].endswith("-G4-I2-M1")
    assert trl["config"]["reference_model"] is True and trl["config"]["loss_type"] == "grpo"
    assert ours["config"]["shared_prefix"] is True  # each group's prompt once (`--shared-prefix`, default on)
    assert cmp["ratio"] == pytest.approx(cmp["ours"] / cmp["trl"], rel=1e-2)


def test_scaling_sweep_writes_table_figure_and_fits(tmp_path):
    lines = _bench("--scaling", str(tmp_path), "--kind", "ppo", "--response-lengths", "2,4", "--batches", "2,4",
                   "--precision", "fp32", "--layers", "1", "--dim", "32", "--heads", "2", "--episodes", "8",
                   "--warmup", "1", "--rounds", "1")
    points = [x for x in lines if "sweep" in x]
    assert sorted((x["sweep"]["batch"], x["sweep"]["response_length"]) for x in points) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    assert all(x["weights_changed"] for x in points)
    fit = json.loads((tmp_path / "scaling.json").read_text())
    assert len(fit["points"]) == 4
    for phase in ("generation", "scoring", "training", "total"):
        assert isinstance(fit["exponents"][phase]["response_length"], float)
        assert isinstance(fit["exponents"][phase]["batch"], float)
    table = (tmp_path / "scaling.md").read_text()
    assert "| 4 | 4 |" in table and "vs response length" in table
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert (tmp_path / "scaling.csv").read_text().startswith("batch,response_length,episodes_per_s")


def test_bench_refuses_bad_sweeps():
    for args, msg in ((["--kind", "rm"], "--kind ppo or --kind grpo"), (["--batches", "0"], "positive"),
                      (["--kind", "grpo", "--batches", "6"], "groups of 4"), (["--vs-trl"], "ours only")):
        proc = subprocess.run([sys.executable, "-m", "rlhf.bench", "--scaling", "x", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr[-500:])


def test_bench_refuses_prompts_longer_than_the_synthetic_data():
    # It used to keep doubling its candidates, looking for 256-token synthetic prompts (at most ~40).
    proc = subprocess.run([sys.executable, "-m", "rlhf.bench", "--kind", "grpo", "--prompt-length", "256", *TINY],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--prompt-length 256" in proc.stderr and "longest" in proc.stderr, proc.stderr[-500:]


def test_decode_benchmark_json_lines():
    lines = _bench("--kind", "generate", "--preset", "small", "--layers", "1", "--dim", "32", "--heads", "2",
                   "--batches", "1,2", "--response-lengths", "4", "--prompt-length", "8", "--precision", "fp32",
                   "--rounds", "1")
    steps = [x for x in lines if "impl" in x]
    assert [(x["impl"], x["batch"]) for x in steps] == [("ours", 1), ("transformers", 1), ("ours", 2), ("transformers", 2)]
    for x in steps:
        assert x["kind"] == "generate" and x["ms_per_step"] > 0 and x["bandwidth_gbs"] > 0
        assert 0 < x["mbu"] and x["response_length"] == 4 and x["prompt_length"] == 8 and x["device"] == "cpu"
    # ours decodes with the attention kernel the project loads policies with, not transformers' default
    assert {x["impl"]: x["attention"] for x in steps} == {"ours": ModelConfig().attention, "transformers": "sdpa"}
    # bytes a step reads: the weights (tied embeddings once) plus the KV cache, which grows with the batch
    assert steps[2]["bytes_per_step"] > steps[0]["bytes_per_step"]
    ratios = [x for x in lines if "ratio" in x]
    assert len(ratios) == 2 and all(r["ratio"] == pytest.approx(r["transformers_ms"] / r["ours_ms"], rel=1e-2)
                                    for r in ratios)


def test_decode_benchmark_refuses_bad_settings():
    for args, msg in ((["--response-lengths", "1"], ">= 2"), (["--vs-trl"], "no --vs-trl")):
        proc = subprocess.run([sys.executable, "-m", "rlhf.bench", "--kind", "generate", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr[-500:])
