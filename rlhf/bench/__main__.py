"""Time the project's PPO and GRPO loops and reward-model training, optionally against TRL on the same work.

    python -m rlhf.bench                  # PPO, GRPO, RM on 4 layers x 256 (batch 16); PPO, GRPO on GPT-2 small (batch 8)
    python -m rlhf.bench --vs-trl         # + TRL on the same work (pip install -e '.[bench]')
    python -m rlhf.bench --algo grpo --vs-trl --preset gpt2
    python -m rlhf.bench --preset small --kind rm --precision fp32
    python -m rlhf.bench --preset small --layers 1 --dim 32 --heads 2 --batch 4 --episodes 8 --warmup 1
    python -m rlhf.bench --preset gpt2 --vs-trl --device cuda   # both sides on the GPU (trainer=gpu; TRL use_cpu=False)
    python -m rlhf.bench --scaling bench-scaling   # ours over response length x batch: table, fits, figure
    python -m rlhf.bench --kind generate           # decoding: ms per step and bandwidth use, ours vs generate
                                                   # (rlhf/bench/decode.py; default --preset gpt2)

Prints one JSON line per measurement on stdout (progress goes to stderr):
  {"kind": "ppo"|"grpo"|"rm", "impl": "ours"|"trl", "shape", "episodes_per_s"|"pairs_per_s", "seconds"
   (generation/scoring/training/other of the timed window), "peak_rss_mb", "threads", "precision",
   "mfu", "peak_tflops", ...}
and with --vs-trl one comparison line per kind: {"kind", "shape", "ours", "trl", "ratio" (ours/trl),
"ours_peak_rss_mb", "trl_peak_rss_mb", "mfu", "trl_mfu", "precision", "trl_precision", ...}.
GRPO's batch counts responses (batch / num_generations prompts per update), as TRL's does.

How: the random-init models (fixed seed) and the prompts are built once here and saved to a
temporary directory; every measurement is a fresh subprocess (`rlhf.bench.ours`,
`rlhf.bench.trl_side`) that loads them, so each side's peak RSS is its own. Sides alternate
(ours, trl, ours, trl, ... for --rounds rounds) and the best round of each is reported (all rounds
are listed under "rounds"). The first --warmup updates are not timed. MFU = model FLOPs per second
(rlhf/bench/common.py documents the count) / this machine's matmul peak at the run's precision,
measured here with the same thread count before and after each kind's runs (the best is kept).
Precision `auto` is bf16 where the machine has bf16 instructions (CUDA, AVX-512 BF16, AMX) and
fp32 elsewhere: on an AVX2-only CPU a bf16 matmul is emulated and tens of times slower.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from rlhf.bench.common import (SEED, Shape, build_models, flops_per_episode, machine_name, make_data,
                               matmul_peak_tflops, rm_flops_per_pair, set_threads, shape_dict)

PRESETS = {  # shape, then what runs on it by default (--kind and --episodes override)
    "small": (dict(layers=4, dim=256, heads=4, vocab=50257, batch=16), dict(kinds="ppo,grpo,rm", episodes=64)),
    "gpt2": (dict(layers=12, dim=768, heads=12, vocab=50257, batch=8), dict(kinds="ppo,grpo", episodes=32)),
}
KINDS = ("ppo", "grpo", "rm", "generate")
SHAPE_FLAGS = ("layers", "dim", "heads", "vocab", "batch", "prompt_length", "response_length", "ppo_epochs",
               "mini_batches", "rm_response_length", "num_generations", "num_iterations")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rlhf.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--kind", "--algo", dest="kind", default=None,
                    help="comma list of ppo, grpo, rm (default: small: ppo,grpo,rm; gpt2: ppo,grpo); or generate "
                         "alone: decoding speed (--batches, --response-lengths, --prompt-length, --precision)")
    ap.add_argument("--preset", default="small,gpt2",
                    help="comma list of " + ", ".join(PRESETS) + ": shapes, run one after the other (flags override)")
    for f in SHAPE_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None,
                    help="timed PPO episodes, rounded up to whole batches (default: small 64, gpt2 32)")
    ap.add_argument("--pairs", type=int, default=256, help="timed RM pairs (rounded up to whole batches)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="ours (bf16: Lightning's bf16-mixed; auto: bf16 on CUDA and on CPUs with bf16 instructions, "
                         "else fp32)")
    ap.add_argument("--trl-precision", choices=("best", "same", "fp32", "bf16"), default="best",
                    help="best: run TRL in fp32 and (where the machine has bf16 instructions) in bf16, and compare "
                         "against the faster")
    ap.add_argument("--trl-kernels", choices=("trl", "ours"), default="trl",
                    help="trl: TRL's models as transformers loads them; ours: with our attention kernel, GELU and "
                         "allocator setting too, so the ratio measures the loops alone")
    ap.add_argument("--shared-prefix", choices=("on", "off"), default="on",
                    help="ours, GRPO: each group's prompt run once in every pass (grpo.shared_prefix, the default); "
                         "off: once per response, as TRL does")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where both sides run (auto: cuda when available, else cpu)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side is reported")
    ap.add_argument("--vs-trl", action="store_true", help="also run TRL's PPOTrainer / RewardTrainer")
    ap.add_argument("--lr", type=float, default=3e-4, help="PPO learning rate (both sides)")
    ap.add_argument("--rm-lr", type=float, default=1e-3, help="RM learning rate (both sides)")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="AdamW weight decay, both sides and both kinds (default 0.0, as ours and TRL default)")
    ap.add_argument("--scaling", metavar="DIR", default=None,
                    help="sweep ours over --response-lengths x --batches on the first preset's shape (one --kind: ppo "
                         "or grpo) and write DIR/scaling.{csv,md,png,json} (rlhf/bench/scaling.py)")
    ap.add_argument("--response-lengths", default="32,64,128,256", help="--scaling: comma list of response tokens")
    ap.add_argument("--batches", default=None, help="--scaling: comma list of batch sizes (default 8,16,32); "
                    "--kind generate: default 1,8,32")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    a = ap.parse_args(argv)
    a.generate = a.kind == "generate"
    if a.generate:  # decoding alone, on one shape: GPT-2 small unless a preset is named
        if a.vs_trl or a.scaling is not None:
            ap.error("--kind generate compares against transformers' generate itself; no --vs-trl or --scaling")
        a.preset = a.preset if a.preset != "small,gpt2" else "gpt2"
        a.kind = None
    a.batches = a.batches or ("1,8,32" if a.generate else "8,16,32")
    names = [n.strip() for n in a.preset.split(",") if n.strip()]
    if not names or set(names) - set(PRESETS):
        ap.error(f"--preset {a.preset!r}: expected a comma list of {', '.join(PRESETS)}")
    a.plans = []  # (shape, kinds, episodes) per preset
    for name in names:
        shape, defaults = PRESETS[name]
        kinds = [k.strip() for k in (a.kind or defaults["kinds"]).split(",") if k.strip()]
        if not kinds or set(kinds) - set(KINDS) or (len(kinds) > 1 and "generate" in kinds):
            ap.error(f"--kind {a.kind!r}: expected a comma list of {', '.join(KINDS)}")
        s = replace(Shape(), **{**shape, **{f: getattr(a, f) for f in SHAPE_FLAGS if getattr(a, f) is not None}})
        if s.batch % s.mini_batches:
            ap.error(f"--batch {s.batch} is not divisible by --mini-batches {s.mini_batches}")
        if "grpo" in kinds and not grpo_splits(s, s.batch):
            ap.error(f"grpo: --batch {s.batch} (responses) must split into groups of --num-generations "
                     f"{s.num_generations} (>= 2) in each of --mini-batches {s.mini_batches}")
        if s.dim % s.heads:
            ap.error(f"--dim {s.dim} is not divisible by --heads {s.heads}")
        a.plans.append((s, kinds, a.episodes or defaults["episodes"]))
    if a.scaling is not None or a.generate:
        try:
            a.sweep_lengths = [int(x) for x in a.response_lengths.split(",") if x.strip()]
            a.sweep_batches = [int(x) for x in a.batches.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--response-lengths {a.response_lengths!r} / --batches {a.batches!r}: expected comma lists of integers")
        if not a.sweep_lengths or not a.sweep_batches or min(a.sweep_lengths + a.sweep_batches) <= 0:
            ap.error("--response-lengths and --batches need positive integers")
        if a.generate and min(a.sweep_lengths) < 2:
            ap.error("--kind generate: --response-lengths must be >= 2 (a step's time is (R - 1) steps' over R - 1)")
    if a.scaling is not None:
        kinds = a.plans[0][1] if a.kind else ["ppo"]
        if len(kinds) != 1 or kinds[0] == "rm":
            ap.error(f"--scaling times one online algorithm: --kind ppo or --kind grpo, got {a.kind!r}")
        if a.vs_trl:
            ap.error("--scaling times ours only; run --vs-trl separately")
        s0 = a.plans[0][0]
        for b in a.sweep_batches:
            if b % s0.mini_batches or (kinds[0] == "grpo" and not grpo_splits(s0, b)):
                ap.error(f"--batches: {b} does not split into --mini-batches {s0.mini_batches}"
                         + (f" of groups of {s0.num_generations}" if kinds[0] == "grpo" else ""))
        a.plans = [(s0, kinds, a.episodes or 64)]
    if min(a.pairs, a.rounds, a.threads) <= 0 or (a.episodes is not None and a.episodes <= 0) or a.warmup < 0:
        ap.error("--episodes, --pairs, --rounds and --threads must be > 0, --warmup >= 0")
    if a.vs_trl and importlib.util.find_spec("trl") is None:
        ap.error("--vs-trl needs TRL: pip install -e '.[bench]'")
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    native_bf16 = a.device == "cuda" or _cpu_has_bf16()
    if a.precision == "auto":
        a.precision = "bf16" if native_bf16 else "fp32"
    best = ["fp32", "bf16"] if native_bf16 else ["fp32"]
    a.trl_precisions = {"best": best, "same": [a.precision]}.get(a.trl_precision, [a.trl_precision])
    if not native_bf16:
        log("this CPU has no bf16 instructions (bf16 matmuls run many times slower than fp32): "
            f"ours in {a.precision}, TRL in {', '.join(a.trl_precisions)}")
    return a


def _cpu_has_bf16() -> bool:
    from rlhf.training.plan import cpu_bf16_slowdown

    return cpu_bf16_slowdown() <= 2


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def job_for(a, kind: str, s: Shape, dirs: dict, tmp: Path, updates: int) -> dict:
    """What one measurement subprocess is told (its side and precision are added by the caller)."""
    return {"kind": kind, "shape": shape_dict(s), "policy": dirs["policy"], "rm": dirs["rm"],
            "data": str(tmp / "data.json"), "warmup": a.warmup, "updates": updates, "threads": a.threads,
            "seed": a.seed, "lr": a.lr, "rm_lr": a.rm_lr, "weight_decay": a.weight_decay,
            "kernels": a.trl_kernels, "device": a.device, "shared_prefix": a.shared_prefix == "on"}


def grpo_splits(s: Shape, batch: int) -> bool:
    """Whether `batch` responses split into --mini-batches of whole groups of --num-generations."""
    return s.num_generations >= 2 and batch % (s.num_generations * s.mini_batches) == 0


def run_side(impl: str, job: dict, a, tmp: Path) -> dict:
    out = tmp / f"result-{impl}-{job['kind']}-{job['precision']}.json"
    out.unlink(missing_ok=True)
    job = {**job, "out": str(out)}
    module = "rlhf.bench.ours" if impl == "ours" else "rlhf.bench.trl_side"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(job)], env=env, capture_output=True,
                          text=True, timeout=a.timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        raise SystemExit(f"{impl} {job['kind']} ({job['precision']}) failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(out.read_text())


def unit_of(kind: str) -> str:
    return "pairs_per_s" if kind == "rm" else "episodes_per_s"


def summarise(kind: str, impl: str, runs: list[dict], s: Shape, flops_per_item: float, peaks: dict) -> dict:
    best = max(runs, key=lambda r: r["items_per_s"])
    unit = unit_of(kind)
    peak = peaks[best["precision"]]
    rate = best["items_per_s"]
    return {"kind": kind, "impl": impl, "shape": s.id(kind), unit: round(rate, 4),
            "seconds": {k: round(v, 3) for k, v in best["seconds"].items()},
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "baseline_rss_mb": round(best.get("baseline_rss_mb", 0.0), 1), "threads": best["threads"],
            "device": best.get("device", "cpu"), "peak_gpu_mb": best.get("peak_gpu_mb"),
            "precision": best["precision"], "mfu": round(flops_per_item * rate / (peak * 1e12), 5),
            "peak_tflops": round(peak, 4), "model_tflops_per_s": round(flops_per_item * rate / 1e12, 5),
            "flops_per_item": flops_per_item, "timed_items": best["timed_items"],
            "timed_seconds": round(best["timed_seconds"], 3), "statistic": f"best of {len(runs)} rounds",
            "rounds": [round(r["items_per_s"], 4) for r in runs],
            "weights_changed": all(r["weights_changed"] for r in runs), "config": best.get("config", {})}


def compare(kind: str, ours: dict, trls: dict) -> dict:
    unit = unit_of(kind)
    trl = max(trls.values(), key=lambda r: r[unit])
    return {"kind": kind, "shape": ours["shape"], "ours": ours[unit], "trl": trl[unit],
            "ratio": round(ours[unit] / trl[unit], 3), "ours_peak_rss_mb": ours["peak_rss_mb"],
            "trl_peak_rss_mb": trl["peak_rss_mb"], "mfu": ours["mfu"], "trl_mfu": trl["mfu"],
            "precision": ours["precision"], "trl_precision": trl["precision"],
            "trl_by_precision": {p: r[unit] for p, r in trls.items()}, "trl_kernels": trl["config"].get("kernels"),
            "unit": unit, "threads": ours["threads"],
            "statistic": ours["statistic"]}


def main(argv=None) -> int:
    a = parse(argv)
    set_threads(a.threads)
    if a.generate:
        from rlhf.bench.decode import run_generate

        s = a.plans[0][0]
        run_generate(s, a.sweep_batches, a.sweep_lengths, s.prompt_length, a.precision,
                     a.rounds, a.threads, a.device)
        return 0
    if a.scaling is not None:
        return run_scaling(a)
    for shape, kinds, episodes in a.plans:
        run_shape(a, shape, kinds, episodes)
    return 0


def run_shape(a, s: Shape, kinds: list[str], episodes: int) -> None:
    """Every measurement on one shape: models and data built once, then each kind's alternating rounds."""
    updates = {"ppo": math.ceil(episodes / s.batch), "grpo": math.ceil(episodes / s.batch),
               "rm": math.ceil(a.pairs / s.batch)}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as d:
        tmp = Path(d)
        log(f"building models and data for {s.id('ppo')}")
        total = {k: s.batch * (a.warmup + u) for k, u in updates.items()}
        n_prompts = max([total[k] for k in ("ppo", "grpo") if k in kinds], default=0)
        data = make_data(s, n_prompts, total["rm"] if "rm" in kinds else 0, a.seed)  # first: it can refuse
        dirs = build_models(s, tmp, a.seed)
        (tmp / "data.json").write_text(json.dumps(data))
        precisions = {a.precision} | (set(a.trl_precisions) if a.vs_trl else set())
        peaks = {}
        for p in sorted(precisions):
            peaks[p] = matmul_peak_tflops(p, device=a.device)
            log(f"matmul peak {p}: {peaks[p]:.3f} TFLOP/s on " + (a.device if a.device == "cuda" else f"{a.threads} threads"))
        for kind in kinds:
            if kind in ("ppo", "grpo"):
                flops = flops_per_episode(kind, s)
            else:
                mean_tokens = sum(len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"])) / len(data["chosen_ids"])
                flops = rm_flops_per_pair(s, mean_tokens)
            base = job_for(a, kind, s, dirs, tmp, updates[kind])
            sides = [("ours", a.precision)] + ([("trl", p) for p in a.trl_precisions] if a.vs_trl else [])
            runs: dict = {side: [] for side in sides}
            for r in range(a.rounds):
                for impl, prec in sides:
                    log(f"{kind} round {r + 1}/{a.rounds}: {impl} {prec}")
                    runs[(impl, prec)].append(run_side(impl, {**base, "precision": prec}, a, tmp))
            for p in peaks:  # the peak again after the runs: the better of the two, in case of load
                peaks[p] = max(peaks[p], matmul_peak_tflops(p, device=a.device))
            lines = {side: summarise(kind, side[0], rs, s, flops, peaks) for side, rs in runs.items()}
            if any(line["mfu"] > 1 for line in lines.values()):
                log("MFU > 1: the matmul peak was measured while the machine was busy; rerun on a quiet machine")
            for line in lines.values():
                print(json.dumps(line), flush=True)
            if a.vs_trl:
                trls = {p: line for (impl, p), line in lines.items() if impl == "trl"}
                print(json.dumps(compare(kind, lines[("ours", a.precision)], trls)), flush=True)


def run_scaling(a) -> int:
    """Ours at every (batch, response length) point on one shape; the table, fits and figure."""
    from rlhf.bench.scaling import point, write

    s0, (kind,), episodes = a.plans[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as d:
        tmp = Path(d)
        big = replace(s0, response_length=max(a.sweep_lengths), batch=max(a.sweep_batches))
        log(f"building models and data for the sweep on {s0.id(kind)}")
        per_prompt = s0.num_generations if kind == "grpo" else 1
        need = max(b // per_prompt * (a.warmup + math.ceil(episodes / b)) for b in a.sweep_batches)
        data = make_data(big, need, 0, a.seed)  # first: it can refuse
        dirs = build_models(big, tmp, a.seed)
        (tmp / "data.json").write_text(json.dumps(data))
        peak = matmul_peak_tflops(a.precision, device=a.device)
        for b in a.sweep_batches:
            for r in a.sweep_lengths:
                s = replace(s0, batch=b, response_length=r)
                job = {**job_for(a, kind, s, dirs, tmp, math.ceil(episodes / b)), "precision": a.precision}
                runs = []
                for i in range(a.rounds):
                    log(f"scaling: batch {b}, {r} response tokens, round {i + 1}/{a.rounds}")
                    runs.append(run_side("ours", job, a, tmp))
                line = summarise(kind, "ours", runs, s, flops_per_episode(kind, s), {a.precision: peak})
                print(json.dumps({**line, "sweep": {"batch": b, "response_length": r}}), flush=True)
                rows.append(point(line, b, r))
        peak = max(peak, matmul_peak_tflops(a.precision, device=a.device))
    shape = f"{s0.layers} layers x {s0.dim}, vocab {s0.vocab}, {s0.prompt_length}-token prompts"
    meta = {"kind": kind, "shape": shape, "precision": a.precision, "threads": a.threads, "device": a.device,
            "machine": f"{machine_name()}, {a.device}, matmul peak {peak:.3f} TFLOP/s "
                       f"({a.precision})", "episodes": episodes, "rounds": a.rounds}
    exps = write(rows, Path(a.scaling), meta)
    print(json.dumps({"kind": "scaling", "algo": kind, "exponents": exps, "out": str(a.scaling)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
