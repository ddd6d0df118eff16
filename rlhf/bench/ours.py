"""Our side of `python -m rlhf.bench`: the project's real PPO, GRPO and reward-model stages, timed.

    python -m rlhf.bench.ours ARGS_JSON     (started by `python -m rlhf.bench`, one process per run)

The config is composed from conf/train.yaml exactly as `train.py` composes it, and the module,
datamodule and Lightning Trainer are built as `rlhf.training.pipeline.run_stage` builds them, minus the
checkpoint/metrics/progress callbacks, the logger and the end-of-stage export and evaluation
(none of which TRL's timed loop does either). A Lightning callback stamps the end of every update.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

from rlhf.bench.common import (Window, current_rss_mb, optimizer_name, peak_gpu_mb, peak_rss_mb, set_threads,
                               shape_from, write_result)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from rlhf.training.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _timer(warmup: int):
    import pytorch_lightning as pl

    class UpdateTimer(pl.Callback):
        def __init__(self):
            self.window = Window(warmup)

        def on_train_start(self, trainer, module):
            self.window.begin(getattr(module, "phase_seconds", None))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.window.step_end(getattr(module, "phase_seconds", None))

    return UpdateTimer()


def _probe(model):
    """A copy of one mid-network weight, to check after training that the optimizer moved it."""
    return next(p for n, p in model.named_parameters() if "h.0." in n and n.endswith("weight") and p.dim() == 2).detach().clone()


def _changed(model, before) -> bool:
    return not bool((_probe(model) == before).all())


def _fit(module, dm, cfg, steps: int, warmup: int, root: str):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    timer = _timer(warmup)
    trainer = instantiate(cfg.trainer, max_steps=steps, max_epochs=-1, logger=False, callbacks=[timer],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, default_root_dir=root)
    assert isinstance(trainer, pl.Trainer)
    trainer.fit(module, datamodule=dm)
    return timer.window, trainer.optimizers[0]


def run(a: dict, root: str) -> dict:
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf

    from rlhf.data import PreferenceDataModule, PreferencePair, PreferenceSplits
    from rlhf.training.memory import keep_freed_memory
    from rlhf.models.causal_lm import ModelConfig
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.training.plan import stage_config
    from rlhf.stages import Inputs

    import rlhf.stages.grpo  # noqa: F401  (the stages' imports count in the baseline RSS)
    import rlhf.stages.ppo  # noqa: F401
    import rlhf.stages.reward_model  # noqa: F401

    baseline_rss = current_rss_mb()
    s = shape_from(a["shape"])
    data = json.loads(Path(a["data"]).read_text())
    updates = a["warmup"] + a["updates"]
    precision = {"fp32": "32-true", "bf16": "bf16-mixed"}[a["precision"]]
    trainer = "trainer=gpu" if a.get("device") == "cuda" else "trainer=cpu"
    common = [f"paths.output_dir={root}", trainer, f"trainer.precision={precision}", f"seed={a['seed']}"]
    if a["kind"] == "ppo":
        # No stop token and no missing-EOS penalty (TRL's defaults); no gradient clipping, which TRL's
        # PPO loop never does (it steps the optimizer without clip_grad_norm).
        overrides = ["stage=ppo", f"ppo.policy_path={a['policy']}", f"reward.model_path={a['rm']}",
                     f"ppo.batch_size={s.batch}", f"ppo.response_length={s.response_length}",
                     f"ppo.num_ppo_epochs={s.ppo_epochs}", f"ppo.num_mini_batches={s.mini_batches}",
                     f"ppo.max_prompt_length={s.prompt_length}", f"ppo.max_steps={updates}",
                     "ppo.stop_token=null", "ppo.missing_eos_penalty=null", "ppo.max_grad_norm=null",
                     "ppo.temperature=1.0", "ppo.kl_coef=0.05", f"ppo.lr={a['lr']}",
                     f"ppo.weight_decay={a.get('weight_decay', 0.0)}"]
        key, prompts = "ppo", data["prompts"][: s.batch * updates]
        pairs = [PreferencePair(p, "", "") for p in prompts]
    elif a["kind"] == "grpo":
        # The same settings as TRL's side (rlhf/bench/trl_side.py:run_grpo); batch counts responses.
        overrides = ["stage=grpo", f"grpo.policy_path={a['policy']}", f"reward.model_path={a['rm']}",
                     f"grpo.batch_size={s.batch}", f"grpo.num_generations={s.num_generations}",
                     f"grpo.num_iterations={s.num_iterations}", f"grpo.num_mini_batches={s.mini_batches}",
                     f"grpo.response_length={s.response_length}", f"grpo.max_prompt_length={s.prompt_length}",
                     f"grpo.max_steps={updates}", f"grpo.beta={s.beta}", "grpo.loss_agg_mode=seq_mean_token_mean",
                     "grpo.scale_rewards=group", "grpo.stop_token=null", "grpo.missing_eos_penalty=null",
                     "grpo.max_grad_norm=null", "grpo.temperature=1.0", f"grpo.lr={a['lr']}",
                     f"grpo.weight_decay={a.get('weight_decay', 0.0)}",
                     f"grpo.shared_prefix={str(a.get('shared_prefix', True)).lower()}"]
        key = "grpo"
        pairs = [PreferencePair(p, "", "") for p in data["prompts_exact"][: s.batch // s.num_generations * updates]]
    else:
        overrides = ["stage=rm", f"rm.batch_size={s.batch}", f"rm.max_prompt_length={s.prompt_length}",
                     f"rm.max_response_length={s.rm_response_length}", f"rm.max_steps={updates}",
                     f"rm.lr={a['rm_lr']}", f"rm.weight_decay={a.get('weight_decay', 0.0)}"]
        key = "rm"
        pairs = [PreferencePair(**p) for p in data["pairs"][: s.batch * updates]]
    cfg = compose(common + overrides)
    if cfg.keep_freed_memory:  # as `rlhf.training.pipeline.train` does
        keep_freed_memory()
    pl.seed_everything(a["seed"], workers=True)
    cls, conf = stage_config(cfg, key)
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    if a["kind"] in ("ppo", "grpo"):
        tokenizer = load_tokenizer(a["policy"])
        module = cls(conf, model_cfg, Inputs(policy=a["policy"], reward_model=a["rm"]))
        watched = [module.policy, module.value_model] if a["kind"] == "ppo" else [module.policy]
    else:
        tokenizer = load_tokenizer(a["rm"])
        module = cls(conf, model_cfg, Inputs(policy=a["rm"], pad_token_id=tokenizer.pad_token_id))
        watched = [module.model]
    dm = PreferenceDataModule(PreferenceSplits(train=pairs, val=[]), tokenizer, cls.data_mode,
                              getattr(conf, "loader_batch_size", conf.batch_size),
                              conf.max_prompt_length, conf.max_response_length, seed=a["seed"])
    before = [_probe(m) for m in watched]
    per_batch = module.optimizer_steps_per_batch
    window, opt = _fit(module, dm, cfg, updates * per_batch, a["warmup"], root)
    phases = getattr(module, "phase_seconds", None) if a["kind"] != "rm" else None
    res = window.result(s.batch, phases)
    if res.get("seconds") is None:
        res["seconds"] = {"training": res["timed_seconds"]}
    res.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline_rss, threads=torch.get_num_threads(),
               device=a.get("device", "cpu"), peak_gpu_mb=peak_gpu_mb(),
               precision=a["precision"], weights_changed=all(_changed(m, b) for m, b in zip(watched, before)),
               config={"lightning_precision": precision, "optim": optimizer_name(opt),
                       "grad_clip": getattr(conf, "max_grad_norm", cfg.trainer.get("gradient_clip_val")),
                       "shared_prefix": bool(getattr(conf, "shares_prompts", False))})
    return res


def main() -> None:
    a = json.loads(sys.argv[1])
    set_threads(a["threads"])
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as root:
        write_result(a["out"], run(a, root))


if __name__ == "__main__":
    main()
