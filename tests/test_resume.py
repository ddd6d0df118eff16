"""Resume: a run killed with SIGKILL mid-PPO continues with `python train.py resume=RUN_DIR`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 16


@pytest.mark.slow
def test_sigkill_mid_ppo_then_resume(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "train.py", "debug=fast", f"ppo.max_steps={STEPS}",
            "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.progress_bar.refresh_rate=0",
            "~callbacks.analysis_report", f"paths.output_dir={run}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    csv = run / "ppo" / "metrics.csv"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if csv.exists() and len(csv.read_text().splitlines()) >= 9:  # header + 8 PPO updates
                break
            time.sleep(0.2)
        assert proc.poll() is None, "run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_steps = pd.read_csv(csv)["step"].tolist()
    assert 8 <= len(killed_steps) < STEPS
    assert "ppo" not in json.loads((run / "summary.json").read_text())["stages"]

    out = subprocess.run([sys.executable, "train.py", f"resume={run}", "callbacks.progress_bar.refresh_rate=0"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming stage ppo from" in out.stdout and "stage sft already finished" in out.stdout
    df = pd.read_csv(csv)
    # Same steps as an uninterrupted run: each once, none missing, rows before the kill kept.
    assert df["step"].tolist() == list(range(1, STEPS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == {"sft", "rm", "ppo"}
    assert (run / "ppo" / "model" / "model.safetensors").is_file()
    # Episodes continue from the checkpoint rather than restarting at 0.
    assert df["episode"].tolist() == [8 * s for s in range(1, STEPS + 1)]


def test_resume_rejects_a_directory_without_a_run(tmp_path):
    out = subprocess.run([sys.executable, "train.py", f"resume={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: resume=")
