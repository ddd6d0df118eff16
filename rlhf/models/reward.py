"""Reward and value models: a causal-LM backbone with a scalar head.

Stored as `AutoModelForSequenceClassification` (num_labels=1), so plain `transformers` loads the
export. We gather the score ourselves at the last attended token (rather than relying on
`pad_token_id`, which equals eos for GPT-2) and apply the normalisation gain/bias the RM stage
writes into the model config (`reward_mean`, `reward_std`): scores have mean 0 / std 1 on the
training responses.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, PreTrainedModel

from rlhf.models.causal_lm import ModelConfig, from_pretrained, head_fp32, prepare
from rlhf.models.lora import add_lora
from rlhf.models.sampling import backbone_hidden


def load_reward_model(cfg: ModelConfig, init_from: str | None = None, pad_token_id: int = 50256,
                      vocab_size: int = 50257) -> PreTrainedModel:
    """A scalar-head model: from an export (RM or SFT policy), the model config, or from scratch."""
    path = init_from or cfg.name_or_path
    if path:
        model = from_pretrained(AutoModelForSequenceClassification, path, "reward model", num_labels=1,
                                trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attention)
    else:
        arch = {"vocab_size": vocab_size, "n_positions": 256, **cfg.arch}
        arch.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1, attn_implementation=cfg.attention)
        model = GPT2ForSequenceClassification(GPT2Config(**arch))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model = prepare(model.float(), cfg.gradient_checkpointing)
    # With LoRA the scalar head still trains in full: it is new (from an SFT export) or tiny.
    return add_lora(model, cfg.lora, modules_to_save=["score"]) if cfg.lora else model


def check_reward_model(path: str) -> None:
    """Fail before any rollout when `path` is not a scalar-head model export."""
    import json
    from pathlib import Path

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"reward model path '{path}' has no config.json (not a saved model directory)")
    conf = json.loads(cfg_file.read_text())
    archs = conf.get("architectures") or []
    n_labels = len(conf.get("id2label", {})) or conf.get("num_labels", 0)
    if not any(a.endswith("ForSequenceClassification") for a in archs) or n_labels != 1:
        raise ValueError(f"'{path}' is not a reward model (architectures={archs}, labels={n_labels}); "
                         "expected a *ForSequenceClassification export with one label, as the rm stage writes")


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 normalize: bool = False, prompt_length: int | None = None) -> torch.Tensor:
    """Scalar head output at every position, [B, T] (the value model uses all of them), in fp32.

    `normalize` applies the stored gain/bias, (raw - reward_mean) / reward_std: the units of the
    scores PPO optimises. A value model initialised from the reward model must predict in those
    units, or its first estimates are off by the RM's scale (std ~4 in the default run).
    `prompt_length`: rows sharing their first `prompt_length` tokens compute them once (`backbone_hidden`).
    """
    hidden = backbone_hidden(model, input_ids, attention_mask, prompt_length)
    values = head_fp32(model.score, hidden).squeeze(-1)
    if not normalize:
        return values
    mean = getattr(model.config, "reward_mean", 0.0)
    std = getattr(model.config, "reward_std", 1.0)
    return (values - mean) / std


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  normalize: bool = True, prompt_length: int | None = None) -> torch.Tensor:
    """Score of each sequence, read at its last attended token; [B]."""
    values = token_values(model, input_ids, attention_mask, normalize, prompt_length)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    return values.gather(1, last[:, None]).squeeze(1)
