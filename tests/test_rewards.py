"""Reward sources (`rlhf/training/rewards.py`): loading reward functions by dotted path, checking their output,
resolving which sources a run uses, and the synthetic gold reward."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from rlhf.data.synthetic import SyntheticPreferences, generate_pairs
from rlhf.errors import ConfigError, UserError
from rlhf.training.rewards import (RewardConfig, RewardFunctions, load_function, load_functions, sources,
                          synthetic_gold)

THEIR_MODULE = """
import math

def length(prompts, responses):
    return [len(r) for r in responses]

def polite(prompts, responses):
    return tuple(1.0 if "thanks" in r else 0.0 for r in responses)

def as_numpy(prompts, responses):
    return np.asarray([r.count("a") for r in responses], dtype=np.int64)

def as_tensor(prompts, responses):
    return torch.ones(len(responses))

def exact(prompts, responses):
    return [r.strip() == "yes" for r in responses]

def boom(prompts, responses):
    raise KeyError("no answer\\nin prompt")

def short(prompts, responses):
    return [1.0] * (len(responses) - 1)

def nan(prompts, responses):
    return [math.nan] + [0.0] * (len(responses) - 1)

def words(prompts, responses):
    return ["good"] * len(responses)

def scalar(prompts, responses):
    return 1.0

def one_arg(responses):
    return [0.0] * len(responses)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def their_module(tmp_path, monkeypatch):
    """`their_module.py` in a fresh working directory; sys.path and sys.modules restored afterwards."""
    (tmp_path / "their_module.py").write_text("import numpy as np\nimport torch\n" + textwrap.dedent(THEIR_MODULE))
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('cannot import\\nthis')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield "their_module"
    for name in ("their_module", "broken_module"):
        sys.modules.pop(name, None)


def one_line_error(exc_type, fn, *args, match: str):
    """Asserts `fn(*args)` raises `exc_type` with a single-line message containing `match`."""
    with pytest.raises(exc_type) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


def test_load_by_dotted_path(their_module):
    fn = load_function("their_module.length")
    assert fn(["p", "q"], ["ab", "abcd"]) == [2, 4]


def test_weighted_sum_of_two_functions(their_module):
    fns = RewardFunctions([(load_function("their_module.length"), "their_module.length", 0.5),
                           (load_function("their_module.polite"), "their_module.polite", -2.0)])
    out = fns(["p", "p", "p"], ["abcd", " thanks", ""], update=0)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == pytest.approx([2.0, 3.5 - 2.0, 0.0])
    assert fns.last["their_module.polite"].tolist() == [0.0, 1.0, 0.0]  # unweighted, per source


@pytest.mark.parametrize("name, expected", [("as_numpy", [3.0, 0.0]), ("as_tensor", [1.0, 1.0]),
                                            ("exact", [0.0, 1.0])])
def test_accepts_numpy_torch_and_bool_outputs(their_module, name, expected):
    fns = RewardFunctions([(load_function(f"their_module.{name}"), name, 1.0)])
    assert fns(["p", "p"], ["banana", " yes"], update=1).tolist() == expected


@pytest.mark.parametrize("path, match", [
    ("missing_module.f", "reward.fn missing_module.f: module 'missing_module' not found"),
    ("their_module.nope", "reward.fn their_module.nope: module 'their_module' has no attribute 'nope'"),
    ("their_module.NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not callable"),
    ("their_module.one_arg", "cannot be called as one_arg(prompts, responses)"),
    ("broken_module.f", "importing 'broken_module' raised RuntimeError: cannot import this"),
])
def test_load_errors_are_one_line_config_errors(their_module, path, match):
    one_line_error(ConfigError, load_function, path, match=match)


