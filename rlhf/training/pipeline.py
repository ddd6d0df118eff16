"""The run: the stages an algorithm needs (SFT -> reward model -> PPO by default), each a
LightningModule built from its config.

    python train.py algo=grpo     # SFT -> RM -> GRPO;  algo=dpo: SFT -> DPO
    python train.py algo=grpo reward.fn=my_module.my_function   # SFT -> GRPO, no reward model

`train(cfg)` is what `train.py` wraps with `@hydra.main`; tests call it in-process with a config
from Hydra's compose API. The stages come from the registry (`rlhf.stages`): what each needs and
produces decides the pipeline. Everything that can be checked (config values, data files, model,
checkpoint and reward paths, reward functions, the output directory) is checked before the first
model is built.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from rlhf.data.pairs import prompt_overlap
from rlhf.errors import ConfigError, UserError
from rlhf.evaluation.gold import resolve_gold
from rlhf.deploy.model_card import write_model_card
from rlhf.training.memory import keep_freed_memory, peak_rss_mb, reset_peak_rss
from rlhf.models.tokenizer import load_tokenizer
from rlhf.stages import Inputs, get_stage, stages
from rlhf.training import reuse
from rlhf.training.disk import disk_used
from rlhf.training.plan import (RewardPlan, apply_every_stage, apply_root_settings, apply_task_reward, build_stage,
                                check_disk, plan_stages, preflight)

log = logging.getLogger(__name__)
TASK_HEADLINE = ("accuracy_before", "accuracy_after", "pass_at_k")  # a verifiable task's, from any policy stage


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Lightning's "`Trainer.fit` stopped: `max_steps=N` reached." counts optimizer steps, not the
        # stage's updates; the stage summary prints the steps it took.
        return not record.getMessage().startswith(("💡 Tip", "`Trainer.fit` stopped: `max_steps="))


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


def load_task(data_cfg: DictConfig):
    """The task (the `data` config's `_target_`) and its splits; a setting it refuses is one ConfigError
    naming it (a data file's own problems stay DataErrors naming file and line)."""
    from hydra.errors import InstantiationException

    from rlhf.data.pairs import DataError

    try:
        source = instantiate(data_cfg)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"data ({data_cfg.get('_target_')}): {cause}") from None
    try:
        return source, source.load()
    except DataError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data ({data_cfg.get('_target_')}): {e}") from None


def run_stage(stage: str, cfg: DictConfig, conf, splits, tokenizer, source, artifacts: dict, run_dir: Path,
              resuming: bool = False, reward: RewardPlan | None = None, gold=None) -> dict:
    from rlhf.data import PreferenceDataModule

    cls = get_stage(stage)
    stage_dir = run_dir / stage
    reset_peak_rss()  # the stage's own peak, not an earlier stage's or an earlier multirun job's
    scfg = cfg.copy()
    with open_dict(scfg):
        scfg.stage_dir = str(stage_dir)
    pl.seed_everything(cfg.seed, workers=True)
    mode, splits = cls.training_data(conf, splits)
    dm = PreferenceDataModule(splits, tokenizer, mode, getattr(conf, "loader_batch_size", conf.batch_size),
                              conf.max_prompt_length, conf.max_response_length, seed=cfg.seed)
    inputs = Inputs(policy=getattr(conf, "policy_path", None) or artifacts.get("policy"),
                    pad_token_id=tokenizer.pad_token_id, gold=gold, verify=getattr(source, "verify", None))
    if "reward" in cls.needs and reward is not None:
        inputs.reward_model = reward.spec.model_path or (artifacts.get("reward") if reward.spec.use_rm_stage else None)
        inputs.reward_fns, inputs.reward_model_weight = reward.fns, reward.spec.model_weight
    module = build_stage(cfg, stage, inputs, conf)
    steps = cfg.trainer.get("max_steps") or conf.max_steps
    per_batch = module.optimizer_steps_per_batch  # PPO steps its optimizer E*M times a batch
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
    if trainer.global_rank == 0 and cls.evaluates_policy and getattr(module, "verify", None) is not None:
        result.update(verified_eval(module, dm, cfg.get("eval") or {}, trainer))
    for cb in trainer.callbacks:  # held-out evaluation (best policy), health alarms
        if trainer.global_rank == 0 and hasattr(cb, "summary"):
            result.update(cb.summary())
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


def verified_eval(module, dm, ev, trainer) -> dict:
    """On a verifiable task: greedy accuracy and pass@k of the stage's start and its result (eval.*)."""
    from rlhf.evaluation.held_out import verified_comparison

    with trainer.precision_plugin.forward_context():
        return verified_comparison(module, dm, module.cfg.eval_prompts, ev.get("num_samples", 8),
                                   ev.get("temperature", 1.0), list(ev.get("pass_k", (1, 4, 8))))


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
    node = OmegaConf.to_container(cfg[stage], resolve=True)
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
    apply_every_stage(cfg)  # a no-op when train.py (or a test's compose) applied it under the command line
    apply_task_reward(cfg)  # a verifiable task's verifier, unless the user named a reward
    plan = plan_stages(cfg)
    apply_root_settings(cfg)
    confs, reward = preflight(cfg, plan, run_dir, resuming)
    store = reuse.store_for(cfg)  # stages shared by the jobs of a sweep (rlhf/training/reuse.py)
    # The resolved config beside the outputs: evaluate/serve/generate read it, with or without Hydra.
    saved = cfg.copy()
    saved.paths.output_dir = str(run_dir)  # per-stage interpolations (${stage_dir}) stay live for resume
    OmegaConf.save(saved, run_dir / "config.yaml")
    config = OmegaConf.to_container(cfg, resolve=True)  # the same dict, for the model cards
    config["plan"] = plan
    source, splits = load_task(cfg.data)  # reads and validates every data file before any model exists
    gold = resolve_gold(cfg.get("eval"), source)  # the data's gold, or eval.gold_reward_model_path
    overlap = prompt_overlap(splits)
    if overlap["eval_prompts_in_train"]:  # every source splits by prompt; a custom one might not
        log.warning("%d of %d validation prompts also occur among the training prompts: evaluation "
                    "measures recall, not generalisation", overlap["eval_prompts_in_train"],
                    overlap["distinct_eval_prompts"])
    disk = check_disk(cfg, plan, confs, run_dir, resuming)  # after every check of the settings and data
    tokenizer = load_tokenizer(cfg.model.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    summary: dict = {"run_dir": str(run_dir), "algo": cfg.algo, "stages": {}, "model": cfg.model.name,
                     "data": cfg.data._target_.rsplit(".", 1)[-1], "seed": cfg.seed, **overlap}
    if resuming and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    artifacts: dict = {}
    summary["plan"] = plan
    keys: list = []
    for stage in plan:
        t0 = time.time()
        produces = get_stage(stage).produces
        keys.append(reuse.stage_key(cfg, stage, list(stages()), run_dir, keys) if store else None)
        if resuming and stage in summary["stages"]:
            if produces:
                artifacts[produces] = summary["stages"][stage].get("model_dir")
            print(f"stage {stage} already finished in {run_dir}; skipping it")
            continue
        earlier = reuse.lookup(store, stage, keys[-1]) if store else None
        if earlier:
            result = {**earlier["result"], "reused_from": earlier["run_dir"]}
            print(f"stage {stage}: the same settings and inputs as in {earlier['run_dir']}; reusing its results")
        else:
            result = run_stage(stage, cfg, confs[stage], splits, tokenizer, source, artifacts, run_dir, resuming,
                               reward, gold)
        if produces:  # later stages start from this export
            artifacts[produces] = result.get("model_dir")
        if "rank" in result or (earlier and rank_zero_only.rank != 0):  # only rank 0 writes summaries
            continue
        if store and not earlier:
            reuse.record(store, stage, keys[-1], run_dir, result)
        summary["stages"][stage] = result
        for key in ("model_dir", "best_model_dir"):  # a Hugging Face model card beside each export
            if result.get(key) and not earlier:
                write_model_card(result[key], stage, config, result)
        for alarm in result.get("alarms", []):
            summary.setdefault("alarms", []).append({"stage": stage, **alarm})
        if result.get("stopped_by_alarm"):
            summary["stopped"] = {"stage": stage, **result["stopped_by_alarm"]}
        summary.update({k: v for k, v in result.items() if k in get_stage(stage).headline + TASK_HEADLINE})
        # What a sweep compares across algorithms beside the results: the run's memory high-water mark.
        # A stage reused from an earlier job of the sweep ran in that job's process, not this one's;
        # a job that reused every stage ran none, and has no peak of its own.
        peaks = [r.get("peak_rss_mb") or 0 for r in summary["stages"].values() if "reused_from" not in r]
        summary.pop("peak_rss_mb", None)
        if peaks:
            summary["peak_rss_mb"] = max(peaks)
        summary["seconds"] = round(time.time() - start, 1)
        # What the preflight asked for (the peak it expects) beside what the run directory holds now.
        summary["disk_mb"] = {"needed": round(disk.need_bytes / 2**20), "used": round(disk_used(run_dir) / 2**20)}
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
