"""LoRA (Hu et al. 2021) through `peft`: low-rank adapters injected into the Hugging Face model in place.

In place rather than behind a `PeftModel` wrapper: sampling, scoring and the stages call the
model's own `base_model`, `get_output_embeddings()` and `score`, and all of those keep working
when some of its Linear/Conv1D layers carry an adapter. Exports merge the adapter into the weights,
so every stage still writes (and the next one reads) a plain Hugging Face model. With LoRA the
PPO reference is the policy with its adapter switched off, instead of a second copy of the weights.
`peft` is imported only when LoRA is on.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf.errors import ConfigError


@dataclass
class LoRAConfig:
    r: int = 8  # adapter rank: each targeted weight W becomes W + (alpha / r) * B @ A, A: r x in, B: out x r
    alpha: float = 16  # scale numerator; alpha / r fixes the update's size as r changes
    # Dropout on the adapter's input. Keep 0: RLHF compares log-probs of the same tokens across
    # passes, and dropout noise would show up as spurious KL and ratio != 1.
    dropout: float = 0.0
    # Module names (suffixes) that get an adapter: GPT-2's attention (c_attn, c_proj) and MLP (c_fc,
    # c_proj) layers. Other architectures name theirs differently, e.g. [q_proj,k_proj,v_proj,o_proj].
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"model.lora: r must be an integer > 0, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"model.lora: alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("model.lora: target_modules must name at least one module")
        self.target_modules = list(self.target_modules)

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"model.lora: unknown key(s) {unknown}; valid keys: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def add_lora(model: nn.Module, cfg: LoRAConfig, modules_to_save: list[str] | None = None) -> nn.Module:
    """Injects a LoRA adapter in place; only the adapter (and `modules_to_save`, e.g. a new head) trains."""
    from peft import LoraConfig, inject_adapter_in_model

    conf = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      modules_to_save=modules_to_save)
    with warnings.catch_warnings():
        # peft picks the weight layout per layer (Conv1D in GPT-2, Linear elsewhere) and warns for each one.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        try:
            return inject_adapter_in_model(conf, model)
        except ValueError as e:  # no module matched target_modules
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"model.lora.target_modules={cfg.target_modules}: {first[:200]}") from None


def has_lora(model: nn.Module) -> bool:
    # peft's tuner leaves its config on the model it injected into; checking it needs no peft import.
    return bool(getattr(model, "peft_config", None))


@contextmanager
def adapter_disabled(model: nn.Module):
    """The base model: LoRA layers (and modules_to_save) pass through while inside; a no-op without LoRA.

    Restores each layer's previous state rather than switching everything back on, so it nests
    (the evaluation samples from the reference and scores with it inside the same block).
    """
    if not has_lora(model):
        yield model
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    was_off = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, off in zip(layers, was_off):
            m.enable_adapters(not off)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merges the adapter into the weights and removes the LoRA layers, in place: a plain HF model again."""
    if not has_lora(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            plain = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save: keep the trained copy
            plain = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    del model.peft_config
    return model


@contextmanager
def reference_policy(policy: nn.Module, frozen_copy: nn.Module | None):
    """PPO's KL reference: its frozen copy of the starting policy or, with LoRA (no copy), the policy
    itself with the adapter off, which is exactly the starting policy since only the adapter trains."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    with adapter_disabled(policy):
        yield policy
