"""The disk a run will write, known before any model is built: the floor of the free-space preflight.

`paths.min_free_gb=auto` (the default) asks for what this run writes at its peak rather than a
fixed amount, so a tiny run on a small disk starts and a GPT-2 run on the same disk fails at once,
naming both figures, instead of at its first checkpoint an hour in. A number sets the floor by
hand; 0 turns the check off.

What a stage writes, per model it trains (the stage's `saved_models`; frozen references and
reward models are rebuilt from their exports and never saved):
- a Lightning checkpoint: fp32 weights and AdamW's two moments, 12 bytes a parameter (with LoRA,
  the moments of the adapter's parameters alone). The newest
  is kept and `last.ckpt` links to it; while the next one is written both exist (none without
  the checkpoint callback);
- an fp32 safetensors export, 4 bytes a parameter, with the tokenizer's files;
- for a stage that evaluates its policy during training, `best_model`: one more export, written
  beside the previous best before it replaces it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_BYTES = 4  # fp32 weights in a checkpoint, per parameter
ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, per trainable parameter
EXPORT_BYTES = 4  # fp32 safetensors, per parameter
EXPORT_EXTRA = 16 * 2**20  # tokenizer files, model card and config beside each export
STAGE_EXTRA = 8 * 2**20  # metrics.csv, eval.csv, TensorBoard events, hparams


@dataclass
class DiskPlan:
    """The floor the preflight holds a run to, and where it came from."""
    need_bytes: int
    parameters: int | None  # of the run's model; None where it could not be read without building it
    stages: int  # stages that will train
    how: str  # "auto" or "paths.min_free_gb"

    def describe(self) -> str:
        gib = self.need_bytes / 2**30
        if self.how != "auto":
            return f"paths.min_free_gb={gib:g}"
        if self.parameters is None:
            return "paths.min_free_gb=auto: no floor (the model cannot be read before it loads)"
        return (f"this run writes up to {gib:.2f} GiB ({self.stages} stage(s) training a "
                f"{self.parameters / 1e6:.1f}M-parameter model; paths.min_free_gb=auto)")


def parameter_counts(model_cfg: DictConfig, vocab_size: int = 50257) -> tuple[int, int] | None:
    """(parameters, trainable parameters) of the run's model, counted on the meta device from its
    config alone, no weights read; with `model.lora` the adapter is injected there too, so only its
    parameters train. None where the config cannot be read from here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from rlhf.models.causal_lm import ModelConfig, ModelLoadError, from_pretrained
    from rlhf.models.lora import add_lora

    mc = ModelConfig.from_dict(OmegaConf.to_container(model_cfg, resolve=True))
    try:
        config = from_pretrained(AutoConfig, mc.name_or_path, "model config",
                                 trust_remote_code=mc.trust_remote_code) if mc.name_or_path else None
        with torch.device("meta"):
            if config is None:
                model = GPT2LMHeadModel(GPT2Config(**{"vocab_size": vocab_size, "n_positions": 256, **mc.arch}))
            else:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=mc.trust_remote_code)
            if mc.lora:
                model = add_lora(model, mc.lora)
    except (ModelLoadError, ValueError, ImportError) as e:
        log.debug("disk estimate: %s", str(e).splitlines()[0][:200])
        return None
    # Tied weights (GPT-2's head is its embedding) are one tensor: counted once, saved once.
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def stage_bytes(params: int, trained: int, best_model: bool, checkpoints: bool = True,
                trainable: int | None = None) -> tuple[int, int]:
    """(bytes a stage leaves on disk, bytes more it holds while replacing a checkpoint or best export)."""
    trainable = params if trainable is None else trainable
    ckpt = (WEIGHT_BYTES * params + ADAM_BYTES * trainable) * trained if checkpoints else 0
    export = (EXPORT_BYTES * params + EXPORT_EXTRA) * trained
    best = EXPORT_BYTES * params + EXPORT_EXTRA if best_model else 0
    return ckpt + export + best + STAGE_EXTRA, ckpt + best


def min_free_setting(cfg: DictConfig) -> float | str:
    """`paths.min_free_gb`: "auto" or a number of GiB >= 0 (a one-line ConfigError otherwise)."""
    setting = cfg.paths.get("min_free_gb", "auto")
    if setting != "auto" and (isinstance(setting, bool) or not isinstance(setting, (int, float)) or setting < 0):
        raise ConfigError(f"paths.min_free_gb must be auto or a number of GiB >= 0, got {setting!r}")
    return setting


def disk_plan(cfg: DictConfig, plan: list[str], confs: dict, finished: set[str] = frozenset()) -> DiskPlan:
    """The floor for this run: `paths.min_free_gb` when a number, else the peak of what the stages in
    `plan` that are not `finished` will write."""
    from rlhf.stages import get_stage

    setting = min_free_setting(cfg)
    todo = [s for s in plan if s not in finished]
    if setting != "auto":
        return DiskPlan(int(setting * 2**30), None, len(todo), "paths.min_free_gb")
    counts = parameter_counts(cfg.model)
    if counts is None:  # the model cannot be read from here: loading it will fail with its own message
        return DiskPlan(0, None, len(todo), "auto")
    params, trainable = counts
    every = OmegaConf.select(cfg, "eval.eval_every", default=None)
    checkpoints = OmegaConf.select(cfg, "callbacks.model_checkpoint", default=None) is not None \
        and cfg.trainer.get("enable_checkpointing", True) is not False
    kept, transient = 0, 0
    for s in todo:
        cls = get_stage(s)
        left, extra = stage_bytes(params, cls.saved_models(confs[s]), cls.evaluates_policy and every is not None,
                                  checkpoints, trainable)
        kept, transient = kept + left, max(transient, extra)
    return DiskPlan(kept + transient, params, len(todo), "auto")


def disk_used(run_dir: Path) -> int:
    """Bytes of the files under `run_dir`, links not followed (`last.ckpt` is one)."""
    return sum(p.lstat().st_size for p in Path(run_dir).rglob("*") if p.is_file() and not p.is_symlink())
