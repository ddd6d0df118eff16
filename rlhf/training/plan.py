"""The plan of a run and everything checked before any model is built.

`plan_stages` picks the stages `algo` needs from the registry (what each stage needs and
produces); `preflight` validates each stage's config once, the inputs each stage needs (policy
and reward model paths, reward functions), and the output directory, each failure one line.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from rlhf.errors import ConfigError, UserError
from rlhf.models.causal_lm import ModelConfig
from rlhf.models.reward import check_reward_model
from rlhf.stages import Inputs, get_stage, stages
from rlhf.training.disk import DiskPlan, disk_plan, min_free_setting
from rlhf.training.rewards import RewardConfig, load_functions, sources

log = logging.getLogger(__name__)


def cpu_bf16_slowdown(n: int = 256) -> float:
    """How many times slower a bf16 matmul is than an fp32 one on this CPU (best of 3 each).

    Below 1 where the CPU has bf16 instructions (AVX-512 BF16, AMX); tens where it has not
    (AVX2 only: PyTorch converts in software), where bf16-mixed makes a run many times slower.
    """
    import torch

    def best(dtype) -> float:
        a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def apply_root_settings(cfg: DictConfig) -> None:
    """The root `lr` and `kl_coef` (when set) become the settings of the stage that optimises the
    policy against a KL (`kl_field`): one sweep `-m algo=ppo,grpo lr=... kl_coef=...` covers them all."""
    target = cfg.algo if cfg.stage == "all" else cfg.stage
    cls = get_stage(target)
    if cls.produces != "policy" or cls.order < 2 or cfg.get(target) is None:
        return  # SFT and the reward model keep their own lr
    with open_dict(cfg):
        if cfg.get("lr") is not None:
            cfg[target].lr = cfg.lr
        if cfg.get("kl_coef") is not None and cls.kl_field is not None:
            cfg[target][cls.kl_field] = cfg.kl_coef


def apply_every_stage(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """`every_stage: {key: value}` (the `debug=fast` overlay) sets `key` on every registered stage whose
    settings have it, so an added stage is shortened too. A `STAGE.KEY=...` in `overrides` (the command
    line) wins over it; a batch size its settings cannot divide (a group size, minibatches) is left as it
    was rather than refused. Applied once: `every_stage` is cleared afterwards, so the saved config holds
    the values each stage ran with and a resumed run keeps them."""
    import dataclasses

    every = cfg.get("every_stage")
    if not every:
        return
    given_by_user = {item.lstrip("+~").partition("=")[0] for item in overrides}
    with open_dict(cfg):
        for name, cls in stages().items():
            node = cfg.get(name)
            if node is None:
                continue
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            given = {k: v for k, v in OmegaConf.to_container(every, resolve=True).items()
                     if k in fields and f"{name}.{k}" not in given_by_user}
            current = OmegaConf.to_container(node, resolve=True)
            try:
                cls.Config(**{**current, **given})
            except (ValueError, TypeError):
                given.pop("batch_size", None)
            for k, v in given.items():
                node[k] = v
        cfg.every_stage = None


def apply_task_reward(cfg: DictConfig) -> None:
    """A task whose data class declares `reward_fn` (a dotted path: arithmetic's verifier) rewards the online
    stages with it when the user names no reward source, so no reward model is trained; `reward.fn` or
    `reward.model_path` on the command line replace it."""
    from rlhf.data.pairs import task_class

    target = OmegaConf.select(cfg, "data._target_")
    rc = cfg.get("reward")
    if not target or rc is None or rc.get("fn") is not None or rc.get("model_path") is not None:
        return
    try:
        default = getattr(task_class(target), "reward_fn", None)
    except Exception as e:  # an unimportable _target_: one line, before anything is built
        raise ConfigError(f"data._target_={target}: cannot be imported ({e})") from None
    if default:
        with open_dict(cfg):
            cfg.reward.fn = default


def _reward_config(cfg: DictConfig):
    return cfg.get("reward") or RewardConfig()


def _given_by_user(cfg: DictConfig, stage: str, need: str) -> bool:
    if need == "policy":
        return cfg[stage].get("policy_path") is not None
    if need == "reward":  # a reward model path or reward functions: no rm stage to run
        rc = _reward_config(cfg)
        return rc.get("model_path") is not None or rc.get("fn") is not None
    return False


def _producer(need: str) -> str:
    """The stage that makes `need` from nothing (SFT for a policy, RM for a reward)."""
    for name, cls in stages().items():
        if cls.produces == need and need not in cls.needs:
            return name
    raise ConfigError(f"no stage produces {need!r}")


def plan_stages(cfg: DictConfig) -> list[str]:
    """`stage=all`: `algo` and every stage it needs (or uses), unless a path or reward.fn provides it."""
    known = stages()
    algo = cfg.get("algo")
    if algo not in known:
        raise ConfigError(f"algo={algo}: unknown algorithm; expected one of {', '.join(known)}")
    if cfg.stage != "all":
        if cfg.stage not in known:
            raise ConfigError(f"stage={cfg.stage}: unknown stage; expected all or one of {', '.join(known)}")
        return [cfg.stage]
    plan: list[str] = []

    def add(name: str) -> None:
        cls = known[name]
        for need in (*cls.needs, *cls.uses):
            if not _given_by_user(cfg, name, need):
                add(_producer(need))
        if name not in plan:
            plan.append(name)

    add(algo)
    return sorted(plan, key=list(known).index)


def stage_config(cfg: DictConfig, stage: str):
    cls = get_stage(stage)
    node = cfg.get(stage)
    if node is None:
        raise ConfigError(f"stage {stage}: no '{stage}' settings in the config")
    return cls, cls.Config.from_dict(OmegaConf.to_container(node, resolve=True), stage)


def build_stage(cfg: DictConfig, stage: str, inputs: Inputs, conf=None):
    """The stage's LightningModule from the composed config: its typed settings, the model config, its inputs."""
    cls, parsed = stage_config(cfg, stage)
    return cls(conf or parsed, ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)), inputs)


