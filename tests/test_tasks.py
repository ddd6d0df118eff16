"""Tasks beyond the default dialogues: verifiable arithmetic (verifier, held-out problems, accuracy,
pass@k) and the length trap (labels that favour longer responses)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from rlhf.data.arithmetic import Arithmetic, correct, evaluate, extract_answer, problem_of, verify
from rlhf.data.length_trap import LengthTrap
from rlhf.data.synthetic import SyntheticPreferences, _words, gold_reward
from rlhf.evaluation.metrics import pass_at_k

ROOT = Path(__file__).resolve().parents[1]


# ----- pass@k -----

def _pass_at_k_by_counting(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c correct) holding at least one correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 1, 1), (8, 3, 4), (8, 5, 8), (6, 2, 3), (8, 8, 4), (5, 1, 5)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_counting(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_share_correct_and_bad_arguments_are_refused():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(4, 5, 1), (4, 2, 5), (4, 2, 0), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


# ----- arithmetic -----

def test_expressions_follow_precedence_and_answers_are_the_last_number():
    assert evaluate("2 + 3 * 4 - 5") == 9
    assert evaluate("7 - 2 - 1") == 4
    assert evaluate("3 * 4 * 2 + 1") == 25
    assert evaluate("10 - 4 * 3") == -2
    assert extract_answer(" 3 + 4 = 7") == 7
    assert extract_answer(" the answer is -12.") == -12
    assert extract_answer(" 1,024") == 1024
    assert extract_answer(" none") is None
    prompt = "\n\nHuman: What is 9 * 9?\n\nAssistant: 81\n\nHuman: And 6 - 8?\n\nAssistant:"
    assert problem_of(prompt) == "6 - 8"  # the last human turn's problem, not an earlier one
    assert verify(prompt, " -2") and not verify(prompt, " 81") and not verify(prompt, " ")
    assert correct([prompt, prompt], [" 6 - 8 = -2", " 2"]) == [1.0, 0.0]
    assert not verify("\n\nHuman: hello\n\nAssistant:", " 3")


@pytest.mark.parametrize("settings", [{}, {"digits": 2, "operators": 2, "answer_style": "worked"}])
def test_held_out_problems_never_occur_in_training_and_labels_are_the_verifier(settings):
    task = Arithmetic(n_pairs=600, seed=3, **settings)
    splits = task.load()
    train = {problem_of(p.prompt) for p in splits.train}
    val = {problem_of(p.prompt) for p in splits.val}
    assert train and val and not train & val
    assert len({p.prompt for p in splits.val}) == len(splits.val)  # held-out prompts do not repeat
    for p in splits.train + splits.val:
        assert p.prompt.endswith("\n\nAssistant:")
        assert verify(p.prompt, p.chosen) and not verify(p.prompt, p.rejected)
        assert task.gold(p.prompt, p.chosen) == 1.0 and task.gold(p.prompt, p.rejected) == 0.0
        if settings.get("answer_style") == "worked":
            assert p.chosen.startswith(" " + problem_of(p.prompt) + " = ")
    assert Arithmetic(n_pairs=600, seed=3, **settings).load() == splits  # the seed decides everything
    assert Arithmetic(n_pairs=600, seed=4, **settings).load().train != splits.train


def test_mixed_style_restates_half_the_answers_where_the_verifier_reads_the_wrong_number():
    task = Arithmetic(n_pairs=600, seed=3, answer_style="mixed")
    splits = task.load()
    restated = 0
    for p in splits.train + splits.val:
        problem, answer = problem_of(p.prompt), evaluate(problem_of(p.prompt))
        wrong = int(p.rejected.split(",")[0])
        assert wrong != answer
        if p.chosen == f" {answer}":  # direct: the verifier's labels
            assert p.rejected == f" {wrong}" and verify(p.prompt, p.chosen) and not verify(p.prompt, p.rejected)
            continue
        restated += 1
        assert p.chosen == f" {answer}, from {problem}" and p.rejected == f" {wrong}, from {problem}"
        last_operand = int(problem.split()[-1])
        assert verify(p.prompt, p.chosen) == (last_operand == answer)  # the last number is the problem's
    assert 0.4 < restated / len(splits.train + splits.val) < 0.6


@pytest.mark.parametrize("bad,match", [({"digits": 0}, "digits"), ({"ops": "+/"}, "ops"),
                                       ({"answer_style": "essay"}, "answer_style"), ({"val_fraction": 0}, "val_fraction")])
def test_bad_arithmetic_settings_are_one_line_errors_before_any_model(tmp_path, bad, match):
    key, value = next(iter(bad.items()))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "data=arithmetic", f"data.{key}={value}", "algo=grpo",
                           f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: data (rlhf.data.arithmetic.Arithmetic):") and match in lines[-1]
    assert "Traceback" not in proc.stderr and not run.exists()


def test_arithmetic_grpo_uses_the_verifier_and_reports_accuracy_and_pass_at_k(tmp_path, compose_cfg):
    from rlhf.training.pipeline import train

    cfg = compose_cfg(tmp_path / "run", "data=arithmetic", "algo=grpo", "debug=fast", "eval.num_samples=4",
                      "eval.pass_k=[1,4]", "eval.eval_every=2", "grpo.max_steps=2")
    summary = train(cfg)
    assert summary["plan"] == ["sft", "grpo"]  # the verifier is the reward: no reward model is trained
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["pass_at_k"]) == {"before", "after"}
    for when in ("before", "after"):
        assert [int(k) for k in summary["pass_at_k"][when]] == [1, 4]
        p1, p4 = summary["pass_at_k"][when][1], summary["pass_at_k"][when][4]
        assert 0.0 <= p1 <= p4 <= 1.0
    eval_csv = (tmp_path / "run" / "grpo" / "eval.csv").read_text().splitlines()
    assert eval_csv[0].split(",")[-1] == "accuracy" and len(eval_csv) == 3  # updates 0 and 2
    assert all(row.split(",")[-1] != "" for row in eval_csv[1:])
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "fn: rlhf.data.arithmetic.correct" in saved


def test_a_users_reward_or_reward_model_replaces_the_verifier(tmp_path, compose_cfg):
    from rlhf.training.plan import apply_task_reward, plan_stages

    cfg = compose_cfg(tmp_path / "a", "data=arithmetic", "algo=grpo", "reward.fn=my_module.my_verifier")
    apply_task_reward(cfg)
    assert cfg.reward.fn == "my_module.my_verifier"
    cfg = compose_cfg(tmp_path / "b", "data=arithmetic", "algo=grpo", "reward.model_path=/some/rm")
    apply_task_reward(cfg)
    assert cfg.reward.fn is None and plan_stages(cfg) == ["sft", "grpo"]
    cfg = compose_cfg(tmp_path / "c", "algo=grpo")  # the default task has no verifier: a reward model is trained
    apply_task_reward(cfg)
    assert cfg.reward.fn is None and plan_stages(cfg) == ["sft", "rm", "grpo"]


def test_bad_eval_sampling_settings_are_refused(tmp_path, compose_cfg):
    from rlhf.errors import ConfigError
    from rlhf.training.plan import check_eval

    for override, match in [("eval.num_samples=0", "num_samples"), ("eval.temperature=-1", "temperature"),
                            ("eval.pass_k=[1,16]", "pass_k")]:
        with pytest.raises(ConfigError, match=match):
            check_eval(compose_cfg(tmp_path, override))


# ----- length trap -----

def test_length_trap_labels_favour_longer_responses_and_the_default_task_does_not():
    plain = SyntheticPreferences(n_pairs=2000, seed=5).load().train
    source = LengthTrap(n_pairs=2000, seed=5)
    trap = source.load().train

    def shares(pairs, gold):
        longer = sum(len(_words(p.chosen)) > len(_words(p.rejected)) for p in pairs) / len(pairs)
        agree = sum(gold(p.prompt, p.chosen) > gold(p.prompt, p.rejected) for p in pairs) / len(pairs)
        return longer, agree

    plain_longer, plain_gold = shares(plain, gold_reward)
    trap_longer, trap_gold = shares(trap, source.gold)
    assert plain_gold == 1.0 and plain_longer < 0.5  # the gold's repeat penalty makes longer worse, if anything
    assert trap_longer > plain_longer + 0.2 and 0.6 < trap_gold < 0.9
    assert LengthTrap(n_pairs=2000, seed=5, length_bias=0.0).load().train != trap
    # With no bias the labels are the task's gold again.
    unbiased_source = LengthTrap(n_pairs=500, seed=5, length_bias=0.0)
    unbiased = unbiased_source.load().train
    assert all(unbiased_source.gold(p.prompt, p.chosen) > unbiased_source.gold(p.prompt, p.rejected) for p in unbiased)


def test_length_trap_gold_charges_its_repeat_penalty_per_repeated_word():
    prompt = "\n\nHuman: Any tips on cooking?\n\nAssistant:"
    fresh, padded = " recipe oven salt", " recipe oven salt recipe oven salt"
    trap = LengthTrap()
    assert trap.gold(prompt, fresh) == gold_reward(prompt, fresh) == 0.5  # no repeats: the synthetic gold
    # Three repeats of six words: each repeated on-topic word nets 0.5 - repeat_penalty.
    assert trap.gold(prompt, padded) == pytest.approx(0.5 - trap.repeat_penalty * 3 / 6)
    assert trap.gold(prompt, padded) < gold_reward(prompt, padded) == pytest.approx(0.25)
    assert LengthTrap(repeat_penalty=0.5).gold(prompt, padded) == gold_reward(prompt, padded)


def test_length_trap_refuses_bad_settings():
    with pytest.raises(ValueError, match="length_bias"):
        LengthTrap(length_bias=1.5)
    with pytest.raises(ValueError, match="min_words"):
        LengthTrap(min_words=5, max_words=3)
    with pytest.raises(ValueError, match="repeat_penalty"):
        LengthTrap(repeat_penalty=-1.0)


# ----- every task config -----

TASKS = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml") if p.stem != "hh_rlhf")  # hh: a file or the hub
# Tasks read from a file or the hub are tested on the small file the repository ships in their format.
SETTINGS = {"gsm8k": ["data.data_files=tests/data/gsm8k_sample.jsonl"]}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_loads_held_out_prompts_apart_from_training(task, compose_cfg, tmp_path):
    from hydra.utils import instantiate

    from rlhf.data.pairs import ASSISTANT, prompt_overlap

    cfg = compose_cfg(tmp_path, f"data={task}", *SETTINGS.get(task, ["data.n_pairs=400"]))
    source = instantiate(cfg.data)
    splits = source.load()
    assert splits.train and splits.val and prompt_overlap(splits)["eval_prompts_in_train"] == 0
    assert all(p.prompt.endswith(ASSISTANT) for p in splits.train + splits.val)
    gold = getattr(source, "gold", None)
    assert gold is not None  # every shipped task knows its ground truth
    if getattr(source, "verify", None) is not None:
        assert all(source.verify(p.prompt, p.chosen) for p in splits.val)


@pytest.mark.slow
def test_a_reward_model_trained_on_the_length_trap_prefers_longer_responses(tmp_path, compose_cfg):
    """The trap's mechanism: its labels teach a reward model a length preference the gold does not have.
    On held-out pairs where the gold prefers the SHORTER response, a reward model trained on the trap's
    labels picks the longer one far more often than one trained, the same way, on the default task's."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.reward import reward_scores
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.training.pipeline import train

    source = LengthTrap(n_pairs=2000, seed=42)
    held_out = source.load().val
    pairs = [(p.prompt, long, short) for p in held_out
             for long, short in [sorted((p.chosen, p.rejected), key=lambda r: -len(_words(r)))]
             if len(_words(long)) > len(_words(short)) and source.gold(p.prompt, short) > source.gold(p.prompt, long)]
    assert len(pairs) >= 20
    prefers_longer = {}
    for task in ("synthetic", "length_trap"):
        cfg = compose_cfg(tmp_path / task, f"data={task}", "stage=rm", "algo=rm", "data.n_pairs=2000",
                          "rm.max_steps=150", "rm.val_every=150", "seed=42")
        train(cfg)
        model_dir = tmp_path / task / "rm" / "model"
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        tok = load_tokenizer(str(model_dir))

        def scores(texts):
            enc = tok(texts, return_tensors="pt", padding=True)
            with torch.no_grad():
                return reward_scores(model, enc.input_ids, enc.attention_mask)

        longer = scores([p + long for p, long, _ in pairs])
        shorter = scores([p + short for p, _, short in pairs])
        prefers_longer[task] = (longer > shorter).float().mean().item()
    assert prefers_longer["synthetic"] < 0.35, prefers_longer  # the gold's labels: the shorter, better one
    assert prefers_longer["length_trap"] > prefers_longer["synthetic"] + 0.2, prefers_longer


