"""The run: SFT -> reward model -> PPO, each stage a LightningModule built from its config.

`train(cfg)` is what `train.py` wraps with `@hydra.main`; tests call it in-process with a config
from Hydra's compose API. Everything that can be checked (config values, data files, model and
checkpoint paths, the output directory) is checked before the first model is built.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import transformers
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from pytorch_lightning.utilities.model_helpers import is_overridden

from rlhf.data.pairs import prompt_overlap
from rlhf.errors import ConfigError, UserError
from rlhf.model_card import write_model_card
from rlhf.memory import keep_freed_memory, peak_rss_mb
from rlhf.models.causal_lm import ModelConfig
from rlhf.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

STAGES = ("sft", "rm", "ppo")
CONFIG_KEY = {"sft": "sft", "rm": "rm", "ppo": "algo"}  # where each stage's settings live


def plan_stages(cfg: DictConfig) -> list[str]:
    if cfg.stage == "all":
        return [s for s in STAGES if cfg.get(CONFIG_KEY[s]) is not None]
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r}: expected one of all, {', '.join(STAGES)}")
    if cfg.get(CONFIG_KEY[cfg.stage]) is None:
        raise ConfigError(f"stage={cfg.stage}: no '{CONFIG_KEY[cfg.stage]}' config group selected")
    return [cfg.stage]


def stage_config(cfg: DictConfig, stage: str):
    node = cfg[CONFIG_KEY[stage]]
    cls = get_class(node._target_)
    return cls, cls.Config.from_dict(OmegaConf.to_container(node, resolve=True), CONFIG_KEY[stage])


def preflight(cfg: DictConfig, stages: list[str], run_dir: Path, resuming: bool = False) -> dict:
    """All checks that need no model: returns the validated stage configs."""
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    if mc.name_or_path and mc.name_or_path.startswith(("/", "./", "../", "~")) \
            and not Path(mc.name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path={mc.name_or_path}: no such directory")
    steps = cfg.trainer.get("max_steps")
    if steps is not None and steps <= 0:
        raise ConfigError(f"trainer.max_steps must be > 0, got {steps}")
    if "ppo" in stages and cfg.trainer.get("gradient_clip_val"):
        raise ConfigError("trainer.gradient_clip_val: the PPO stage steps its optimizer itself, where Lightning "
                          "clips nothing; use algo.max_grad_norm for PPO, or run stage=sft / stage=rm alone")
    confs = {}
    for s in stages:
        cls, conf = stage_config(cfg, s)
        if hasattr(cls, "preflight"):
            cls.preflight(conf, stages)
        confs[s] = conf
    if resuming and not (run_dir / "config.yaml").is_file():
        raise UserError(f"resume={run_dir}: not a run directory (no config.yaml)")
    if not resuming and (run_dir / "summary.json").exists():
        raise UserError(f"{run_dir} already holds a run (summary.json); refusing to overwrite it "
                        f"(resume={run_dir} continues it)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {run_dir} is not writable: {e.strerror}") from None
    need = float(cfg.paths.get("min_free_gb") or 0)
    free = shutil.disk_usage(run_dir).free / 2**30
    if free < need:
        raise UserError(f"output directory {run_dir} has {free:.1f} GiB free, paths.min_free_gb={need:g} "
                        "(checkpoints and exports need the room; free space or lower the setting)")
    return confs


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def quiet_console() -> None:
    """Keep Lightning's output to what a user of this pipeline can act on.

    Silenced, each for a reason: "N module(s) in eval mode" (PPO's frozen reference and reward
    models are in eval mode on purpose, and dropout is off everywhere); "val_dataloader but no
    validation_step" (PPO evaluates in `finish`, not in Lightning's loop); the deprecation inside
    Lightning's own `_pytree` (not our code, nothing to change); and the advertising tips.
    """
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in lg.filters):
            lg.addFilter(_DropTips())


def write_summary(run_dir: Path, summary: dict) -> None:
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, run_dir / "summary.json")  # atomic: a killed run never leaves half a file


def print_stage_summary(stage: str, result: dict, seconds: float) -> None:
    print(f"\n=== stage {stage} done in {seconds:.1f}s ===")
    for k, v in result.items():
        print(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}")


def _instantiate_dict(node) -> list:
    return [instantiate(v) for v in (node or {}).values() if v is not None and "_target_" in v]


def run_stage(stage: str, cfg: DictConfig, conf, splits, tokenizer, source, artifacts: dict, run_dir: Path,
              resuming: bool = False) -> dict:
    from rlhf.data import PreferenceDataModule

    stage_dir = run_dir / stage
    scfg = cfg.copy()
    with open_dict(scfg):
        scfg.stage_dir = str(stage_dir)
    pl.seed_everything(cfg.seed, workers=True)
    node = scfg[CONFIG_KEY[stage]]
    cls = get_class(node._target_)
    dm = PreferenceDataModule(splits, tokenizer, cls.data_mode, conf.batch_size, conf.max_prompt_length,
                              conf.max_response_length, seed=cfg.seed)
    try:
        module = instantiate(node, _convert_="all", model=OmegaConf.to_container(cfg.model, resolve=True),
                             **cls.init_kwargs(conf, artifacts, tokenizer, cfg))
    except InstantiationException as e:  # Hydra wraps errors from __init__: show ours as the one line they are
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
    if hasattr(module, "gold"):
        module.gold = getattr(source, "gold", None)  # ground truth is known on synthetic data only
    steps = cfg.trainer.get("max_steps") or conf.max_steps
    per_batch = getattr(module, "optimizer_steps_per_batch", 1)  # PPO steps its optimizer E*M times a batch
    callbacks = _instantiate_dict(scfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, pl.callbacks.ModelCheckpoint) and cb._every_n_train_steps:
            cb._every_n_train_steps *= per_batch
    trainer_kwargs = dict(max_steps=steps * per_batch, logger=_instantiate_dict(scfg.get("logger")) or False,
                          callbacks=callbacks, default_root_dir=str(stage_dir), max_epochs=-1,
                          # The datamodule shards by rank itself, in an order it can resume mid-epoch.
                          use_distributed_sampler=False)
    if is_overridden("validation_step", module):
        trainer_kwargs.update(val_check_interval=min(conf.val_every, steps), check_val_every_n_epoch=None,
                              limit_val_batches=conf.val_batches)
    else:
        trainer_kwargs.update(limit_val_batches=0)
    trainer = instantiate(scfg.trainer, **trainer_kwargs)
    last = stage_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resuming and last.is_file() else None
    if ckpt_path:
        print(f"resuming stage {stage} from {ckpt_path}")
    cuda = _cuda_memory_reset()
    t0 = time.perf_counter()
    # weights_only: a checkpoint is tensors and plain values, never pickled code.
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - t0
    mismatch = rank_weight_mismatch(trainer, module)
    result = module.finish(dm, stage_dir, tokenizer, source) if trainer.global_rank == 0 else {}
    if trainer.global_rank == 0:
        # What a user needs to plan a longer run: the wall time of `trainer.fit` (training with its
        # in-loop validation and checkpoints; not loading, the end-of-stage evaluation or export) and
        # the memory high-water marks. On a resumed stage `steps` counts all steps, `fit_seconds`
        # only this process's.
        result.update(steps=trainer.global_step // per_batch, fit_seconds=round(fit_seconds, 2),
                      peak_rss_mb=round(peak_rss_mb(), 1))
        if cuda:
            import torch

            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if trainer.world_size > 1:
        # Every rank runs every stage; the others load rank 0's export in the next stage.
        trainer.strategy.barrier("stage-export")
        if trainer.global_rank != 0:
            return {"model_dir": str(stage_dir / "model"), "rank": trainer.global_rank}
        result.update(world_size=trainer.world_size, rank_weight_mismatch=mismatch)
    log_hparams(trainer, cfg, stage, result)
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()  # the next stage starts its own W&B run instead of appending to this one
    return result


def _cuda_memory_reset() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.reset_peak_memory_stats()
    return True


def rank_weight_mismatch(trainer, module) -> float:
    """Largest difference, across ranks, of per-tensor (sum, sum of squares) of the trained weights.

    Data parallelism must leave every rank with the same weights (0.0); anything else means
    gradients were not synchronised, and the export from rank 0 would not be what every rank trained.
    """
    if trainer.world_size == 1:
        return 0.0
    import torch

    params = [p.detach().double() for p in module.parameters() if p.requires_grad]
    fp = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()
    everyone = trainer.strategy.all_gather(fp)  # [world, 2 * n_tensors]
    diff = (everyone - everyone[0]).abs().max().item()
    if diff > 0:
        log.warning("weights differ across DDP ranks by up to %g after training", diff)
    return diff


def log_hparams(trainer, cfg: DictConfig, stage: str, result: dict) -> None:
    """Hyperparameters next to the stage's final numbers: TensorBoard's HParams tab compares sweep runs."""
    node = OmegaConf.to_container(cfg[CONFIG_KEY[stage]], resolve=True)
    params = {f"{stage}/{k}": v for k, v in node.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
    params.update(model=cfg.model.name, seed=cfg.seed)
    metrics = {f"final/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in trainer.loggers:
        if isinstance(lg, pl.loggers.TensorBoardLogger):
            lg.log_hyperparams(params, metrics=metrics)


def train(cfg: DictConfig) -> dict:
    """Run the configured stages; returns the run summary (also written to summary.json)."""
    start = time.time()
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    transformers.logging.set_verbosity_error()  # load reports and progress bars drown the stage summaries
    transformers.utils.logging.disable_progress_bar()
    quiet_console()
    run_dir = Path(cfg.paths.output_dir)
    resuming = bool(cfg.get("resume"))
    stages = plan_stages(cfg)
    confs = preflight(cfg, stages, run_dir, resuming)
    # The resolved config beside the outputs: evaluate/serve/generate read it, with or without Hydra.
    saved = cfg.copy()
    saved.paths.output_dir = str(run_dir)  # per-stage interpolations (${stage_dir}) stay live for resume
    OmegaConf.save(saved, run_dir / "config.yaml")
    config = OmegaConf.to_container(cfg, resolve=True)  # the same dict, for the model cards
    source = instantiate(cfg.data)
    splits = source.load()  # reads and validates every data file before any model exists
    overlap = prompt_overlap(splits)
    if overlap["eval_prompts_in_train"]:  # every source splits by prompt; a custom one might not
        log.warning("%d of %d validation prompts also occur among the training prompts: evaluation "
                    "measures recall, not generalisation", overlap["eval_prompts_in_train"],
                    overlap["distinct_eval_prompts"])
    tokenizer = load_tokenizer(cfg.model.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    summary: dict = {"run_dir": str(run_dir), "stages": {}, "model": cfg.model.name,
                     "data": cfg.data._target_.rsplit(".", 1)[-1], "seed": cfg.seed, **overlap}
    if resuming and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    artifacts: dict = {}
    for stage in stages:
        t0 = time.time()
        if resuming and stage in summary["stages"]:
            artifacts[stage] = summary["stages"][stage].get("model_dir")
            print(f"stage {stage} already finished in {run_dir}; skipping it")
            continue
        result = run_stage(stage, cfg, confs[stage], splits, tokenizer, source, artifacts, run_dir, resuming)
        if "rank" in result:  # non-zero DDP ranks: only rank 0 writes summaries and cards
            artifacts[stage] = result["model_dir"]
            continue
        artifacts[stage] = result.get("model_dir")
        summary["stages"][stage] = result
        if result.get("model_dir"):  # a Hugging Face model card beside each export
            write_model_card(result["model_dir"], stage, config, result)
        summary.update({k: v for k, v in result.items() if k in HEADLINE})
        summary["seconds"] = round(time.time() - start, 1)
        write_summary(run_dir, summary)
        print_stage_summary(stage, result, time.time() - t0)
    logdir = next((p for p in run_dir.resolve().parents if p.name == "outputs"), run_dir)
    print(f"\nrun finished in {time.time() - start:.1f}s; outputs in {run_dir}"
          f"\n  summary: {run_dir / 'summary.json'}\n  curves:  tensorboard --logdir {logdir}")
    return summary


_MISSING = object()


def resume_config(run_dir: str, overrides: list[str]) -> DictConfig:
    """The config of the run in `run_dir`, with `key=value` overrides from the command line on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"resume={run_dir}: no config.yaml there (not a run directory written by train.py)")
    cfg = OmegaConf.load(path)
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key == "resume" or key.startswith("hydra"):
            continue
        current = OmegaConf.select(cfg, key, default=_MISSING)
        if current is _MISSING or isinstance(current, DictConfig):
            raise UserError(f"resume: '{item}' names no value of the run's config (config groups cannot change on resume)")
        OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
    cfg.paths.output_dir = str(run_dir)
    cfg.resume = str(run_dir)
    return cfg


# Numbers a sweep compares: lifted from stage results to the top of summary.json.
HEADLINE = {"sft_val_loss", "rm_accuracy", "gold_reward_before", "gold_reward_after", "gold_win_rate",
            "kl_final", "reward_before", "reward_after", "rm_win_rate"}