@pytest.mark.parametrize("name, match", [
    ("boom", "reward.fn their_module.boom raised KeyError: 'no answer\\nin prompt' at update 7"),
    ("short", "reward.fn their_module.short at update 7: returned 3 values for 4 responses"),
    ("nan", "reward.fn their_module.nan at update 7: returned 1 non-finite value(s), first nan at index 0"),
    ("words", "reward.fn their_module.words at update 7: returned a non-number at index 0: str 'good'"),
    ("scalar", "reward.fn their_module.scalar at update 7: returned float, expected a list of 4 floats"),
])
def test_bad_function_output_is_a_one_line_user_error(their_module, name, match):
    path = f"their_module.{name}"
    fns = RewardFunctions([(load_function(path), path, 1.0)])
    one_line_error(UserError, fns, ["p"] * 4, ["a", "b", "c", "d"], 7, match=match)


def test_raise_keeps_the_cause_as_context(their_module):
    fns = RewardFunctions([(load_function("their_module.boom"), "their_module.boom", 1.0)])
    with pytest.raises(UserError) as info:
        fns(["p"], ["r"], update=0)
    assert isinstance(info.value.__context__, KeyError) and info.value.__suppress_context__


@pytest.mark.parametrize("kwargs, match", [
    ({"fn": "nodots"}, "reward.fn entry 'nodots' is not a dotted path"),
    ({"fn": ["a.b", ""]}, "reward.fn entry '' is not a dotted path"),
    ({"fn": []}, "reward.fn must be a dotted path or a non-empty list"),
    ({"weights": [1.0, float("nan")]}, "reward.weights entries must be finite numbers"),
    ({"weights": [1.0, "x"]}, "reward.weights entries must be finite numbers"),
])
def test_config_validation(kwargs, match):
    one_line_error(ConfigError, lambda: RewardConfig(**kwargs), match=match)


def test_sources_no_fn_needs_the_rm_stage():
    spec = sources(RewardConfig(), has_rm_stage=True)
    assert spec.needs_rm_stage and spec.uses_model and spec.fns == () and spec.model_weight == 1.0
    assert load_functions(spec) is None
    one_line_error(ConfigError, sources, RewardConfig(), False, match="no reward source")


def test_sources_fn_only_needs_no_rm_stage(their_module):
    spec = sources(RewardConfig(fn="their_module.length"), has_rm_stage=True)
    assert not spec.needs_rm_stage and not spec.uses_model and spec.model_weight is None
    assert spec.fns == ("their_module.length",) and spec.weights == (1.0,)
    fns = load_functions(spec)
    assert fns is not None and fns.names == ["their_module.length"]


def test_sources_fn_and_model_path(their_module):
    cfg = RewardConfig(model_path="runs/rm/model", fn=["their_module.length"], weights=[0.3, 2])
    spec = sources(cfg, has_rm_stage=False)
    assert spec.uses_model and not spec.needs_rm_stage and spec.model_path == "runs/rm/model"
    assert spec.model_weight == 0.3 and spec.fn_weights == (2.0,) and spec.names == ("model", "their_module.length")
    fns = load_functions(spec)
    assert fns(["p"], ["abc"], update=0).tolist() == [6.0]  # 2 * len("abc"): the fn gets its own weight


def test_sources_wrong_weights_length():
    cfg = RewardConfig(model_path="m", fn="mymod.f", weights=[1.0, 2.0, 3.0])
    one_line_error(ConfigError, sources, cfg, True,
                   match="reward.weights has 3 entries for 2 sources [model, mymod.f]")
    one_line_error(ConfigError, sources, RewardConfig(fn=["a.f", "b.g"], weights=[1.0]), True,
                   match="reward.weights has 1 entries for 2 sources [a.f, b.g]")


def test_synthetic_gold_ranks_chosen_above_rejected():
    pairs = generate_pairs(16, seed=3)
    prompts = [p.prompt for p in pairs]
    chosen = synthetic_gold(prompts, [p.chosen for p in pairs])
    rejected = synthetic_gold(prompts, [p.rejected for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected))
    assert chosen == [SyntheticPreferences.gold(p.prompt, p.chosen) for p in pairs]
    # As a reward fn by dotted path, the "true reward" upper-bound run.
    fns = load_functions(sources(RewardConfig(fn="rlhf.training.rewards.synthetic_gold"), has_rm_stage=False))
    assert fns(prompts, [p.chosen for p in pairs], update=0).tolist() == pytest.approx(chosen)
