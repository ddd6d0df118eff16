"""`python -m rlhf.evaluation` on a real (tiny) run, its metric functions, and the model cards."""
import json
import math
import subprocess
import sys

import pytest
import yaml

from conftest import compose_train
from rlhf.evaluation import evaluate as ev
from rlhf.deploy.model_card import front_matter, write_model_card

# debug=fast, trimmed further: the run only has to exist, not to learn.
FAST_RUN = ["debug=fast", "sft.batch_size=4", "sft.val_batches=1", "rm.batch_size=8", "rm.val_batches=1",
            "rm.normalize_samples=64", "ppo.max_steps=1", "ppo.num_ppo_epochs=1", "ppo.response_length=8",
            "ppo.eval_prompts=8"]
PAIRED = ("reward", "gold", "length", "distinct_1", "distinct_2")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf.evaluation", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def run(module_tmp):
    from rlhf.training.pipeline import train

    run = module_tmp / "run"
    train(compose_train(run, *FAST_RUN))
    return run


# ----- metric functions on hand examples -----

def test_distinct_n_hand_examples():
    assert ev.distinct_n(["a b c", "d e"], 1) == 1.0
    assert ev.distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    # bigrams: (a,b) (b,a) (a,b) | (a,b) -> 2 unique of 4; n-grams never cross texts
    assert ev.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert ev.distinct_n(["x y", "y x"], 2) == 1.0
    assert ev.distinct_n(["the cat", "the dog"], 1) == pytest.approx(3 / 4)
    assert ev.distinct_n(["one", ""], 2) == 0.0  # no bigrams at all
    assert ev.distinct_n([], 1) == 0.0
    assert ev.distinct_n(["ab", "ab"], 1, tokenize=list) == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        ev.distinct_n(["a"], 0)


def test_win_rate_counts_ties_half():
    assert ev.win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    assert ev.win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0
    assert ev.win_rate([0.3, 0.3], [0.3, 0.3]) == 0.5
    assert math.isnan(ev.win_rate([], []))


# ----- the CLI on a run -----

def test_cli_writes_eval_json_table_and_card(run):
    res = cli(run, "--prompts", 16)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for label in ("reward-model score", "gold score", "distinct-1", "distinct-2", "win rate vs SFT (reward model)",
                  "win rate vs SFT (gold)", "KL to SFT"):
        assert label in out, out
    assert "error" not in res.stderr.lower()

    result = json.loads((run / "eval.json").read_text())
    assert result["prompts"] == 16 and result["seed"] == 0 and result["split"] == "val"
    assert result["max_new_tokens"] == 8 and result["temperature"] == 1.0  # the run's algo settings
    keys = {f"{m}_{who}" for m in PAIRED for who in ("policy", "sft")} | {"rm_win_rate", "gold_win_rate", "kl_to_sft"}
    assert keys <= set(result), keys - set(result)
    for k in keys:
        assert isinstance(result[k], float) and math.isfinite(result[k]), (k, result[k])
    for k in ("rm_win_rate", "gold_win_rate", "distinct_1_policy", "distinct_1_sft", "distinct_2_policy",
              "distinct_2_sft"):
        assert 0.0 <= result[k] <= 1.0, (k, result[k])
    assert 0 < result["length_policy"] <= 8 and 0 < result["length_sft"] <= 8
    assert result["samples"] and set(result["samples"][0]) == {"prompt", "policy", "sft"}

    # Every row of the printed table is aligned: the numbers end in the same column.
    rows = [line for line in out.splitlines() if line.startswith(("reward-model", "gold score", "distinct-"))]
    assert len({len(r) for r in rows}) == 1, rows

    card = (run / "ppo" / "model" / "README.md").read_text()
    assert "## Evaluation" in card and f"{result['kl_to_sft']:.4g}" in card


def test_kl_is_zero_when_policy_is_the_reference(run):
    from rlhf.deploy.runs import RunArtifacts

    art = RunArtifacts(run)
    same_as_ref = art._causal_lm(art.reference_dir)  # a separate copy of the SFT weights, not the same object
    assert same_as_ref is not art.reference
    result = ev.evaluate_run(run, prompts=8, seed=3, artifacts=art, policy=same_as_ref)
    assert abs(result["kl_to_sft"]) < 1e-4
    # Same weights + same seed: the same samples, so every comparison is a tie.
    assert result["rm_win_rate"] == 0.5 and result["gold_win_rate"] == 0.5
    assert result["reward_policy"] == pytest.approx(result["reward_sft"])
    assert result["distinct_1_policy"] == result["distinct_1_sft"]


def test_no_gold_keys_without_a_gold_function(run, monkeypatch):
    real = ev.held_out
    monkeypatch.setattr(ev, "held_out", lambda cfg, n: (real(cfg, n)[0], None, "HHRLHF"))
    result = ev.evaluate_run(run, prompts=4)
    assert not any(k.startswith("gold") for k in result)
    assert "gold" not in ev.format_table(result)


