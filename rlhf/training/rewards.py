"""Reward sources for the online RL stages (PPO, GRPO, RLOO): a reward model, Python functions, or both.

    python train.py algo=grpo reward.fn=my_module.my_function             # a rule-based / verifiable reward
    python train.py algo=grpo 'reward.fn=[rlhf.training.rewards.synthetic_gold,my_module.brevity]' reward.weights=[1,0.1]
    python train.py algo=ppo reward.model_path=RUN/rm/model reward.fn=my_module.f reward.weights=[1,0.5]

A reward function is any callable `(prompts: list[str], responses: list[str]) -> list[float]`, named
by a dotted path importable from the working directory or PYTHONPATH. With no `reward.fn` the reward
is this run's reward model (the rm stage output) or `reward.model_path`. Several sources are summed
with `reward.weights`, in the order [reward model if used, *fns].
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf.errors import ConfigError, UserError

def _one_line(text: object, limit: int = 300) -> str:
    """`text` with all whitespace runs (newlines included) collapsed, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _fn_paths(fn: Any) -> tuple[str, ...]:
    """`reward.fn` as a tuple of dotted paths; ConfigError for anything but 'module.function' strings."""
    if fn is None:
        return ()
    entries = [fn] if isinstance(fn, str) else fn
    # ListConfig is a Sequence too; a dict or number is not a list of paths.
    if not isinstance(entries, Sequence) or not entries:
        raise ConfigError(f"reward.fn must be a dotted path or a non-empty list of them, got {_one_line(fn)}")
    for entry in entries:
        parts = entry.strip().split(".") if isinstance(entry, str) else []
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise ConfigError(f"reward.fn entry {entry!r} is not a dotted path like my_module.my_function")
    return tuple(e.strip() for e in entries)


def _check_weights(weights: Any) -> tuple[float, ...] | None:
    if weights is None:
        return None
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ConfigError(f"reward.weights must be a list of numbers, got {_one_line(weights)}")
    for w in weights:
        # bool is an int subclass, but `weights=[true]` is surely a mistake.
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"reward.weights entries must be finite numbers, got {w!r} in {list(weights)}")
    return tuple(float(w) for w in weights)


@dataclass
class RewardConfig:
    """The root `reward:` config node: which sources score the online stages' responses."""

    model_path: str | None = None  # reward-model directory (an rm export); None: this run's rm stage output, if used
    # Dotted path(s) of reward functions: str | list[str] | None. Typed Any because OmegaConf 2.3
    # rejects unions of a string and a list; __post_init__ checks the shape instead.
    fn: Any = None
    weights: list[float] | None = None  # one per source, order [reward model if used, *fns]; None: all 1.0

    def __post_init__(self) -> None:
        if self.model_path is not None and (not isinstance(self.model_path, str) or not self.model_path.strip()):
            raise ConfigError(f"reward.model_path must be a directory path, got {self.model_path!r}")
        _fn_paths(self.fn)
        # The weights' length is checked by `sources()`: it depends on whether a reward model is used.
        _check_weights(self.weights)


@dataclass(frozen=True)
class RewardSpec:
    """The resolved sources of one run's reward."""

    model_path: str | None  # an explicit reward-model directory
    use_rm_stage: bool  # the reward model is this run's rm stage output
    fns: tuple[str, ...]  # dotted paths of reward functions
    weights: tuple[float, ...]  # one per source: [model if uses_model, *fns]

    @property
    def uses_model(self) -> bool:
        return self.model_path is not None or self.use_rm_stage

    @property
    def needs_rm_stage(self) -> bool:
        return self.use_rm_stage

    @property
    def model_weight(self) -> float | None:
        """Weight of the reward-model score; None when no reward model is used."""
        return self.weights[0] if self.uses_model else None

    @property
    def fn_weights(self) -> tuple[float, ...]:
        return self.weights[1:] if self.uses_model else self.weights

    @property
    def names(self) -> tuple[str, ...]:
        return ("model",) * self.uses_model + self.fns


def sources(cfg: RewardConfig, has_rm_stage: bool) -> RewardSpec:
    """Which sources score responses; ConfigError if the weights do not match them or no source exists.

    A reward model is used when `model_path` is set or when no fn is given; in the second case it is
    the rm stage's output, so the pipeline must run (or have run) that stage. `cfg` may also be the
    composed `reward` DictConfig, hence the checks are repeated here.
    """
    fns = _fn_paths(cfg.fn)
    weights = _check_weights(cfg.weights)
    model_path = cfg.model_path
    use_rm_stage = model_path is None and not fns
    if use_rm_stage and not has_rm_stage:
        raise ConfigError("no reward source: set reward.fn=my_module.my_function, reward.model_path=DIR "
                          "(an rm stage export), or run the rm stage in this pipeline")
    names = ("model",) * (model_path is not None or use_rm_stage) + fns
    if weights is None:
        weights = (1.0,) * len(names)
    elif len(weights) != len(names):
        raise ConfigError(f"reward.weights has {len(weights)} entries for {len(names)} sources "
                          f"[{', '.join(names)}]")
    return RewardSpec(model_path=model_path, use_rm_stage=use_rm_stage, fns=fns, weights=weights)


