"""Train: SFT -> reward model -> PPO (or GRPO, RLOO, DPO) on a Hugging Face causal LM.

    python train.py                                   # tiny GPT-2, synthetic data, CPU, a few minutes
    python train.py algo=grpo                         # SFT -> reward model -> GRPO
    python train.py model=gpt2 lr=3e-5                # real GPT-2
    python train.py -m algo=ppo,grpo lr=1e-4,3e-4 kl_coef=0.02,0.05   # sweep

A thin Hydra wrapper around `rlhf.training.pipeline.train`.
"""
import sys

import hydra
from omegaconf import DictConfig

from rlhf.training.config import register_configs

register_configs()  # typed schemas behind conf/stages, conf/reward and conf/model


def _resume_into_run_dir(argv: list[str]) -> None:
    """`resume=RUN_DIR` writes into that directory: point Hydra's run dir there before it starts."""
    import time

    for arg in argv[1:]:
        if arg.startswith("resume=") and arg.split("=", 1)[1] not in ("", "null"):
            argv += [f"hydra.run.dir={arg.split('=', 1)[1]}",
                     f"hydra.output_subdir=.hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}"]


def _remove_refused_run_dir(path: str) -> None:
    """A refused config leaves no run directory: remove the one Hydra made when it holds only what Hydra
    and the pipeline wrote before the refusal (.hydra/, train.log, config.yaml), never anything else."""
    import logging
    import shutil
    from pathlib import Path

    run = Path(path)
    if run.is_dir() and {p.name for p in run.iterdir()} <= {".hydra", "train.log", "config.yaml"}:
        logging.shutdown()  # release train.log before removing it
        shutil.rmtree(run, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from rlhf.data import DataError
    from rlhf.errors import UserError
    from rlhf.training.pipeline import train

    from hydra.core.hydra_config import HydraConfig

    from rlhf.training.plan import apply_every_stage

    overrides = list(HydraConfig.get().overrides.task)
    try:
        if cfg.get("resume"):
            from rlhf.training.pipeline import resume_config

            cfg = resume_config(cfg.resume, overrides)
        apply_every_stage(cfg, overrides)  # debug=fast's every_stage, under what the command line set
        summary = train(cfg)
    except (UserError, DataError) as e:
        if not cfg.get("resume"):
            _remove_refused_run_dir(cfg.paths.output_dir)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # Hydra sweepers that optimise (Optuna) read the task's return value.
    key = cfg.get("optimized_metric")
    if key:
        if key not in summary:
            print(f"error: optimized_metric={key!r} is not in summary.json (keys: {sorted(summary)})", file=sys.stderr)
            sys.exit(1)
        return float(summary[key])
    return None


if __name__ == "__main__":
    _resume_into_run_dir(sys.argv)
    main()
