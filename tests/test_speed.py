"""What makes the loop fast (measured by `python -m rlhf.bench`) must keep it the same computation:
the one-kernel GELU is GPT-2's function, the fused optimizer still clips under bf16, the cached
autocast in generation changes no number and leaves no stale weights behind, and the allocator
setting really reuses memory."""
from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from rlhf.models.causal_lm import ModelConfig, fast_gelu, load_causal_lm, lower_matmul_weights
from rlhf.models.sampling import _sample, sample
from rlhf.stages.common import adamw, clip_gradients

ARCH = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}


def test_fast_gelu_is_gpt2s_gelu_and_keeps_the_saved_config(tmp_path):
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=100, **ARCH)).eval()
    fast = fast_gelu(GPT2LMHeadModel(GPT2Config(vocab_size=100, **ARCH)).eval())
    fast.load_state_dict(ref.state_dict())
    assert not any(isinstance(m, NewGELUActivation) for m in fast.modules())
    assert any(isinstance(m, NewGELUActivation) for m in ref.modules())
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, ref(ids).logits, atol=1e-5)
    fast.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks sdpa where CUDA is available")
def test_models_load_with_eager_attention_on_cpu():
    assert ModelConfig().attention == "eager"
    assert ModelConfig(attn_implementation="sdpa").attention == "sdpa"
    model = load_causal_lm(ModelConfig(arch=ARCH))
    assert model.config._attn_implementation == "eager"
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())


def _module(precision: str):
    plugin = MixedPrecision(precision, "cpu") if precision.endswith("mixed") else Precision()
    trainer = SimpleNamespace(precision=precision, precision_plugin=plugin)
    return SimpleNamespace(trainer=trainer, clip_gradients=None)


def test_adamw_is_fused_except_under_fp16_loss_scaling():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert adamw(params, _module("32-true").trainer, lr=1e-3).defaults["fused"]
    assert adamw(params, _module("bf16-mixed").trainer, lr=1e-3).defaults["fused"]
    opt = adamw(params, SimpleNamespace(precision="16-mixed"), lr=1e-3)
    assert not opt.defaults["fused"] and opt.defaults["foreach"]
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    assert len(adamw([*params, frozen], _module("32-true").trainer, lr=1e-3).param_groups[0]["params"]) == 1


def test_fused_adamw_gradients_are_clipped_under_bf16_mixed():
    # Lightning's own clip_gradients raises here (fused + AMP plugin); ours clips by torch.
    module = _module("bf16-mixed")
    w = torch.nn.Parameter(torch.zeros(4))
    opt = adamw([w], module.trainer, lr=1e-3)
    w.grad = torch.full((4,), 10.0)  # norm 20
    clip_gradients(module, opt, 1.0)
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    w.grad = torch.full((4,), 10.0)
    clip_gradients(module, opt, 0.5, "value")
    assert torch.equal(w.grad, torch.full((4,), 0.5))


def test_generation_autocast_cache_changes_nothing_and_is_emptied():
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=100, **ARCH)).eval()
    q = torch.randint(0, 100, (2, 6))
    qm = torch.ones_like(q)
    cached = lambda: sample(policy, q, qm, 5, 1.0, 0, generator=torch.Generator().manual_seed(1))  # noqa: E731
    fresh = lambda: _sample(policy, q, qm, 5, 1.0, 0, None, torch.Generator().manual_seed(1))  # noqa: E731
    # Lightning's bf16-mixed: one outer autocast, without the cast cache, around the whole update.
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        (tok, logits), (tok0, logits0) = cached(), fresh()
        assert torch.equal(tok, tok0) and torch.equal(logits, logits0)
        with torch.no_grad():  # an optimizer step between rollouts: the next rollout must see it
            for p in policy.parameters():
                p.mul_(1.5)
        _, logits2 = cached()
        assert torch.equal(logits2, fresh()[1]) and not torch.equal(logits2, logits)


