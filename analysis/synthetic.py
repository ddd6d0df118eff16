"""Synthetic PPO logs in the trainer's CSV schema, for benchmarks, demos and tests.

Shapes (``f = step / (n - 1)``, noise iid normal)::

    policy_loss   = 0.5 + 1.5 * exp(-5 f) + 0.05 noise
    value_loss    = 0.3 + 1.0 * exp(-4 f) + 0.03 noise
    kl_divergence = 0.02 + 0.3 f + 0.005 noise
    reward_score  = -0.5 + 2 (1 - exp(-4 f)) + 0.1 noise

With ``collapse_from=s`` the reward falls and KL climbs steeply from step ``s`` on.

:func:`synthetic_online_log` adds the online-RL columns (``approxkl, clipfrac, entropy, episode,
gold_score, kl_coef, logprob_gap_max, response_length``) with the shapes of this repo's clean
default PPO runs: KL rising to ~2.5 nats, per-token entropy easing from ~4.7 to ~3.5 nats,
responses of ~6.5 tokens, clip fraction decaying from ~0.1 to ~0.02.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def synthetic_log(n_steps: int = 1000, seed: int = 0, collapse_from: int | None = None) -> pd.DataFrame:
    """A ``step, policy_loss, value_loss, kl_divergence, reward_score, learning_rate, batch_size, timestamp`` frame."""
    rng = np.random.default_rng(seed)
    step = np.arange(n_steps, dtype=np.int64)
    f = step / max(n_steps - 1, 1)
    noise = rng.standard_normal((4, n_steps))
    kl = 0.02 + 0.3 * f + 0.005 * noise[2]
    reward = -0.5 + 2.0 * (1.0 - np.exp(-4.0 * f)) + 0.1 * noise[3]
    if collapse_from is not None:
        after = np.clip(step - collapse_from, 0, None).astype(float)
        kl = kl + 0.05 * after
        reward = reward - 0.05 * after
    return pd.DataFrame({
        "step": step,
        "policy_loss": 0.5 + 1.5 * np.exp(-5.0 * f) + 0.05 * noise[0],
        "value_loss": 0.3 + 1.0 * np.exp(-4.0 * f) + 0.03 * noise[1],
        "kl_divergence": kl,
        "reward_score": reward,
        "learning_rate": 3e-5 * (1.0 - 0.9 * f),
        "batch_size": np.full(n_steps, 64, dtype=np.int64),
        "timestamp": pd.Timestamp("2024-01-01 00:00:00") + pd.to_timedelta(step * 2, unit="s"),
    })


def synthetic_online_log(n_steps: int = 300, seed: int = 0) -> pd.DataFrame:
    """A clean PPO-stage ``metrics.csv`` frame in the online schema; 1-based steps like the trainer's."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, n_steps + 1, dtype=np.int64)
    f = (step - 1) / max(n_steps - 1, 1)
    rise, decay = 1.0 - np.exp(-4.0 * f), np.exp(-4.0 * f)
    z = rng.standard_normal((9, n_steps))
    length = 6.5 + 0.5 * decay + 0.4 * z[0]
    return pd.DataFrame({
        "step": step,
        "policy_loss": -0.03 * decay - 0.005 + 0.005 * z[1],
        "value_loss": (0.02 + 0.3 * np.exp(-5.0 * f)) * np.exp(0.3 * z[2]),
        "kl_divergence": 2.5 * rise * np.exp(0.15 * z[3]),
        "reward_score": 0.6 + 0.7 * rise + 0.08 * z[4],
        "learning_rate": 3e-4 * (1.0 - 0.9 * f),
        "batch_size": np.full(n_steps, 32, dtype=np.int64),
        "timestamp": pd.Timestamp("2024-01-01 00:00:00") + pd.to_timedelta(step * 3, unit="s"),
        "approxkl": 0.002 + 0.006 * decay * np.exp(0.3 * z[5]),
        "clipfrac": 0.02 + 0.08 * decay * np.exp(0.3 * z[6]),
        "entropy": (3.5 + 1.2 * decay) * length * np.exp(0.1 * z[7]),
        "episode": step * 32,
        "gold_score": 0.3 * (1.0 - np.exp(-3.0 * f)) + 0.05 * z[8],
        "kl_coef": np.full(n_steps, 0.05),
        "logprob_gap_max": np.full(n_steps, 1.5e-6),
        "response_length": length,
    })
