"""The stage contract: what every stage of the pipeline declares, once, on its class.

A stage is a LightningModule subclass of `Stage` with a `name`. Defining one registers it
(`rlhf.stages.REGISTRY`); its settings live under `cfg.<name>` (a YAML file in `conf/stages/`
extending its `Config` dataclass), its outputs under `RUN/<name>/`. The pipeline, model cards,
evaluation, `generate`/`serve` and the analysis read these declarations and never a stage's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import pytorch_lightning as pl

from rlhf.stages.common import StageConfig

REGISTRY: dict[str, type["Stage"]] = {}


@dataclass
class Inputs:
    """What a stage is built from: earlier stages' exports or user-given paths, and run-wide facts."""
    policy: str | None = None  # HF directory of the starting policy (None: the model config's weights)
    reward_model: str | None = None  # HF directory of a reward model (rm stage export or reward.model_path)
    reward_fns: Any = None  # `rlhf.training.rewards.RewardFunctions` from reward.fn, or None
    reward_model_weight: float = 1.0  # the reward model's weight beside reward functions
    pad_token_id: int = 50256
    gold: Callable[[str, str], float] | None = None  # ground truth (prompt, response) -> float, when known
    verify: Callable[[str, str], bool] | None = None  # a verifiable task's exact check: accuracy and pass@k
    extra: dict = field(default_factory=dict)


class Stage(pl.LightningModule):
    name: ClassVar[str] = ""  # config key, output folder and registry key; "" for abstract bases
    Config: ClassVar[type[StageConfig]]  # the dataclass of its settings (one comment per field)
    title: ClassVar[str] = ""  # model card title of its export, e.g. "PPO policy"
    description: ClassVar[str] = ""  # model card paragraph: what the stage did
    paper: ClassVar[str] = ""  # what it follows, for the model card
    data_mode: ClassVar[str] = "prompts"  # how the datamodule batches: sft | rm | prompts | pairs | unpaired
    needs: ClassVar[tuple[str, ...]] = ()  # inputs earlier stages (or paths) must provide: policy, reward
    uses: ClassVar[tuple[str, ...]] = ()  # inputs taken when an earlier stage produced them (rm: the SFT policy)
    produces: ClassVar[str | None] = None  # "policy" | "reward" | None: what later stages may use
    order: ClassVar[int] = 2  # position in a pipeline: sft 0, rm 1, policy optimisation 2
    kl_field: ClassVar[str | None] = None  # its KL coefficient's field: the root lr and kl_coef feed such stages
    headline: ClassVar[tuple[str, ...]] = ()  # result keys lifted into summary.json for sweeps
    csv_columns: ClassVar[list[str] | None] = None  # metrics.csv columns (None: whatever csv_row holds)
    evaluates_policy: ClassVar[bool] = False  # samples its policy against its start on held-out prompts (eval.*)
    optimizer_steps_per_batch: int = 1  # optimizer steps per training batch (PPO: epochs x minibatches)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
                raise TypeError(f"two stages named {cls.name!r}: {REGISTRY[cls.name].__module__} and {cls.__module__}")
            REGISTRY[cls.name] = cls

    @classmethod
    def preflight(cls, conf, plan: list[str], cfg) -> None:
        """Checks that need no model (paths, combinations); raise ConfigError with one line."""

    @classmethod
    def saved_models(cls, conf) -> int:
        """Models this stage trains, checkpoints and exports under `conf` (the free-disk floor counts
        them); frozen ones are rebuilt from their exports and never saved."""
        return 1

    @classmethod
    def training_data(cls, conf, splits):
        """The datamodule mode and the splits this stage trains on under `conf`: `data_mode` and the
        run's splits, unless its settings bring data of their own (KTO's `unpaired_path`)."""
        return cls.data_mode, splits

    def finish(self, dm, stage_dir, tokenizer, source) -> dict:
        """After training, on rank 0: export, evaluate; returns this stage's results (summary.json)."""
        raise NotImplementedError