@pytest.mark.slow
def test_ppo_on_the_length_trap_over_optimises_and_the_diagnostics_say_so(tmp_path, compose_cfg):
    """The trap's own settings (`python train.py data=length_trap`, SFT -> RM -> PPO, about 4 minutes):
    the proxy keeps rising while the gold rises, peaks and falls below its best, `length_hacking`
    fires during training, and the over-optimisation fit over eval.csv finds the run past the peak."""
    import pandas as pd

    from analysis.overoptimisation import analyse
    from rlhf.training.pipeline import train

    summary = train(compose_cfg(tmp_path, "data=length_trap", "seed=42"))
    ev = pd.read_csv(tmp_path / "ppo" / "eval.csv")
    best = int(ev["gold"].idxmax())
    assert ev["reward"].iloc[-1] > ev["reward"].iloc[best] > ev["reward"].iloc[0]  # the proxy climbs on
    assert ev["gold"].iloc[best] > ev["gold"].iloc[0] + 0.05  # the gold rose first ...
    assert 0 < best < len(ev) - 3 and ev["gold"].iloc[-3:].mean() < ev["gold"].iloc[best] - 0.05  # ... then fell
    assert ev["response_length"].iloc[-1] > 1.5 * ev["response_length"].iloc[0]
    assert "length_hacking" in {a["name"] for a in summary["alarms"]}, summary["alarms"]
    fit = analyse(ev)
    assert fit["alpha"] is not None and fit["past_peak"], fit  # enough points for the fit, and past the peak


