"""Decoding speed: milliseconds per decode step and memory-bandwidth utilisation, ours against `generate`.

    python -m rlhf.bench --kind generate                     # GPT-2 small shape, batch 1, 8, 32 x 32..256 tokens
    python -m rlhf.bench --kind generate --preset small --batches 8 --response-lengths 64 --precision fp32
    python -m rlhf.bench --kind generate --device cuda    # on a GPU (part `decode` of rlhf.bench.gpu_check)

One JSON line per (implementation, batch, response length): {"kind": "generate", "impl": "ours" |
"ours-graph" (CUDA only: the decode step replayed as a CUDA graph, `sample(graph=True)`) | "transformers",
"batch", "prompt_length", "response_length", "attention", "ms_per_step", "mbu", "bytes_per_step",
"bandwidth_gbs", "precision", "threads", "device", "machine"}, then one per (batch, length) with "ratio"
(transformers' ms per step over ours: above 1, ours is faster) and on CUDA "ours_graph_ms", "graph_ratio".

How: a random-init GPT-2 of the preset's shape (the weights do not change the cost), left-padded
prompts of `--prompt-length` tokens, every row decoding exactly `response_length` tokens (no stop
token) at temperature 1. Ours is `rlhf.models.sampling.sample` as the rollout calls it
(`logprobs=True`: the drawn tokens' log-probs step by step, no [B, R, V] logits kept); theirs is
`model.generate(do_sample=True, top_k=0)`, which keeps no logits either. A decode step's time is
(time for R tokens - time for 1 token) / (R - 1), so the prefill is not counted; the best of `--rounds` is kept. MBU, as LLM-serving
benchmarks report it: the bytes a decode step must read (every weight once, the LM head included,
plus the KV cache at the step's mean context length) per step time, over the memory bandwidth this
command measures (a large tensor copy on the device: bytes read + written per second), with the weights counted at
the benchmark's precision. Ours is the model as the project loads a policy (`load_causal_lm`: its
attention kernel, eager without CUDA, and the one-kernel GELU); in `bf16` it runs as the rollout does
under Lightning's bf16-mixed (fp32 weights packed once per rollout for oneDNN, the body in bf16 and the
LM head in fp32). Transformers' `generate` runs on a bf16 copy of the same weights with the attention
kernel transformers chooses by default, as inference usually runs it. Each line names its "attention".
"""
from __future__ import annotations

import json
import time

from rlhf.bench.common import machine_name


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth_gbs(mb: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Best GB/s of copying an `mb` MB tensor into another on `device` (read + write bytes per second)."""
    import torch

    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def step_bytes(model, batch: int, prompt_length: int, response_length: int, elem: int) -> int:
    """Bytes one decode step must read at `elem` bytes per number: the weights (tied embeddings once)
    and the KV cache at the step's mean context length."""
    params = {p.data_ptr(): p.numel() for p in model.parameters()}
    cfg = model.config
    mean_context = prompt_length + (response_length - 1) / 2
    kv = 2 * cfg.n_layer * batch * mean_context * cfg.n_embd
    return int((sum(params.values()) + kv) * elem)


def _timed(fn, rounds: int, device: str = "cpu") -> float:
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure(model, impl: str, batch: int, prompt_length: int, response_length: int, rounds: int,
            autocast: bool = False) -> float:
    """Milliseconds per decode step (prefill excluded) of `impl` on this model, on the model's device
    (`autocast`: in bf16)."""
    import torch

    from rlhf.models.sampling import sample

    device = next(model.parameters()).device.type
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_length), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            if impl.startswith("ours"):
                sample(model, ids, mask, n, 1.0, 0, None, logprobs=True, graph=impl == "ours-graph")
            else:
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0)
    run(2)  # warm-up
    full, one = _timed(lambda: run(response_length), rounds, device), _timed(lambda: run(1), rounds, device)
    return (full - one) / (response_length - 1) * 1000


def run_generate(shape, batches: list[int], lengths: list[int], prompt_length: int, precision: str,
                 rounds: int, threads: int, device: str = "cpu") -> list[dict]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from rlhf.models.causal_lm import ModelConfig, load_causal_lm

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    arch = {"n_layer": shape.layers, "n_embd": shape.dim, "n_head": shape.heads,
            "n_positions": max(1024, prompt_length + max(lengths))}
    # Ours built by the project's own loader, as a policy is (its default attention kernel, one-kernel
    # GELU); transformers' as `from_pretrained` gives it to a user, with its default kernel.
    model = load_causal_lm(ModelConfig(arch=arch), vocab_size=shape.vocab).eval()
    bf16 = precision == "bf16"
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=shape.vocab, **arch)).eval()
    theirs.load_state_dict(model.state_dict())
    models = {"ours": model, "transformers": theirs.to(torch.bfloat16) if bf16 else theirs}
    models = {k: m.to(device) for k, m in models.items()}
    bw = bandwidth_gbs(device=device)
    rows = []
    for b in batches:
        for r in lengths:
            nbytes = step_bytes(model, b, prompt_length, r, 2 if bf16 else 4)
            ms = {}
            for impl in ("ours", "ours-graph", "transformers") if device == "cuda" else ("ours", "transformers"):
                m = models[impl.split("-")[0]]
                ms[impl] = measure(m, impl, b, prompt_length, r, rounds, autocast=bf16 and impl != "transformers")
                row = {"kind": "generate", "impl": impl, "batch": b, "prompt_length": prompt_length,
                       "response_length": r, "attention": m.config._attn_implementation,
                       "ms_per_step": round(ms[impl], 3),
                       "mbu": round(nbytes / (ms[impl] / 1000) / (bw * 1e9), 4), "bytes_per_step": nbytes,
                       "bandwidth_gbs": round(bw, 2), "precision": precision, "threads": threads,
                       "shape": f"{shape.layers}x{shape.dim}", "device": device,
                       "machine": machine_name() if device == "cpu" else torch.cuda.get_device_name()}
                print(json.dumps(row), flush=True)
                rows.append(row)
            cmp = {"kind": "generate", "batch": b, "response_length": r, "ours_ms": round(ms["ours"], 3),
                   "transformers_ms": round(ms["transformers"], 3),
                   "ratio": round(ms["transformers"] / ms["ours"], 3)}
            if "ours-graph" in ms:  # the decode step replayed as a CUDA graph (rlhf/models/graph_decode.py)
                cmp.update(ours_graph_ms=round(ms["ours-graph"], 3),
                           graph_ratio=round(ms["transformers"] / ms["ours-graph"], 3))
            print(json.dumps(cmp), flush=True)
            rows.append(cmp)
    return rows