PAGE_FAULTS = """
import resource, sys, torch
from rlhf.training.memory import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):  # 64 MiB, allocated and freed: the heap settles into reusable blocks
    torch.zeros(64 * 2**20 // 4)
for _ in range(7):  # faults per allocation, one line
    before = faults()
    torch.zeros(64 * 2**20 // 4)
    print(faults() - before, end=" ")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_them_in():
    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        return sorted(int(n) for n in out.stdout.split())

    pages = 64 * 2**20 / 4096
    assert min(faults("off")) > 0.5 * pages  # every new 64 MiB tensor is page-faulted in again
    # Freed memory is reused: the median allocation faults nothing in. Not judged on every one: on
    # CI one allocation in a run faulted its pages in (a small allocation splitting the freed block
    # would make the next one extend the heap), which a mean over the run let fail the test.
    assert statistics.median(faults("on")) < 0.05 * pages


def test_frozen_models_bf16_matmul_weights_compute_the_same_under_autocast():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, **ARCH)).eval()
    ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids).logits
        lower_matmul_weights(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.float32  # also the tied LM head
    assert model.transformer.h[0].ln_1.weight.dtype == torch.float32


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_lowering_a_loaded_model_lets_go_of_its_checkpoint_file(tmp_path):
    """transformers maps a safetensors checkpoint lazily; while any tensor read from it lives, the file
    stays mapped with its fp32 pages in the process's RSS (the reward model's whole body, beside its
    bf16 copies). After lowering, no tensor of the model may lie in the file's mapping."""
    from transformers import AutoModelForCausalLM

    GPT2LMHeadModel(GPT2Config(vocab_size=100, **ARCH)).save_pretrained(tmp_path / "m")

    def in_file(model) -> list[str]:
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                 for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path / "m") in line]
        return [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                if any(a <= t.data_ptr() < b for a, b in spans)]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    if not in_file(model):
        pytest.skip("this transformers version copies checkpoints on load")
    lower_matmul_weights(model)
    assert in_file(model) == []
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.float32
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_fast_fp32_matmul_stays_fp32_and_restores_the_setting(monkeypatch):
    """The heads' oneDNN fp32 path: used only where the probe found it exact, fp32-accurate at GPT-2's
    logit magnitudes (bf16 inputs would be off by tenths), and the global setting is put back."""
    from rlhf.models import causal_lm

    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3000, 256, generator=g) * 0.05 + 2.0 / 16  # every logit near -100 below
    h = torch.randn(8, 256, generator=g) - 50.0 / 16
    exact = h.double() @ w.double().T
    used = []
    probe = causal_lm._onednn_fast_fp32_is_exact()  # this CPU's answer: where it is no, only the fallback is checked
    for found_exact in ((True,) if probe else ()) + (False,):
        monkeypatch.setattr(causal_lm, "_onednn_fast_fp32_is_exact", lambda e=found_exact: e)
        with causal_lm.fast_fp32_matmul("cpu"):
            used.append(setting.fp32_precision)
            z = h @ w.T
        assert setting.fp32_precision == before
        assert z.dtype == torch.float32 and (z.double() - exact).abs().max() < 1e-3  # |z| ~ 100
    assert used == (["bf16"] if probe else []) + [before]
    with causal_lm.fast_fp32_matmul("cuda"):  # other devices: untouched
        assert setting.fp32_precision == before


def test_packed_linears_compute_what_the_layers_compute_and_give_their_forwards_back():
    """The rollout's oneDNN-prepacked layers: used inside a bf16 autocast (every Linear/Conv1D, the LM
    head in fp32), the same numbers as the layers' own forwards to bf16 rounding, autograd still
    served, nothing left patched afterwards, and nothing packed in fp32 (seeded fp32 runs keep
    their exact numbers)."""
    from transformers.pytorch_utils import Conv1D

    from rlhf.models.packed import _supported, packed_linears

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, **ARCH)).eval()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad(), packed_linears(model):  # fp32: untouched
        assert not any("forward" in vars(m) for m in layers)
    if _supported(torch.bfloat16) and _supported(torch.float32):  # else: the model must be left alone (below)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                ref = model(ids).logits
                with packed_linears(model), torch.profiler.profile() as prof:
                    assert all("forward" in vars(m) for m in layers)
                    got = model(ids).logits
            assert any("_linear_pointwise" in e.key for e in prof.key_averages())
            assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
            with torch.no_grad(), packed_linears(model):
                with torch.enable_grad():  # a caller recording autograd gets the layers' own forwards
                    model(ids).logits.float().sum().backward()
        assert model.lm_head.weight.grad is not None and model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert not any("forward" in vars(m) for m in layers)
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model):  # autograd on: nothing is packed
        assert not any("forward" in vars(m) for m in layers)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak through /proc (Linux)")
def test_the_peak_rss_starts_afresh_for_each_stage():
    """A multirun's jobs share one process: a job's peak must not be an earlier job's. After a large
    buffer is freed (glibc keeps freed memory when `keep_freed_memory` is on), the reset hands it
    back and the next peak counts from there."""
    from rlhf.training.memory import keep_freed_memory, peak_rss_mb, reset_peak_rss

    keep_freed_memory()
    big = torch.ones(96 * 2**20)  # 384 MiB, touched
    high = peak_rss_mb()
    del big
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert peak_rss_mb() < high - 300
    small = torch.ones(2**20)
    assert peak_rss_mb() < high - 300 and small.sum() > 0
