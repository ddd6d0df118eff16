"""Stages shared by the jobs of a sweep: a stage whose settings and inputs match one that an earlier
job of the same sweep finished is not trained again; the job takes that stage's export and results.

    python train.py -m data=synthetic,arithmetic,length_trap algo=ppo,grpo,dpo seed=0,1,2
        # SFT (and the reward model) trained once per task and seed, not once per job
    python train.py -m algo=ppo,grpo seed=0,1 reuse_stages=false   # every job trains every stage
    python train.py -m algo=ppo,grpo reuse_stages=/data/stage_store   # share across sweeps, at your risk

The key is a hash of everything in the run's resolved config that can change what a stage produces:
the stage's own settings (after `every_stage` and the root `lr`/`kl_coef` are applied), the model,
data, reward, evaluation, trainer and callback settings, the seed, anything else not known to be
irrelevant, and the keys of the stages before it in the run (an SFT trained differently is never
paired with a reward model trained after another). Left out: `algo` and `stage` (which stages run,
not how), the other stages' settings, and the output paths (the job's own directory is replaced by
a placeholder first, so the jobs of a sweep agree). The store is `<sweep dir>/.stages/`: only jobs
of one sweep, which run the same code, share (a directory named instead is shared by every sweep
that names it, whatever code trained its stages). Jobs running at the same time (a parallel
launcher) may each train a stage they share; each then uses its own.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf.errors import ConfigError

# Root keys that do not change what any stage produces (the stages' own nodes are handled apart).
IGNORED = ("algo", "stage", "paths", "logger", "resume", "optimized_metric", "reuse_stages", "stage_dir",
           "every_stage", "lr", "kl_coef", "keep_freed_memory")


def store_for(cfg: DictConfig) -> Path | None:
    """Where finished stages are recorded: `<sweep dir>/.stages` in a Hydra multirun (`reuse_stages:
    sweep`, the default), a directory the user names, or None (off, and in single runs)."""
    setting = cfg.get("reuse_stages", "sweep")
    if setting in (False, None, "false", "none", "off"):
        return None
    if setting in (True, "sweep", "true", "on"):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        store = Path(HydraConfig.get().sweep.dir) / ".stages"
    elif isinstance(setting, str):
        store = Path(setting).expanduser()
    else:
        raise ConfigError(f"reuse_stages={setting!r}: expected sweep, false or a directory")
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"reuse_stages: cannot create {store} ({e.strerror})") from None
    return store


def stage_key(cfg: DictConfig, stage: str, stages: list[str], run_dir: Path, earlier: list[str]) -> str:
    """The hash of what decides `stage`'s output in this run (module docstring). `stages` are every
    registered stage's name (their nodes other than `stage`'s are left out); `earlier` the keys of
    the stages before it in the run's plan."""
    kept = {}
    for k in cfg:  # resolved key by key: a left-out key's interpolations (hydra:...) are never needed
        if k not in IGNORED and (k == stage or k not in stages):
            v = cfg[k]
            kept[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v
    text = json.dumps({"stage": stage, "config": kept, "after": earlier}, sort_keys=True, default=str)
    text = text.replace(str(run_dir.resolve()), "<run>").replace(str(run_dir), "<run>")
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def lookup(store: Path, stage: str, key: str) -> dict | None:
    """The record of `stage` finished under `key`, if its export is still there."""
    f = store / f"{stage}-{key}.json"
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a record being replaced, or damaged: train the stage again
    model_dir = record.get("result", {}).get("model_dir")
    return record if model_dir is None or Path(model_dir).is_dir() else None


def record(store: Path, stage: str, key: str, run_dir: Path, result: dict) -> None:
    """Record a finished stage (atomically: a job reading it never sees half a file)."""
    f = store / f"{stage}-{key}.json"
    tmp = f.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"run_dir": str(run_dir), "result": result}, indent=2, default=str))
    os.replace(tmp, f)
