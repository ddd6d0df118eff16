"""Random-number-generator states in every checkpoint, restored on resume.

Python, NumPy and torch RNGs drive anything random outside the PPO rollout (whose sampling RNG is
derived from the update number, see `PPOModule._update_generator`): dropout if a user turns it
on, data augmentation, user code. Lightning checkpoints do not carry them by default. NumPy's
state is stored as a tensor, so the checkpoint still loads with `weights_only=True`.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states


class RNGState(pl.Callback):
    def state_dict(self) -> dict:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        name, keys, pos, has_gauss, gauss = states.pop("numpy")
        states["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
        states["python"] = list(states["python"])
        return {"rng": states}

    def load_state_dict(self, state_dict: dict) -> None:
        states = dict(state_dict.get("rng") or {})
        if not states:
            return
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        _set_rng_states(states)
