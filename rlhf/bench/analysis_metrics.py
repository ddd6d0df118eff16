"""Time analysis.compute_metrics on a synthetic 1,000,000-row PPO log (target: < 2 s on one core).

Usage: python -m rlhf.bench.analysis_metrics [--rows 1000000] [--repeat 5] [--with-load]

The process is pinned to one CPU (where the OS allows) and BLAS/OpenMP pools to
one thread. ``--with-load`` also writes the log to a temporary CSV and times
``load_run`` on it (informational; the target is for the metrics).
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from analysis import compute_metrics, load_run  # noqa: E402
from analysis.synthetic import synthetic_log  # noqa: E402

TARGET_S = 2.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--with-load", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    df = synthetic_log(args.rows, seed=0, collapse_from=int(args.rows * 0.9))
    compute_metrics(df.head(1000))  # warm-up (imports, first-call overheads)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        m = compute_metrics(df, window=50)
        times.append(time.perf_counter() - t0)
    best, worst = min(times), max(times)
    print(f"compute_metrics on {args.rows:,} rows: best {best:.3f} s, worst {worst:.3f} s "
          f"over {args.repeat} runs (target < {TARGET_S:.1f} s) -> {'OK' if worst < TARGET_S else 'TOO SLOW'}")
    print(f"  collapse_suspected={m['collapse_suspected']} kl_spike_count={m['kl_spike_count']} "
          f"reward_per_kl={m['reward_per_kl']:.4g}")
    if args.with_load:
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "metrics.csv"
            df.to_csv(csv, index=False)
            t0 = time.perf_counter()
            load_run(csv)
            print(f"load_run on the same log as CSV: {time.perf_counter() - t0:.3f} s")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
