"""TRL's side of `python -m rlhf.bench --vs-trl`: TRL's PPOTrainer, GRPOTrainer and RewardTrainer on
the same weights, prompts and settings as ours, timed.

    python -m rlhf.bench.trl_side ARGS_JSON     (started by `python -m rlhf.bench --vs-trl`)

Needs the optional extra: pip install -e '.[bench]' (trl==1.12.0, the last release with PPO).
TRL is configured for equal work and no overhead of its own making: no logging, saving, progress
bar or sample generations; gradient checkpointing off (TRL's configs default it on, ours has none);
the same threads. bf16 is TRL's `bf16=True`; its PPOTrainer builds `Accelerator()` without passing
the precision on, so we also set ACCELERATE_MIXED_PRECISION=bf16, as `accelerate launch
--mixed_precision bf16` would: otherwise TRL's PPO silently runs in fp32.

Phase split of TRL's PPO: `batch_generation` (generation) and the first training forward of each
update are stamped by thin wrappers, and the last optimizer step's end; scoring is the time between
generation and training. GRPO: `_generate` is generation, the rest of `_generate_and_score_completions`
(rewards, old and reference log-probs) scoring, and from there to the update's last optimizer step
training. The wrappers only read the clock.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from rlhf.bench.common import (Window, current_rss_mb, optimizer_name, peak_gpu_mb, peak_rss_mb, set_threads,
                               shape_from, write_result)


def _import_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    return trl


def _probe(model):
    return next(p for n, p in model.named_parameters() if "h.0." in n and n.endswith("weight") and p.dim() == 2).detach().clone()


def _changed(model, before) -> bool:
    return not bool((_probe(model) == before).all())


def _callback(window: Window, phases: dict | None = None, steps_per_update: int = 1):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            window.begin(phases)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_update == 0:  # an update = one rollout's optimizer steps
                window.step_end(phases)

    return StepTimer()


def _quiet(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


def _phase_probes(mod, phases: dict):
    """Wrap TRL's module-level `batch_generation` and `forward` to stamp the phases of each update."""
    st = {"gen_end": None, "train_start": None, "last_opt": None, "model": None}
    orig_gen, orig_fwd = mod.batch_generation, mod.forward

    def close_update():
        if st["gen_end"] is not None and st["train_start"] is not None and st["last_opt"] is not None:
            phases["scoring"] += st["train_start"] - st["gen_end"]
            phases["training"] += st["last_opt"] - st["train_start"]
        st.update(gen_end=None, train_start=None, last_opt=None)

    def batch_generation(*a, **k):
        close_update()
        t = time.perf_counter()
        out = orig_gen(*a, **k)
        st["gen_end"] = time.perf_counter()
        phases["generation"] += st["gen_end"] - t
        return out

    def forward(model, *a, **k):
        if model is st["model"] and st["train_start"] is None:
            st["train_start"] = time.perf_counter()
        return orig_fwd(model, *a, **k)

    mod.batch_generation, mod.forward = batch_generation, forward

    def wrap_optimizer(trainer):
        st["model"] = trainer.model
        _stamp_optimizer_steps(trainer.optimizer, st)

    return wrap_optimizer, close_update


def _stamp_optimizer_steps(optimizer, st: dict) -> None:
    """`st["last_opt"]` = when the optimizer's latest step ended: the end of an update's training."""
    step = optimizer.step

    def timed_step(*a, **k):
        out = step(*a, **k)
        st["last_opt"] = time.perf_counter()
        return out

    optimizer.step = timed_step


def _close_phases_at_step_end(window: Window, close_update) -> None:
    """Close the update's phases before the window snapshots them at each update's end."""
    orig = window.step_end

    def step_end(ph=None):
        close_update()
        orig(ph)

    window.step_end = step_end


def _load(cls, path: str, a: dict, **kw):
    """A model as a TRL user loads it or, with `--trl-kernels ours`, with our loader's attention kernel and
    one-kernel GELU (rlhf/models/causal_lm.py), so that the ratio measures the loops alone."""
    if a.get("kernels") != "ours":
        return cls.from_pretrained(path, **kw)
    from rlhf.models.causal_lm import ModelConfig, fast_gelu

    return fast_gelu(cls.from_pretrained(path, attn_implementation=ModelConfig().attention, **kw))


