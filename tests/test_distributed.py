"""Scale-out: 2-process DDP on CPU (gloo) for every stage, global PPO statistics, data sharding,
exact resume of PPO (weights equal to an uninterrupted run), and bf16-mixed on CPU."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from rlhf.algorithms.core import masked_whiten
from rlhf.data.sampler import ResumableShuffleSampler
from rlhf.training.pipeline import resume_config, train
from rlhf.stages.ppo import PPOModule

from conftest import TINY_DATA, TINY_PPO, compose_train

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pieces
def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    shards = [list(ResumableShuffleSampler(103, seed=7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51  # the odd tail is dropped so ranks stay in step
    assert not set(shards[0]) & set(shards[1])
    one = ResumableShuffleSampler(103, seed=7)
    one.set_epoch(1)
    epoch1 = list(one)
    assert sorted(epoch1) == list(range(103)) and epoch1 != list(ResumableShuffleSampler(103, seed=7))


def test_sampler_resumes_mid_epoch_only_in_that_epoch():
    s = ResumableShuffleSampler(40, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.resume_at(2, 12)
    assert list(s) == full[12:]
    assert list(s) == full  # the skip applies once
    s.resume_at(1, 12)  # a checkpoint from an earlier epoch: this epoch starts at its beginning
    assert list(s) == full


def test_whitening_with_all_reduce_equals_one_big_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g) * 3 + 1
    mask = torch.rand(8, 5, generator=g) > 0.3
    halves = [(x[:4], mask[:4]), (x[4:], mask[4:])]
    # Two "ranks": the all-reduce sums each rank's statistics with the other's.
    stats = {}

    def fake_all_reduce_for(rank):
        def reduce(t):
            stats[rank] = t
            other = 1 - rank
            if other not in stats:  # compute the other rank's contribution the same way
                xo, mo = halves[other]
                masked_whiten(xo, mo, all_reduce=lambda u: stats.setdefault(other, u))
            return stats[0] + stats[1]
        return reduce

    parts = [masked_whiten(xh, mh, all_reduce=fake_all_reduce_for(r)) for r, (xh, mh) in enumerate(halves)]
    expected = masked_whiten(x, mask)
    assert torch.allclose(torch.cat(parts), expected, atol=1e-5)
    # Local whitening of one half is not the same thing.
    assert not torch.allclose(masked_whiten(*halves[0]), expected[:4], atol=1e-3)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes_every_stage_identical_weights(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "train.py", "debug=fast", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "ppo.max_steps=3", f"paths.output_dir={run}", "callbacks.progress_bar.refresh_rate=0",
         "~callbacks.analysis_report"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for stage in ("sft", "rm", "ppo"):
        res = summary["stages"][stage]
        assert res["world_size"] == 2
        # Both ranks end with bit-identical weights: gradients were averaged over the ranks.
        assert res["rank_weight_mismatch"] == 0.0, stage
    df = pd.read_csv(run / "ppo" / "metrics.csv")
    assert df["step"].tolist() == [1, 2, 3]  # rank 0 alone writes, once per update
    assert (df["batch_size"] == 16).all()  # debug=fast: 8 prompts per rank, 2 ranks
    assert df["episode"].tolist() == [16, 32, 48]


# ----------------------------------------------------------------------------- resume
class Killed(RuntimeError):
    pass


def test_resumed_ppo_ends_with_the_weights_of_an_uninterrupted_run(trained_artifacts, tmp_path, monkeypatch):
    """Optimizer, scheduler, KL controller, data position and sampling RNG all come back."""
    common = ["stage=ppo", f"ppo.policy_path={trained_artifacts['sft']}",
              f"reward.model_path={trained_artifacts['rm']}", *TINY_DATA, *TINY_PPO,
              "ppo.max_steps=6", "ppo.adaptive_kl=true", "callbacks.model_checkpoint.every_n_train_steps=3",
              "data.n_pairs=40"]  # 32 training prompts: 4 updates per epoch, so the resume is mid-epoch 1
    weights = {}
    orig_finish = PPOModule.finish

    def finish(self, *args, **kwargs):
        weights[self._label] = {k: v.clone() for k, v in self.policy.state_dict().items()}
        weights[self._label + "_kl"] = self.kl_ctl.value
        return orig_finish(self, *args, **kwargs)

    monkeypatch.setattr(PPOModule, "finish", finish)
    monkeypatch.setattr(PPOModule, "_label", "straight", raising=False)
    train(compose_train(tmp_path / "a", *common))

    orig_step = PPOModule.training_step
    calls = {"n": 0}

    def dying_step(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at update 3, mid-way to the next one
            raise Killed()
        return orig_step(self, batch, batch_idx)

    monkeypatch.setattr(PPOModule, "training_step", dying_step)
    with pytest.raises(Killed):
        train(compose_train(tmp_path / "b", *common))
    monkeypatch.setattr(PPOModule, "training_step", orig_step)
    monkeypatch.setattr(PPOModule, "_label", "resumed", raising=False)
    train(resume_config(str(tmp_path / "b"), []))

    a, b = weights["straight"], weights["resumed"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert weights["straight_kl"] == pytest.approx(weights["resumed_kl"], rel=1e-9)
    assert weights["straight_kl"] != 0.05  # the adaptive controller moved, so its state was restored
    steps_a = pd.read_csv(tmp_path / "a" / "ppo" / "metrics.csv")
    steps_b = pd.read_csv(tmp_path / "b" / "ppo" / "metrics.csv")
    assert steps_b["step"].tolist() == list(range(1, 7))
    cols = ["reward_score", "kl_divergence", "policy_loss"]
    assert ((steps_a[cols] - steps_b[cols]).abs().to_numpy() < 1e-4).all()


# ----------------------------------------------------------------------------- bf16
def test_bf16_mixed_runs_every_stage_on_cpu(tmp_path):
    run = tmp_path / "run"
    summary = train(compose_train(run, "debug=fast", "trainer.precision=bf16-mixed", "ppo.max_steps=2"))
    assert set(summary["stages"]) == {"sft", "rm", "ppo"}
    assert math.isfinite(summary["stages"]["ppo"]["kl_final"])  # the end-of-PPO evaluation ran under autocast
    assert 0 < summary["stages"]["sft"]["sft_val_loss"] < 20
    for stage in ("sft", "rm", "ppo"):
        df = pd.read_csv(run / stage / "metrics.csv")
        numeric = df.drop(columns=["timestamp"]).select_dtypes("number")
        assert len(df) > 0 and numeric.notna().all().all() and (numeric.abs() < 1e6).all().all(), stage


def test_bf16_mixed_clips_gradients_of_the_fused_optimizer(tmp_path):
    # Lightning alone refuses to clip a fused AdamW under an AMP plugin (rlhf/stages/common.py).
    summary = train(compose_train(tmp_path / "run", "debug=fast", "stage=sft", "trainer.precision=bf16-mixed",
                                  "trainer.gradient_clip_val=0.5"))
    assert 0 < summary["stages"]["sft"]["sft_val_loss"] < 20


# ----------------------------------------------------------------------------- fault guards
def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from callbacks import RNGState

    cb = RNGState()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(cb.state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    cb.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all() and expected[2] == got[2]


def test_nan_loss_stops_ppo_and_keeps_checkpoint_and_logs(trained_artifacts, tmp_path, monkeypatch):
    import dataclasses

    from rlhf.algorithms import parts
    from rlhf.errors import UserError

    orig = parts.POLICY_LOSSES["clipped"]  # PPO's registered policy loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = orig.fn(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] > 4 * 2 else (loss, stats)  # update 3

    monkeypatch.setitem(parts.POLICY_LOSSES, "clipped", dataclasses.replace(orig, fn=poisoned))
    run = tmp_path / "run"
    cfg = compose_train(run, "stage=ppo", f"ppo.policy_path={trained_artifacts['sft']}",
                        f"reward.model_path={trained_artifacts['rm']}", *TINY_DATA, *TINY_PPO,
                        "ppo.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2")
    with pytest.raises(UserError, match=r"^non-finite loss at PPO step 3: stopping"):
        train(cfg)
    ckpt = torch.load(run / "ppo" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["episodes"] == 2 * 8
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert pd.read_csv(run / "ppo" / "metrics.csv")["step"].tolist() == [1, 2]


def test_nan_loss_stops_sft_with_step_named(tmp_path, monkeypatch):
    from rlhf.errors import UserError
    from rlhf.stages.sft import SFTModule

    orig = SFTModule._loss
    monkeypatch.setattr(SFTModule, "_loss", lambda self, b: orig(self, b) * (float("nan") if self.global_step >= 2 else 1))
    with pytest.raises(UserError, match=r"^non-finite loss at SFT step 3"):
        train(compose_train(tmp_path / "run", "debug=fast", "stage=sft"))


def _grpo_batch_scaled_on_rank(rank, world, port, rewards, out):
    import torch.distributed as dist

    from rlhf.algorithms.grpo import group_advantages

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        def all_reduce(t):
            t = t.clone()
            dist.all_reduce(t)  # sum, as the stage's sum_over_ranks
            return t

        share = rewards.chunk(world)[rank]  # whole groups per rank, as the sampler deals prompts
        out[rank] = group_advantages(share, 4, "batch", all_reduce=all_reduce)
    finally:
        dist.destroy_process_group()


def test_grpo_batch_scaling_over_two_gloo_processes_equals_one_process():
    """scale_rewards=batch divides by the std of every process's rewards (TRL gathers them first):
    two processes holding half the groups each give the single-process advantages."""
    import socket

    import torch.multiprocessing as mp

    from rlhf.algorithms.grpo import group_advantages

    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.randn(16, generator=g), 3 + 2 * torch.randn(16, generator=g)])  # ranks differ
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_grpo_batch_scaled_on_rank, args=(2, port, rewards, out), nprocs=2, join=True)
    expected = group_advantages(rewards, 4, "batch")
    assert torch.allclose(torch.cat([out[0], out[1]]), expected, atol=1e-6)
    # Each process's own std (the old behaviour) is a different thing here.
    assert not torch.allclose(group_advantages(rewards[:16], 4, "batch"), expected[:16], atol=1e-2)