def load_function(path: str) -> Callable[..., Any]:
    """The callable at dotted `path` ('module.function'); one-line ConfigError if it cannot be loaded."""
    module_name, _, attr = path.strip().rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"reward.fn {path!r} is not a dotted path like my_module.my_function")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # Appended, not prepended: a stray file in the working directory must not shadow an
        # installed package that some library imports later.
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # The module itself (or its package) is missing, vs. an import inside it failing.
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"reward.fn {path}: module '{module_name}' not found "
                              f"(looked in the working directory {cwd} and PYTHONPATH)") from None
        raise ConfigError(f"reward.fn {path}: importing '{module_name}' failed: {_one_line(e)}") from None
    except Exception as e:  # the user's module raised (or has a syntax error) at import time
        raise ConfigError(f"reward.fn {path}: importing '{module_name}' raised "
                          f"{type(e).__name__}: {_one_line(e)}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"reward.fn {path}: module '{module_name}' has no attribute '{attr}'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"reward.fn {path}: '{attr}' is a {type(fn).__name__}, not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; they are checked at first call
        return fn
    try:
        signature.bind([], [])
    except TypeError as e:
        raise ConfigError(f"reward.fn {path}: cannot be called as {attr}(prompts, responses): {e}") from None
    return fn


def _as_values(out: Any, n: int, where: str) -> torch.Tensor:
    """A function's output as a float64 [n] tensor; one-line UserError naming `where` otherwise."""
    if isinstance(out, torch.Tensor):
        if out.is_complex() or out.ndim != 1:
            raise UserError(f"{where}: returned a {out.dtype} tensor of shape {tuple(out.shape)}, expected [{n}] floats")
        values = out.detach().to("cpu", torch.float64)
    elif isinstance(out, np.ndarray):
        if out.ndim != 1 or out.dtype.kind not in "biuf":
            raise UserError(f"{where}: returned a {out.dtype} array of shape {out.shape}, expected [{n}] floats")
        values = torch.from_numpy(out.astype(np.float64))
    elif isinstance(out, (list, tuple)):
        items = []
        for i, v in enumerate(out):
            # One-element tensors/arrays and numpy scalars (np.bool_ is no numbers.Real) as plain numbers.
            if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1) \
                    or (isinstance(v, torch.Tensor) and v.numel() == 1):
                v = v.item()
            # bool counts as 0/1: verifiable rewards naturally return `answer == expected`.
            if not isinstance(v, numbers.Real):
                raise UserError(f"{where}: returned a non-number at index {i}: {type(v).__name__} "
                                f"{_one_line(repr(v), 60)}")
            items.append(float(v))
        values = torch.tensor(items, dtype=torch.float64)
    else:
        raise UserError(f"{where}: returned {type(out).__name__}, expected a list of {n} floats")
    if values.numel() != n:
        raise UserError(f"{where}: returned {values.numel()} values for {n} responses")
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise UserError(f"{where}: returned {bad.numel()} non-finite value(s), first {values[i].item()} at index {i}")
    return values


class RewardFunctions:
    """Weighted sum of reward functions, each output checked; called once per rollout batch."""

    def __init__(self, fns: Sequence[tuple[Callable[..., Any], str, float]]):
        self.fns = list(fns)
        # Unweighted scores of the last call, by name: for logging each source next to the total.
        self.last: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self.fns]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], update: int) -> torch.Tensor:
        """[B] float32 on the CPU: sum of weight * fn(prompts, responses); UserError on a bad function."""
        prompts, responses = list(prompts), list(responses)
        total = torch.zeros(len(responses), dtype=torch.float64)
        for fn, name, weight in self.fns:
            try:
                out = fn(prompts, responses)
            except Exception as e:
                # `from None`: train.py prints the one line; the cause stays on __context__.
                raise UserError(f"reward.fn {name} raised {type(e).__name__}: {_one_line(e)} "
                                f"at update {update}") from None
            values = _as_values(out, len(responses), f"reward.fn {name} at update {update}")
            self.last[name] = values.float()
            total += weight * values
        return total.float()


def load_functions(spec: RewardSpec) -> RewardFunctions | None:
    """Imports every fn of `spec` (call in preflight: import errors come before any model is built)."""
    if not spec.fns:
        return None
    return RewardFunctions([(load_function(p), p, w) for p, w in zip(spec.fns, spec.fn_weights, strict=True)])


@functools.lru_cache(maxsize=1)
def _synthetic_source():
    from rlhf.data.synthetic import SyntheticPreferences

    return SyntheticPreferences()  # construction generates nothing; only `gold` is used


def synthetic_gold(prompts: list[str], responses: list[str]) -> list[float]:
    """The synthetic task's gold reward as a reward fn: `reward.fn=rlhf.training.rewards.synthetic_gold`
    trains on the true reward (an upper bound for runs that only see the reward model)."""
    gold = _synthetic_source().gold
    return [gold(p, r) for p, r in zip(prompts, responses, strict=True)]