def test_missing_run_dir_is_one_error_line(tmp_path):
    res = cli(tmp_path / "nope")
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_export_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert ev.main([str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "export" in err and len(err.strip().splitlines()) == 1, err


def test_stage_flag_picks_the_policy_and_names_the_choices(run, capsys):
    from rlhf.deploy.runs import RunArtifacts

    assert RunArtifacts(run).stage == "ppo" and RunArtifacts(run, stage="sft").policy_dir == run / "sft" / "model"
    assert ev.main([str(run), "--stage", "rm", "--no-card"]) == 1  # a reward model is no policy
    err = capsys.readouterr().err
    assert err.startswith("error: --stage rm: not a stage that produces a policy (one of sft, ")
    assert ev.main([str(run), "--stage", "grpo", "--no-card"]) == 1  # this run has no grpo stage
    assert "no policy export found (looked for grpo/model)" in capsys.readouterr().err


# ----- model cards -----

def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_has_stage_hyperparameters_and_metrics(tmp_path):
    config = {"seed": 7, "model": {"name": "gpt2", "name_or_path": "gpt2"},
              "data": {"_target_": "rlhf.data.HHRLHF", "path": "Anthropic/hh-rlhf", "max_pairs": 500},
              "algo": "ppo", "plan": ["sft", "rm", "ppo"],
              "ppo": {"lr": 3e-5, "kl_coef": 0.07, "batch_size": 16,
                      "response_length": 64, "temperature": 0.7, "eval_prompts": 200},
              "trainer": {"precision": "bf16-mixed"}}
    metrics = {"reward_after": 1.25, "kl_final": 3.5, "model_dir": "/x/ppo/model", "samples": [{"a": 1}]}
    evaluation = {"prompts": 16, "reward_policy": 0.8125, "reward_sft": 0.125, "rm_win_rate": 0.6875,
                  "kl_to_sft": 2.5}
    path = write_model_card(tmp_path / "m", "ppo", config, metrics, evaluation)
    assert path == tmp_path / "m" / "README.md"
    text = path.read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers" and meta["tags"] == ["rlhf", "ppo"]
    assert meta["base_model"] == "gpt2" and meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert "`ppo`" in text and "**Seed:** 7" in text
    assert text.splitlines()[text.splitlines().index("---", 1) + 2].startswith("# PPO policy")  # title from the registry
    assert "(sft -> rm -> ppo)" in text and "Huang et al. 2024" in text  # the run's plan; the stage's paper
    for row in ("| lr | 3e-05 |", "| kl_coef | 0.07 |", "| batch_size | 16 |", "| temperature | 0.7 |",
                "| precision | bf16-mixed |", "| reward_after | 1.25 |", "| kl_final | 3.5 |",
                "| reward-model score (mean) | 0.8125 | 0.125 |", "| win rate vs SFT (reward model) | 0.6875 |  |"):
        assert row in text, row
    assert "eval_prompts" not in text and "model_dir" not in text  # bookkeeping, not hyperparameters/metrics
    assert "AutoModelForCausalLM.from_pretrained" in text and "temperature=0.7" in text


def test_model_card_never_fails_on_missing_keys(tmp_path):
    for stage, config in (("sft", {}), ("rm", None), ("ppo", {"model": None, "data": {}, "ppo": "?"}),
                          ("grpo", {"reward": None}), ("nonesuch", {})):
        text = write_model_card(tmp_path / stage, stage, config, None).read_text()
        meta = _front_matter(text)
        assert meta["tags"] == ["rlhf", stage] and "base_model" not in meta and "datasets" not in meta
        assert "## How to load it" in text
    rm = (tmp_path / "rm" / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in rm and _front_matter(rm)["pipeline_tag"] == "text-classification"
    # synthetic data and a from-scratch model: no Hub dataset or base model to name; local paths stay in the body
    assert "datasets" not in front_matter("sft", {"data": {"_target_": "rlhf.data.SyntheticPreferences"}})
    assert "base_model" not in front_matter("sft", {"model": {"name_or_path": "/models/gpt2"}})


def test_model_card_loads_with_huggingface_hub(tmp_path):
    """The card as the Hub's own client reads it (no network: a local file, not validated against the Hub)."""
    from huggingface_hub import ModelCard

    config = {"seed": 3, "license": "mit", "model": {"name": "gpt2", "name_or_path": "gpt2"},
              "data": {"_target_": "rlhf.data.HHRLHF", "path": "Anthropic/hh-rlhf"}, "dpo": {"beta": 0.1}}
    path = write_model_card(tmp_path / "dpo", "dpo", config, {"reward_margin": 0.5}, {"rm_win_rate": 0.75})
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.base_model == "gpt2" and data.tags == ["rlhf", "dpo"]
    assert data.pipeline_tag == "text-generation" and data.datasets == ["Anthropic/hh-rlhf"]
    assert data.language == "en" and data.license == "mit" and data.eval_results is None  # metrics: in the body
    for part in ("`dpo` stage", "## How it was made", "**Seed:** 3", "### Hyperparameters", "| beta | 0.1 |",
                 "## Metrics (from the run)", "| reward_margin | 0.5 |", "## Evaluation",
                 "| win rate vs SFT (reward model) | 0.75 |  |", "## How to load it", "AutoModelForCausalLM"):
        assert part in card.text, part
    # Keys missing: a card the client still loads, saying less.
    for stage, config in (("rm", None), ("sft", {"model": "?", "data": {}, "sft": None}), ("nonesuch", {})):
        card = ModelCard.load(write_model_card(tmp_path / stage, stage, config, None))
        assert card.data.library_name == "transformers" and card.data.tags == ["rlhf", stage]
        assert card.data.base_model is None and card.data.datasets is None and card.data.license is None
        assert "## Metrics (from the run)" in card.text and "## How to load it" in card.text
    assert ModelCard.load(tmp_path / "rm" / "README.md").data.pipeline_tag == "text-classification"