@dataclass
class RewardPlan:
    """The reward online stages get: a reward model path (or this run's RM), and loaded functions."""
    spec: object
    fns: object


def check_inputs(cfg: DictConfig, plan: list[str], confs: dict) -> RewardPlan | None:
    """Every stage's needs are met by an earlier stage of the plan or by a path, reward model paths
    and reward functions load: one line before any model is built."""
    known = stages()
    produced = set()
    reward = None
    for name in plan:
        cls, conf = known[name], confs[name]
        path = getattr(conf, "policy_path", None)
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{name}.policy_path '{path}' has no config.json (not a saved model)")
        for need in cls.needs:
            if need == "policy" and (path is not None or "policy" in produced or cfg.model.get("name_or_path")
                                     or cfg.model.get("arch")):
                continue  # a policy path, an earlier stage's export, or the model config's own weights
            if need == "reward":
                try:
                    spec = sources(_reward_config(cfg), has_rm_stage="reward" in produced)
                except ConfigError as e:
                    raise ConfigError(f"{name}: {e}") from None
                if spec.model_path is not None:
                    try:
                        check_reward_model(spec.model_path)
                    except (FileNotFoundError, ValueError) as e:
                        raise ConfigError(f"reward.model_path: {e}") from None
                reward = RewardPlan(spec, load_functions(spec))
                continue
            if need not in produced:
                raise ConfigError(f"{name} needs a {need}, which no earlier stage of {' -> '.join(plan)} produces")
        if cls.produces:
            produced.add(cls.produces)
    return reward


def check_eval(cfg: DictConfig) -> None:
    """eval.* and the health alarms' action: each stage's callbacks are built only when it starts."""
    ev = cfg.get("eval") or {}
    every = ev.get("eval_every")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every <= 0):
        raise ConfigError(f"eval.eval_every must be a positive integer or null, got {every!r}")
    n = ev.get("eval_prompts")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise ConfigError(f"eval.eval_prompts must be a positive integer or null, got {n!r}")
    samples = ev.get("num_samples", 8)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise ConfigError(f"eval.num_samples must be a positive integer, got {samples!r}")
    temperature = ev.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"eval.temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    ks = ev.get("pass_k", [1])
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= samples for k in ks):
        raise ConfigError(f"eval.pass_k must be a list of integers in [1, eval.num_samples={samples}], got {list(ks)}")
    if ev.get("best_metric", "auto") not in ("auto", "gold", "reward"):
        raise ConfigError(f"eval.best_metric must be auto, gold or reward, got {ev.get('best_metric')!r}")
    if ev.get("gold_reward_model_path"):
        try:
            check_reward_model(str(ev.gold_reward_model_path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"eval.gold_reward_model_path: {e}") from None
    action = OmegaConf.select(cfg, "callbacks.health.on_alarm", default="warn")
    if action not in ("warn", "stop"):
        raise ConfigError(f"callbacks.health.on_alarm must be warn or stop, got {action!r}")


def preflight(cfg: DictConfig, plan: list[str], run_dir: Path, resuming: bool = False) -> tuple[dict, RewardPlan | None]:
    """All checks that need no model: returns the validated stage configs and the reward plan."""
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    if mc.name_or_path and mc.name_or_path.startswith(("/", "./", "../", "~")) \
            and not Path(mc.name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path={mc.name_or_path}: no such directory")
    steps = cfg.trainer.get("max_steps")
    if steps is not None and steps <= 0:
        raise ConfigError(f"trainer.max_steps must be > 0, got {steps}")
    precision = str(cfg.trainer.get("precision", ""))
    if precision.startswith("bf16") and cfg.trainer.get("accelerator") in ("cpu", "auto", None):
        import torch

        if not torch.cuda.is_available() and (slow := cpu_bf16_slowdown()) > 2:
            log.warning("trainer.precision=%s: this CPU has no bf16 matmul instructions (bf16 is %.0fx slower "
                        "than fp32 here); trainer.precision=32-true will be much faster", precision, slow)
    confs = {}
    for s in plan:
        cls, conf = stage_config(cfg, s)
        cls.preflight(conf, plan, cfg)
        confs[s] = conf
    reward = check_inputs(cfg, plan, confs)
    check_eval(cfg)
    min_free_setting(cfg)
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
    return confs, reward


def check_disk(cfg: DictConfig, plan: list[str], confs: dict, run_dir: Path, resuming: bool) -> DiskPlan:
    """The last check before any work: room for what the run will write (`paths.min_free_gb`)."""
    summary = run_dir / "summary.json"
    finished = set(json.loads(summary.read_text()).get("stages", {})) if resuming and summary.is_file() else set()
    disk = disk_plan(cfg, plan, confs, finished)
    free = shutil.disk_usage(run_dir).free
    if free < disk.need_bytes:
        raise UserError(f"output directory {run_dir} has {free / 2**30:.1f} GiB free; {disk.describe()} "
                        "(checkpoints and exports need the room: free space, or set paths.min_free_gb)")
    log.info("disk: %s; %.1f GiB free in %s", disk.describe(), free / 2**30, run_dir)
    return disk