@pytest.mark.slow
def test_grpo_on_arithmetic_learns_the_verifiable_answer_from_the_verifier_alone(tmp_path, compose_cfg):
    """Arithmetic's learning check (`python train.py data=arithmetic data.answer_style=mixed algo=grpo`,
    SFT -> GRPO, a few minutes): half the SFT demonstrations restate the problem after the answer, which
    the verifier (the only reward: no reward model is trained) marks wrong. What held on every seed
    measured (docs/tasks.md): the responses shorten to the verifiable form and the sampled accuracy on the
    held-out problems, pass@1, rises; the training reward rises with it."""
    import pandas as pd

    from rlhf.training.pipeline import train

    summary = train(compose_cfg(tmp_path, "data=arithmetic", "data.answer_style=mixed", "algo=grpo", "seed=42"))
    assert summary["plan"] == ["sft", "grpo"]
    before, after = summary["pass_at_k"]["before"], summary["pass_at_k"]["after"]
    assert after[1] >= before[1] + 0.05, summary["pass_at_k"]
    ev = pd.read_csv(tmp_path / "grpo" / "eval.csv")
    assert ev["response_length"].iloc[-1] < 0.6 * ev["response_length"].iloc[0], ev
    log = pd.read_csv(tmp_path / "grpo" / "metrics.csv")
    assert log["reward_score"].tail(10).mean() > log["reward_score"].head(10).mean() + 0.05, log["reward_score"]
