"""Shared fixtures for the pipeline/stage tests: in-process Hydra composition and tiny trained artifacts.

`compose_cfg(tmp, *overrides)` composes `conf/train.yaml` exactly as `train.py` would (same
config dir, same schemas), pointed at a temporary run directory. `trained_artifacts` trains a
tiny SFT policy and a reward model once per session (SFT -> RM, the RM initialised from the SFT
export as in the full pipeline) so the PPO tests do not each pay for it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rlhf.training.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")

register_configs()  # the typed schemas behind conf/stages, conf/reward and conf/model, as train.py does

# Test-wide overrides: no progress bar, no end-of-run analysis report (plots cost seconds).
BASE_OVERRIDES = ["callbacks.progress_bar.refresh_rate=0", "++callbacks.analysis_report=null"]

# Small, fast stage settings on 2 CPU cores.
TINY_DATA = ["data.n_pairs=300"]
TINY_SFT = ["sft.batch_size=4", "sft.warmup_steps=2", "sft.max_response_length=24", "sft.val_batches=1"]
TINY_RM = ["rm.batch_size=8", "rm.warmup_steps=1", "rm.max_response_length=24", "rm.val_batches=1",
           "rm.normalize_samples=64"]
TINY_PPO = ["ppo.batch_size=8", "ppo.response_length=8", "ppo.eval_prompts=8", "ppo.max_prompt_length=48"]

# bf16-mixed on a CPU without bf16 instructions (AVX2 only) converts in software: the same run takes
# tens of times longer. Tests of bf16 numerics stay; full-size bf16 runs skip or use fp32 there.
from rlhf.training.plan import cpu_bf16_slowdown  # noqa: E402

NATIVE_BF16 = cpu_bf16_slowdown() <= 2

SFT_STEPS = 40
RM_STEPS = 5


def compose_train(output_dir, *overrides: str):
    """The root config with `overrides`, as `python train.py paths.output_dir=... OVERRIDES` sees it."""
    from rlhf.training.plan import apply_every_stage

    overrides = [f"paths.output_dir={output_dir}", *BASE_OVERRIDES, *overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    apply_every_stage(cfg, overrides)  # as train.py does: debug=fast's every_stage, under explicit settings
    return cfg


@pytest.fixture
def compose_cfg():
    return compose_train


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A directory for one test module's shared runs, removed when the module is done unless one of its
    tests failed: the suite's disk high-water mark stays at one module's runs, not every module's."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_artifacts(tmp_path_factory):
    """One tiny run of SFT then RM (algo=rm: SFT then RM); returns paths and the summary."""
    from rlhf.training.pipeline import train

    run = tmp_path_factory.mktemp("artifacts") / "run"
    cfg = compose_train(run, "stage=all", "algo=rm", *TINY_DATA, *TINY_SFT, *TINY_RM,
                        f"sft.max_steps={SFT_STEPS}", f"rm.max_steps={RM_STEPS}")
    summary = train(cfg)
    assert set(summary["stages"]) == {"sft", "rm"}
    return {"run": run, "sft": run / "sft" / "model", "rm": run / "rm" / "model", "summary": summary,
            "summary_json": json.loads((run / "summary.json").read_text())}
