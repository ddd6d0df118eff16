"""Typed schemas for the stage configs, registered with Hydra's ConfigStore.

The dataclasses in `rlhf/stages/*.py` are the single documentation of every field; the YAML files
in `conf/algo/` extend these schemas and only set values. Hydra then rejects unknown keys and
wrong types at the command line (`algo.kl_coef=abc`), and the dataclasses' `__post_init__`
rejects bad values before any model is built.
"""
from hydra.core.config_store import ConfigStore

from rlhf.models.causal_lm import ModelConfig
from rlhf.stages.ppo import PPOConfig
from rlhf.stages.reward_model import RMConfig
from rlhf.stages.sft import SFTConfig

SCHEMAS = {"sft_schema": SFTConfig, "rm_schema": RMConfig, "ppo_schema": PPOConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="algo", name=name, node=node)
    cs.store(group="model", name="model_schema", node=ModelConfig)
