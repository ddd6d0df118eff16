"""One command for a GPU machine: the CUDA tests, the PPO and GRPO benchmarks against TRL at GPT-2
small's shape in bf16 on CUDA, the decode benchmark (ms per step and memory-bandwidth use, ours
eager and with the decode step as a CUDA graph, against transformers' `generate`), and 20 PPO
updates of `experiment=gpt2_hh` on a random-weight GPT-2 small.

    python -m rlhf.bench.gpu_check [--out gpu_check.json] [--updates 20] [--skip tests,bench,decode,gpt2_hh]

Each part runs in its own process with a time limit (the whole check is meant to fit in about 10
minutes on one H100/H200; where one command may run less, split it: `--skip bench,decode`, then
`--skip tests,gpt2_hh`); a failing part is reported and the others still run. Prints one summary
at the end (GPU name, each part's status and seconds, the benchmark's episodes/s and ratio to TRL,
the gpt2_hh seconds per update and peak GPU memory) and writes it as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("tests", "bench", "decode", "gpt2_hh")


def _run(cmd: list[str], timeout: float, cwd=REPO) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.time() - t0


def part_tests(tmp: Path, a) -> dict:
    rc, out, sec = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                         "tests/test_speed.py"], a.timeout_tests)
    return {"ok": rc == 0, "seconds": round(sec, 1), "tail": out.strip().splitlines()[-3:]}


def part_bench(tmp: Path, a) -> dict:
    rc, out, sec = _run([sys.executable, "-m", "rlhf.bench", "--preset", "gpt2", "--vs-trl", "--device", "cuda",
                         "--precision", "bf16", "--trl-precision", "bf16", "--rounds", "1", "--episodes", "64"],
                        a.timeout_bench)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    cmp_ = next((x for x in lines if "ratio" in x), None)
    return {"ok": rc == 0 and cmp_ is not None, "seconds": round(sec, 1), "comparison": cmp_,
            "measurements": [x for x in lines if "impl" in x], "tail": out.strip().splitlines()[-3:]}


def part_decode(tmp: Path, a) -> dict:
    rc, out, sec = _run([sys.executable, "-m", "rlhf.bench", "--kind", "generate", "--device", "cuda", "--precision",
                         "bf16", "--batches", "1,8,32", "--response-lengths", "64", "--rounds", "2"],
                        a.timeout_decode)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return {"ok": rc == 0 and any("ratio" in x for x in lines), "seconds": round(sec, 1),
            "comparisons": [x for x in lines if "ratio" in x],
            "measurements": [x for x in lines if "impl" in x], "tail": out.strip().splitlines()[-3:]}


def part_gpt2_hh(tmp: Path, a) -> dict:
    gpt2, hh, run = tmp / "gpt2", tmp / "hh.jsonl", tmp / "run"
    for cmd in ([sys.executable, "-m", "rlhf.models.random_gpt2", str(gpt2)],
                [sys.executable, "-m", "rlhf.data.export_synthetic", str(hh), "--pairs", "2000"]):
        rc, out, _ = _run(cmd, 300)
        if rc:
            return {"ok": False, "tail": out.strip().splitlines()[-3:]}
    rc, out, sec = _run([sys.executable, "train.py", "experiment=gpt2_hh", "trainer=gpu", f"model.name_or_path={gpt2}",
                         f"data.data_files={hh}", "sft.max_steps=5", "rm.max_steps=5", f"ppo.max_steps={a.updates}",
                         f"hydra.run.dir={run}", "callbacks.progress_bar.refresh_rate=0"], a.timeout_gpt2)
    res = {"ok": rc == 0, "seconds": round(sec, 1), "tail": out.strip().splitlines()[-3:]}
    summary = run / "summary.json"
    if summary.is_file():
        ppo = json.loads(summary.read_text())["stages"].get("ppo", {})
        train_s = (ppo.get("fit_seconds") or 0) - (ppo.get("eval_seconds") or 0)
        res.update(updates=ppo.get("steps"), seconds_per_update=round(train_s / max(ppo.get("steps") or 1, 1), 3),
                   eval_seconds=ppo.get("eval_seconds"), peak_gpu_mb=ppo.get("peak_gpu_mb"),
                   stages={k: {m: v.get(m) for m in ("steps", "fit_seconds", "peak_gpu_mb")}
                           for k, v in json.loads(summary.read_text())["stages"].items()})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--updates", type=int, default=20, help="PPO updates of experiment=gpt2_hh (default 20)")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(PARTS)}")
    ap.add_argument("--timeout-tests", type=float, default=200)  # + the tests that compile the graph step
    ap.add_argument("--timeout-bench", type=float, default=150)
    ap.add_argument("--timeout-decode", type=float, default=180)  # + compiling the graph step once per batch size
    ap.add_argument("--timeout-gpt2", type=float, default=150)
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device visible (torch.cuda.is_available() is False); this check needs a GPU",
              file=sys.stderr)
        return 1
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"--skip: unknown parts {sorted(skip - set(PARTS))}; expected {', '.join(PARTS)}")
    props = torch.cuda.get_device_properties(0)
    report = {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
              "cuda": torch.version.cuda, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:
        for name in PARTS:
            if name in skip:
                continue
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            report["parts"][name] = globals()[f"part_{name}"](Path(d), a)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if all(p["ok"] for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