def run_ppo(a: dict, s, data: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl.experimental.ppo.ppo_trainer as mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    updates = a["warmup"] + a["updates"]
    # Ours (rlhf/stages/ppo.py): torch AdamW, lr 3e-4 annealed linearly to 0 over the run, eps 1e-5,
    # weight decay --weight-decay (0.0 by default on both sides), no clipping; k1 KL at 0.05; vf_coef, clip ranges, gamma
    # and lam at the defaults both share.
    tok = AutoTokenizer.from_pretrained(a["policy"], padding_side="left")
    tok.pad_token = tok.eos_token
    ids = data["prompt_ids"][: s.batch * updates]
    train = Dataset.from_dict({"input_ids": ids})
    evald = Dataset.from_dict({"input_ids": ids[: s.batch]})
    args = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s.batch, gradient_accumulation_steps=1,
        num_mini_batches=s.mini_batches, num_ppo_epochs=s.ppo_epochs, response_length=s.response_length,
        total_episodes=s.batch * updates, learning_rate=a["lr"], adam_epsilon=1e-5, weight_decay=a.get("weight_decay", 0.0),
        kl_coef=0.05, temperature=1.0, stop_token=None, missing_eos_penalty=None,
        local_rollout_forward_batch_size=s.batch, num_sample_generations=0, report_to=[],
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False, bf16=a["precision"] == "bf16", use_cpu=a.get("device", "cpu") == "cpu", seed=a["seed"],
        sft_model_path=a["policy"], reward_model_path=a["rm"], dataloader_num_workers=0)
    policy = _load(AutoModelForCausalLM, a["policy"], a)
    ref = _load(AutoModelForCausalLM, a["policy"], a)
    reward = _load(AutoModelForSequenceClassification, a["rm"], a, num_labels=1)
    value = _load(AutoModelForSequenceClassification, a["rm"], a, num_labels=1)
    phases = {"generation": 0.0, "scoring": 0.0, "training": 0.0}
    wrap_optimizer, close_update = _phase_probes(mod, phases)
    window = Window(a["warmup"])
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=evald,
                         callbacks=[_callback(window, phases)])
    _quiet(trainer)
    wrap_optimizer(trainer)
    _close_phases_at_step_end(window, close_update)
    before = [_probe(policy), _probe(value)]
    trainer.train()
    res = window.result(s.batch, phases)
    res.update(weights_changed=all(_changed(m, b) for m, b in zip((policy, value), before)),
               config={"accelerate_mixed_precision": trainer.accelerator.mixed_precision,
                       "optim": optimizer_name(trainer.optimizer), "gradient_checkpointing": args.gradient_checkpointing})
    return res


def run_grpo(a: dict, s, data: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from trl import GRPOConfig, GRPOTrainer

    updates = a["warmup"] + a["updates"]
    steps_per_update = s.num_iterations * s.mini_batches
    # Ours (rlhf/stages/grpo.py, settings in rlhf/bench/ours.py): `batch` responses per rollout in groups
    # of num_generations, num_iterations passes of mini_batches optimizer steps each, loss "grpo", group
    # scaling, k3 KL at beta, AdamW eps 1e-5 at lr annealed linearly to 0, no clipping, no stop token.
    # TRL: per_device_train_batch_size x steps_per_generation = the same responses per generation.
    tok = AutoTokenizer.from_pretrained(a["policy"], padding_side="left")
    tok.pad_token = tok.eos_token
    n_prompts = s.batch // s.num_generations * updates
    train = Dataset.from_dict({"prompt": data["prompts_exact"][:n_prompts]})
    kernels = None  # TRL loads the reference model itself, with these from_pretrained arguments
    if a.get("kernels") == "ours":
        from rlhf.models.causal_lm import ModelConfig

        kernels = {"attn_implementation": ModelConfig().attention}
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s.batch // s.mini_batches, gradient_accumulation_steps=1,
        steps_per_generation=s.mini_batches, num_generations=s.num_generations, num_iterations=s.num_iterations,
        max_completion_length=s.response_length, max_steps=updates * steps_per_update, learning_rate=a["lr"],
        lr_scheduler_type="linear", warmup_steps=0, adam_epsilon=1e-5, weight_decay=a.get("weight_decay", 0.0),
        max_grad_norm=0.0, beta=s.beta, loss_type="grpo", scale_rewards="group", epsilon=0.2, temperature=1.0,
        report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, gradient_checkpointing=False, bf16=a["precision"] == "bf16",
        use_cpu=a.get("device", "cpu") == "cpu", seed=a["seed"], dataloader_num_workers=0,
        model_init_kwargs=kernels)
    policy = _load(AutoModelForCausalLM, a["policy"], a)
    reward = _load(AutoModelForSequenceClassification, a["rm"], a, num_labels=1)
    phases = {"generation": 0.0, "scoring": 0.0, "training": 0.0}
    window = Window(a["warmup"])
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=train, processing_class=tok,
                          reward_processing_classes=tok, callbacks=[_callback(window, phases, steps_per_update)])
    _quiet(trainer)
    if a.get("kernels") == "ours" and trainer.ref_model is not None:  # TRL loads the reference itself
        from rlhf.models.causal_lm import fast_gelu

        fast_gelu(trainer.ref_model)
    st = {"score_end": None, "last_opt": None}
    generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions

    def close_update():
        if st["score_end"] is not None and st["last_opt"] is not None:
            phases["training"] += st["last_opt"] - st["score_end"]
        st.update(score_end=None, last_opt=None)

    def timed_generate(*args_, **kw):
        t = time.perf_counter()
        out = generate(*args_, **kw)
        phases["generation"] += time.perf_counter() - t
        return out

    def timed_generate_and_score(*args_, **kw):
        close_update()
        t, g = time.perf_counter(), phases["generation"]
        out = generate_and_score(*args_, **kw)
        st["score_end"] = time.perf_counter()
        phases["scoring"] += st["score_end"] - t - (phases["generation"] - g)
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_generate_and_score
    trainer.create_optimizer()  # so that its step can be stamped; Trainer keeps an existing optimizer
    _stamp_optimizer_steps(trainer.optimizer, st)
    _close_phases_at_step_end(window, close_update)
    before = _probe(policy)
    trainer.train()
    res = window.result(s.batch, phases)
    res.update(weights_changed=_changed(trainer.model, before),
               config={"accelerate_mixed_precision": trainer.accelerator.mixed_precision,
                       "optim": optimizer_name(trainer.optimizer), "gradient_checkpointing": args.gradient_checkpointing,
                       "loss_type": args.loss_type, "steps_per_generation": args.steps_per_generation,
                       "reference_model": trainer.ref_model is not None})
    return res


