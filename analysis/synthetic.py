"""Synthetic PPO logs in the trainer's CSV schema, for benchmarks, demos and tests.

Shapes (``f = step / (n - 1)``, noise iid normal)::

    policy_loss   = 0.5 + 1.5 * exp(-5 f) + 0.05 noise
    value_loss    = 0.3 + 1.0 * exp(-4 f) + 0.03 noise
    kl_divergence = 0.02 + 0.3 f + 0.005 noise
    reward_score  = -0.5 + 2 (1 - exp(-4 f)) + 0.1 noise

With ``collapse_from=s`` the reward falls and KL climbs steeply from step ``s`` on.
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
