"""How the cost of an episode grows with response length and batch: `python -m rlhf.bench --scaling DIR`.

    python -m rlhf.bench --scaling bench-scaling                       # PPO, 4 layers x 256, R 32..256 x B 8..32
    python -m rlhf.bench --scaling out --kind grpo --response-lengths 32,64 --batches 8,16

Every (batch, response length) point is one run of ours (`rlhf.bench.ours`, its own process, on the
same saved weights and prompts). Written to DIR: `scaling.csv` (one row per point: seconds per
episode in total and per phase, episodes/s, peak RSS), `scaling.md` (the table and the fitted
exponents) and `scaling.png` (log-log seconds per episode against response length, one panel per
phase, one line per batch).

The exponents are least-squares slopes of log(seconds per episode) on log(response length) with one
intercept per batch (and on log(batch) with one intercept per response length), so each is a single
number per phase: 1 against response length is linear growth, 0 against batch means batching buys
nothing per episode, -1 that the phase costs the same per update whatever the batch.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

PHASES = ("generation", "scoring", "training", "total")


def exponent(rows: list[dict], phase: str, along: str, group_by: str) -> float | None:
    """Slope of log(seconds per episode of `phase`) on log(`along`), one intercept per `group_by` value."""
    import numpy as np

    groups = sorted({r[group_by] for r in rows})
    pts = [r for r in rows if r[phase] > 0]
    if len({r[along] for r in pts}) < 2:
        return None
    X = np.zeros((len(pts), 1 + len(groups)))
    y = np.zeros(len(pts))
    for i, r in enumerate(pts):
        X[i, 0] = np.log(r[along])
        X[i, 1 + groups.index(r[group_by])] = 1.0
        y[i] = np.log(r[phase])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return float(coef[0])


def point(line: dict, batch: int, response_length: int) -> dict:
    """One sweep point from a benchmark result line: seconds per episode per phase."""
    n = line["timed_items"]
    sec = line["seconds"]
    row = {"batch": batch, "response_length": response_length, "episodes_per_s": line["episodes_per_s"],
           "peak_rss_mb": line["peak_rss_mb"], "mfu": line["mfu"]}
    for p in ("generation", "scoring", "training", "other"):
        row[p] = sec.get(p, 0.0) / n
    row["total"] = line["timed_seconds"] / n
    return row


def fits(rows: list[dict]) -> dict:
    return {p: {"response_length": exponent(rows, p, "response_length", "batch"),
                "batch": exponent(rows, p, "batch", "response_length")} for p in PHASES}


def write(rows: list[dict], out: Path, meta: dict) -> dict:
    """scaling.csv, scaling.md, scaling.png and scaling.json in `out`; returns the fitted exponents."""
    out.mkdir(parents=True, exist_ok=True)
    cols = ["batch", "response_length", "episodes_per_s", "total", "generation", "scoring", "training", "other",
            "mfu", "peak_rss_mb"]
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(r[k], 5) if isinstance(r[k], float) else r[k]) for k in cols})
    exps = fits(rows)
    (out / "scaling.json").write_text(json.dumps({"meta": meta, "points": rows, "exponents": exps}, indent=1))
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"# Cost per episode: {meta.get('kind', 'ppo').upper()}, {meta.get('shape', '')}", "",
             f"Machine: {meta.get('machine', '')}; precision {meta.get('precision', '')}; "
             f"{meta.get('threads', '')} threads. Seconds per episode (timed window / episodes).", "",
             "| batch | response tokens | episodes/s | total s/ep | generation | scoring | training | other | MFU | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["response_length"])):
        lines.append(f"| {r['batch']} | {r['response_length']} | {r['episodes_per_s']:.3f} | {r['total']:.4f} | "
                     f"{r['generation']:.4f} | {r['scoring']:.4f} | {r['training']:.4f} | {r['other']:.4f} | "
                     f"{r['mfu']:.3f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Fitted exponents of seconds per episode (log-log least squares, one intercept per other axis):", "",
              "| phase | vs response length | vs batch |", "|---|---|---|"]
    lines += [f"| {p} | {fmt(e['response_length'])} | {fmt(e['batch'])} |" for p, e in exps.items()]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    plot(rows, exps, out / "scaling.png", meta)
    return exps


def plot(rows: list[dict], exps: dict, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PHASES), figsize=(4 * len(PHASES), 3.6), sharex=True)
    for ax, phase in zip(axes, PHASES):
        for b in sorted({r["batch"] for r in rows}):
            pts = sorted((r for r in rows if r["batch"] == b and r[phase] > 0), key=lambda r: r["response_length"])
            ax.plot([r["response_length"] for r in pts], [r[phase] for r in pts], "o-", label=f"batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        e = exps[phase]
        ax.set_title(f"{phase}: R^{e['response_length']:.2f}, B^{e['batch']:.2f}" if e["response_length"] is not None
                     and e["batch"] is not None else phase, fontsize=10)
        ax.set_xlabel("response tokens")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds per episode")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta.get('kind', 'ppo').upper()} cost per episode, {meta.get('shape', '')} ({meta.get('precision', '')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