def run_rm(a: dict, s, data: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trl import RewardConfig, RewardTrainer

    updates = a["warmup"] + a["updates"]
    tok = AutoTokenizer.from_pretrained(a["rm"])
    tok.pad_token = tok.eos_token
    n = s.batch * updates
    train = Dataset.from_dict({"chosen_ids": data["chosen_ids"][:n], "rejected_ids": data["rejected_ids"][:n]})
    # Ours: AdamW lr 1e-3, weight decay --weight-decay (0.0 by default), linear warm-up 20 steps then linear decay, no clipping.
    args = RewardConfig(
        output_dir=out_dir, per_device_train_batch_size=s.batch, gradient_accumulation_steps=1, max_steps=updates,
        learning_rate=a["rm_lr"], weight_decay=a.get("weight_decay", 0.0), lr_scheduler_type="linear", warmup_steps=20, max_grad_norm=0.0,
        report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False, bf16=a["precision"] == "bf16", use_cpu=a.get("device", "cpu") == "cpu", seed=a["seed"],
        max_length=None, center_rewards_coefficient=None, dataloader_num_workers=0)
    model = _load(AutoModelForSequenceClassification, a["rm"], a, num_labels=1)
    window = Window(a["warmup"])
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                            callbacks=[_callback(window)])
    _quiet(trainer)
    before = _probe(model)
    trainer.train()
    res = window.result(s.batch)
    res["seconds"] = {"training": res["timed_seconds"]}
    res.update(weights_changed=_changed(model, before),
               config={"accelerate_mixed_precision": trainer.accelerator.mixed_precision,
                       "optim": optimizer_name(trainer.optimizer), "gradient_checkpointing": args.gradient_checkpointing})
    return res


def main() -> None:
    a = json.loads(sys.argv[1])
    if a["precision"] == "bf16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # see the module docstring
    set_threads(a["threads"])
    if a.get("kernels") == "ours":
        from rlhf.training.memory import keep_freed_memory

        keep_freed_memory()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trl = _import_trl()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from trl import GRPOTrainer, RewardTrainer  # noqa: F401  (imports before the baseline RSS)
    from trl.experimental.ppo import PPOTrainer  # noqa: F401

    baseline_rss = current_rss_mb()
    s = shape_from(a["shape"])
    data = json.loads(Path(a["data"]).read_text())
    torch.manual_seed(a["seed"])
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        res = {"ppo": run_ppo, "grpo": run_grpo, "rm": run_rm}[a["kind"]](a, s, data, out_dir)
    res.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline_rss, threads=torch.get_num_threads(), precision=a["precision"],
               device=a.get("device", "cpu"), peak_gpu_mb=peak_gpu_mb(),
               trl_version=trl.__version__)
    res["config"]["kernels"] = a.get("kernels", "trl")
    write_result(a["out"], res)


if __name__ == "__main__":
    main()
