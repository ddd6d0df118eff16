"""Typed schemas for the stage configs, registered with Hydra's ConfigStore.

The dataclasses on the stages (`rlhf/stages/*.py`, `Stage.Config`) are the single documentation of
every field; each YAML file in `conf/stages/` extends its stage's schema (`<name>_schema`) and only
sets values. Hydra then rejects unknown keys and wrong types at the command line
(`ppo.kl_coef=abc`), and the dataclasses' `__post_init__` rejects bad values before any model is built.
"""
from hydra.core.config_store import ConfigStore

from rlhf.models.causal_lm import ModelConfig
from rlhf.training.rewards import RewardConfig
from rlhf.stages import stages


def register_configs() -> None:
    cs = ConfigStore.instance()
    known = stages()
    for name, cls in known.items():
        cs.store(group="stages", name=f"{name}_schema", node=cls.Config)
    # The root config's `all_stages` default: each registered stage's YAML loaded under its own name
    # (`ppo.*`, `grpo.*`, ...), so a new stage is its module and its YAML, never an edit of train.yaml.
    cs.store(name="all_stages", node={"defaults": [{f"stages@{name}": name} for name in known] + ["_self_"]})
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="reward", name="reward_schema", node=RewardConfig)
