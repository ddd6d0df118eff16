"""Time the project's PPO loop and reward-model training, optionally against TRL on the same work.

    python -m rlhf.bench                  # PPO + RM on 4 layers x 256 (batch 16), PPO on GPT-2 small (batch 8); bf16
    python -m rlhf.bench --vs-trl         # + TRL on the same work (pip install -e '.[bench]')
    python -m rlhf.bench --preset small --kind rm --precision fp32
    python -m rlhf.bench --preset small --layers 1 --dim 32 --heads 2 --batch 4 --episodes 8 --warmup 1
    python -m rlhf.bench --preset gpt2 --vs-trl --device cuda   # both sides on the GPU (trainer=gpu; TRL use_cpu=False)

Prints one JSON line per measurement on stdout (progress goes to stderr):
  {"kind": "ppo"|"rm", "impl": "ours"|"trl", "shape", "episodes_per_s"|"pairs_per_s", "seconds"
   (generation/scoring/training/other of the timed window), "peak_rss_mb", "threads", "precision",
   "mfu", "peak_tflops", ...}
and with --vs-trl one comparison line per kind: {"kind", "shape", "ours", "trl", "ratio" (ours/trl),
"ours_peak_rss_mb", "trl_peak_rss_mb", "mfu", "trl_mfu", "precision", "trl_precision", ...}.

How: the random-init models (fixed seed) and the prompts are built once here and saved to a
temporary directory; every measurement is a fresh subprocess (`rlhf.bench.ours`,
`rlhf.bench.trl_side`) that loads them, so each side's peak RSS is its own. Sides alternate
(ours, trl, ours, trl, ... for --rounds rounds) and the best round of each is reported (all rounds
are listed under "rounds"). The first --warmup updates are not timed. MFU = model FLOPs per second
(rlhf/bench/common.py documents the count) / this machine's matmul peak at the run's precision,
measured here with the same thread count before and after each kind's runs (the best is kept).
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

from rlhf.bench.common import (SEED, Shape, build_models, make_data, matmul_peak_tflops, ppo_flops_per_episode,
                               rm_flops_per_pair, set_threads, shape_dict)

PRESETS = {  # shape, then what runs on it by default (--kind and --episodes override)
    "small": (dict(layers=4, dim=256, heads=4, vocab=50257, batch=16), dict(kinds="ppo,rm", episodes=64)),
    "gpt2": (dict(layers=12, dim=768, heads=12, vocab=50257, batch=8), dict(kinds="ppo", episodes=32)),
}
SHAPE_FLAGS = ("layers", "dim", "heads", "vocab", "batch", "prompt_length", "response_length", "ppo_epochs",
               "mini_batches", "rm_response_length")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rlhf.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default=None, help="comma list of ppo, rm (default: small: ppo,rm; gpt2: ppo)")
    ap.add_argument("--preset", default="small,gpt2",
                    help="comma list of " + ", ".join(PRESETS) + ": shapes, run one after the other (flags override)")
    for f in SHAPE_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None,
                    help="timed PPO episodes, rounded up to whole batches (default: small 64, gpt2 32)")
    ap.add_argument("--pairs", type=int, default=256, help="timed RM pairs (rounded up to whole batches)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="ours (bf16: Lightning's bf16-mixed)")
    ap.add_argument("--trl-precision", choices=("best", "same", "fp32", "bf16"), default="best",
                    help="best: run TRL in fp32 and in bf16 and compare against the faster")
    ap.add_argument("--trl-kernels", choices=("trl", "ours"), default="trl",
                    help="trl: TRL's models as transformers loads them; ours: with our attention kernel, GELU and "
                         "allocator setting too, so the ratio measures the loops alone")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where both sides run (auto: cuda when available, else cpu)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side is reported")
    ap.add_argument("--vs-trl", action="store_true", help="also run TRL's PPOTrainer / RewardTrainer")
    ap.add_argument("--lr", type=float, default=3e-4, help="PPO learning rate (both sides)")
    ap.add_argument("--rm-lr", type=float, default=1e-3, help="RM learning rate (both sides)")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="AdamW weight decay, both sides and both kinds (default 0.0, as ours and TRL default)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.preset.split(",") if n.strip()]
    if not names or set(names) - set(PRESETS):
        ap.error(f"--preset {a.preset!r}: expected a comma list of {', '.join(PRESETS)}")
    a.plans = []  # (shape, kinds, episodes) per preset
    for name in names:
        shape, defaults = PRESETS[name]
        kinds = [k.strip() for k in (a.kind or defaults["kinds"]).split(",") if k.strip()]
        if not kinds or set(kinds) - {"ppo", "rm"}:
            ap.error(f"--kind {a.kind!r}: expected a comma list of ppo, rm")
        s = replace(Shape(), **{**shape, **{f: getattr(a, f) for f in SHAPE_FLAGS if getattr(a, f) is not None}})
        if s.batch % s.mini_batches:
            ap.error(f"--batch {s.batch} is not divisible by --mini-batches {s.mini_batches}")
        if s.dim % s.heads:
            ap.error(f"--dim {s.dim} is not divisible by --heads {s.heads}")
        a.plans.append((s, kinds, a.episodes or defaults["episodes"]))
    if min(a.pairs, a.rounds, a.threads) <= 0 or (a.episodes is not None and a.episodes <= 0) or a.warmup < 0:
        ap.error("--episodes, --pairs, --rounds and --threads must be > 0, --warmup >= 0")
    if a.vs_trl and importlib.util.find_spec("trl") is None:
        ap.error("--vs-trl needs TRL: pip install -e '.[bench]'")
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.trl_precisions = {"best": ["fp32", "bf16"], "same": [a.precision]}.get(a.trl_precision, [a.trl_precision])
    return a


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


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


def summarise(kind: str, impl: str, runs: list[dict], s: Shape, flops_per_item: float, peaks: dict) -> dict:
    best = max(runs, key=lambda r: r["items_per_s"])
    unit = "episodes_per_s" if kind == "ppo" else "pairs_per_s"
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
    unit = "episodes_per_s" if kind == "ppo" else "pairs_per_s"
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
    for shape, kinds, episodes in a.plans:
        run_shape(a, shape, kinds, episodes)
    return 0


def run_shape(a, s: Shape, kinds: list[str], episodes: int) -> None:
    """Every measurement on one shape: models and data built once, then each kind's alternating rounds."""
    updates = {"ppo": math.ceil(episodes / s.batch), "rm": math.ceil(a.pairs / s.batch)}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as d:
        tmp = Path(d)
        log(f"building models and data for {s.id('ppo')}")
        dirs = build_models(s, tmp, a.seed)
        total = {k: s.batch * (a.warmup + u) for k, u in updates.items()}
        data = make_data(s, total["ppo"] if "ppo" in kinds else 0, total["rm"] if "rm" in kinds else 0, a.seed)
        (tmp / "data.json").write_text(json.dumps(data))
        precisions = {a.precision} | (set(a.trl_precisions) if a.vs_trl else set())
        peaks = {}
        for p in sorted(precisions):
            peaks[p] = matmul_peak_tflops(p, device=a.device)
            log(f"matmul peak {p}: {peaks[p]:.3f} TFLOP/s on " + (a.device if a.device == "cuda" else f"{a.threads} threads"))
        for kind in kinds:
            if kind == "ppo":
                flops = ppo_flops_per_episode(s)
            else:
                mean_tokens = sum(len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"])) / len(data["chosen_ids"])
                flops = rm_flops_per_pair(s, mean_tokens)
            base = {"kind": kind, "shape": shape_dict(s), "policy": dirs["policy"], "rm": dirs["rm"],
                    "data": str(tmp / "data.json"), "warmup": a.warmup, "updates": updates[kind],
                    "threads": a.threads, "seed": a.seed, "lr": a.lr, "rm_lr": a.rm_lr,
                    "weight_decay": a.weight_decay,
                    "kernels": a.trl_kernels, "device": a.device}
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


if __name__ == "__main__":
    sys.exit(main())
