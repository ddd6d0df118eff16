"""Loading the policy: a Hugging Face causal LM, either built from scratch or from pretrained weights.

`model=tiny` builds a randomly initialised GPT-2 small enough for 2 CPU cores; `model=gpt2`
calls `from_pretrained("gpt2")` (or `model.name_or_path=/local/dir`). Dropout is switched off
everywhere: RLHF compares log-probs of the same tokens across passes, and dropout noise in
those would show up as spurious KL and ratio != 1 (N+ implementation details, sec. 3).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel


from rlhf.errors import ConfigError, UserError
from rlhf.models.lora import LoRAConfig, add_lora, merge_lora


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message says what and how to fix it."""


@dataclass
class ModelConfig:
    name: str = "tiny"  # label used in logs, summaries and model cards
    name_or_path: str | None = None  # HF hub id or local directory; None builds `arch` from scratch
    tokenizer: str = "gpt2-bundled"  # tokenizer id/path; gpt2-bundled is GPT-2's BPE shipped offline
    arch: dict[str, Any] = field(default_factory=dict)  # GPT2Config fields when building from scratch
    trust_remote_code: bool = False  # never run code from a model repo unless asked to
    # transformers' attention kernel: eager, sdpa, flash_attention_2, ... auto: eager without CUDA (at
    # RLHF's short sequences, 40-64 tokens, it trains 13-24% faster than sdpa on CPU in bf16), else sdpa.
    attn_implementation: str = "auto"
    # LoRA adapters (rlhf/models/lora.py) instead of full fine-tuning, in every stage; null trains all
    # weights. On from the command line: model/lora=default, then e.g. model.lora.r=16.
    lora: LoRAConfig | None = None
    # Recompute each block's activations in backward instead of storing them: less memory for about
    # a third more compute in the trained models (the frozen ones run in eval mode and never store them).
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)

    @property
    def attention(self) -> str:
        if self.attn_implementation != "auto":
            return self.attn_implementation
        return "sdpa" if torch.cuda.is_available() else "eager"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)


