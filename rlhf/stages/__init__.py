"""The pipeline's stages: every `Stage` subclass with a name, found by importing this package's modules.

    from rlhf.stages import stages
    stages()["ppo"].title  # "PPO policy"

Adding a stage is its module here (a `Stage` subclass), its YAML in `conf/stages/` and its test.
"""
from __future__ import annotations

import importlib
import pkgutil

from rlhf.stages.base import REGISTRY, Inputs, Stage

_SKIP = {"__main__", "base", "common", "guards", "online", "online_config", "online_update", "preference"}  # helpers, not stages


def stages() -> dict[str, type[Stage]]:
    """Every registered stage by name, in pipeline order (producers before their consumers)."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _SKIP:
            importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_stage(name: str) -> type[Stage]:
    from rlhf.errors import ConfigError

    known = stages()
    if name not in known:
        raise ConfigError(f"unknown stage or algorithm {name!r}; expected one of: {', '.join(known)}")
    return known[name]


__all__ = ["Inputs", "Stage", "get_stage", "stages"]