def disable_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def fast_gelu(model: nn.Module) -> nn.Module:
    """Swaps `gelu_new` (GPT-2's tanh GELU, eight element-wise ops in Python) for PyTorch's one-kernel
    tanh GELU: the same function to float rounding, and it was ~20% of a CPU training step at 4 layers/256
    (`python -m rlhf.bench`). The saved config keeps `gelu_new`, so exports load unchanged anywhere."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    return model


def prepare(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """What every model the project trains, scores with or serves gets: dropout off, one-kernel GELU,
    and gradient checkpointing when the model config asks for it."""
    if gradient_checkpointing:
        # Non-reentrant: works when the inputs need no grad (token ids), and with LoRA's frozen base.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return fast_gelu(disable_dropout(model))


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers within `timeout` seconds (once per process; honours HF_ENDPOINT
    and the proxy variables). Without it transformers retries each file for tens of seconds."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def from_pretrained(cls, path: str, what: str, **kwargs):
    """`cls.from_pretrained` with a one-line error instead of a hub traceback when offline. A hub name
    is read from the local cache alone when the hub does not answer, so that fails in seconds."""
    if not os.path.isdir(os.path.expanduser(path)) and not hub_reachable():
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load {what} from '{path}' ({first[:200]}). "
            "Without hub access, download it elsewhere and pass a local directory, "
            "e.g. model.name_or_path=/path/to/gpt2"
        ) from None


def load_causal_lm(cfg: ModelConfig, init_from: str | None = None, vocab_size: int = 50257) -> PreTrainedModel:
    """The policy: `init_from` (an earlier stage's export) wins over the model config."""
    path = init_from or cfg.name_or_path
    if path:
        model = from_pretrained(AutoModelForCausalLM, path, "causal LM", trust_remote_code=cfg.trust_remote_code,
                                attn_implementation=cfg.attention)
    else:
        arch = {"vocab_size": vocab_size, "n_positions": 256, **cfg.arch}
        arch.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=cfg.attention)
        model = GPT2LMHeadModel(GPT2Config(**arch))
    model = prepare(model.float(), cfg.gradient_checkpointing)
    return add_lora(model, cfg.lora) if cfg.lora else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def head_fp32(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)` in fp32, also inside a bf16/fp16 autocast.

    For the heads whose outputs PPO compares across passes: the LM head (log-probs, ratios, KL),
    the reward and the value heads. Autocast would round their outputs to bf16, 8 bits of
    mantissa: at GPT-2's logit magnitudes that moves a log-prob by tenths of a nat, as much as
    PPO's clip range, and differently in the cached sampler and in the training forward.
    The hidden states reaching a head are fp32 already (autocast keeps layer norms in fp32).
    On CPU the matmul takes oneDNN's fast fp32 path where it is exact (`fast_fp32_matmul`).
    """
    with torch.autocast(hidden.device.type, enabled=False), fast_fp32_matmul(hidden.device.type):
        return head(hidden.float())


@functools.lru_cache(maxsize=None)
def _onednn_fast_fp32_is_exact() -> bool:
    """Whether fp32 matmuls under `torch.backends.mkldnn.matmul.fp32_precision = "bf16"` still give
    fp32 results on this CPU, probed once at GPT-2's logit magnitudes, skinny (decoding) and wide.

    That setting allows oneDNN to round fp32 inputs to bf16; where it does, the logits move by about
    2^-9 of their size (tenths of a nat at GPT-2's) and the path is not used. Where it does not
    (the AVX-512 BF16 machine this was measured on), oneDNN's fp32 kernels run the LM head's skinny
    matmuls up to 3x faster than the default ones (docs/benchmark.md).
    """
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(768, generator=g)
    w = torch.randn(2048, 768, generator=g) * 0.05 + direction / direction.norm() * 2.0
    for n in (8, 512):
        h = torch.randn(n, 768, generator=g) - direction / direction.norm() * 50.0  # logits near -100
        exact = h.double() @ w.double().T
        with fast_fp32_matmul("cpu", probe=False):  # both layouts the heads use: h @ W.T and W @ h.T
            products = (h @ w.T, (w @ h.T.contiguous()).T)
        if any(((z.double() - exact).abs().max() / exact.abs().max()).item() > 1e-5 for z in products):
            return False
    return True


@contextlib.contextmanager
def fast_fp32_matmul(device_type: str, probe: bool = True):
    """fp32 matmuls inside run on oneDNN's faster fp32 kernels, on CPU and only where that stays exact."""
    matmul = torch.backends.mkldnn.matmul
    if device_type != "cpu" or (probe and not _onednn_fast_fp32_is_exact()):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


@contextlib.contextmanager
def cached_autocast(device_type: str):
    """Inside an autocast (Lightning's bf16-mixed runs it with `cache_enabled=False`), cast each
    weight to the low precision once for everything run under this context rather than at every
    use: once per rollout for the sampler's decode steps, once per forward for a body called twice
    (`rlhf.models.shared_prefix`), where autograd would otherwise keep both casts for the backward.

    The cache is emptied on the way out, before any optimizer step can change the weights it holds.
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    try:
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


def output_heads(model: nn.Module) -> list[nn.Module]:
    """The modules `head_fp32` runs: the LM head and/or a scalar `score` head."""
    heads = [getattr(model, "score", None)]
    if hasattr(model, "get_output_embeddings"):
        heads.append(model.get_output_embeddings())
    return [h for h in heads if isinstance(h, nn.Module)]


@torch.no_grad()
def lower_matmul_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Stores a frozen model's linear-layer weights in `dtype`, for use under an autocast to `dtype` only.

    Autocast casts exactly these weights (and their biases) to `dtype` at every call, so under it
    the model computes the same numbers as before, without the cast and in half the memory.
    Embeddings, norms, weights tied to an embedding and the output heads (`head_fp32`) stay fp32.
    """
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m) for h in output_heads(model) for m in h.modules()}
    for m in model.modules():
        if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) not in tied and id(m) not in heads:
            m.to(dtype)
    # transformers loads a safetensors checkpoint memory-mapped, and the file stays mapped (its fp32
    # pages resident, in this process's RSS) while any tensor read from it lives. The lowered weights
    # are copies now; copying the rest too lets the mapping, and the fp32 originals, go.
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dtype != dtype:
            t.data = t.data.clone()
    return model


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    # A frozen model trains nothing, so a LoRA adapter it was loaded with (PPO's reward model is
    # built from the run's model config) is merged away: same outputs, no adapter compute.
    model = merge_lora(model)
    model.eval()
    model.requires_grad_(False)
    return model
