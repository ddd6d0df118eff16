"""What both sides of `python -m rlhf.bench` share: the shape, the random-init models and the
prompts both load, the model-FLOP count, the matmul peak, threads and peak memory.

    python -m rlhf.bench --preset small --vs-trl

Model FLOPs (counted analytically; attention score/value products and element-wise work are NOT
included, so MFU is a slight underestimate at long contexts). GPT-2 with L layers, width d,
vocabulary V; prompt P tokens, response R tokens, T = P + R:

    N_body = 12 * L * d^2         matmul weights of the blocks (qkv 3d^2, proj d^2, mlp 8d^2)
    head   = d * V                the LM head (tied to the embedding; the lookup itself is free)

One PPO episode (a forward is 2 FLOPs per weight per token, forward + backward 6):
    generation   2 * (N_body * T + head * R)    prefill + decode; LM head only where logits are used
    reference    2 * (N_body * T + head * R)    log-probs of the response under the frozen copy
    value        2 * N_body * T                 rollout values (value model = RM-shaped copy)
    reward       2 * N_body * T                 reward-model score
    training     E * [6 * (N_body * T + head * R) + 6 * N_body * T]   policy + value, E PPO epochs
One reward-model pair: 6 * N_body * (T_chosen + T_rejected) (real tokens, not padding).
One GRPO episode (one response; no value model, I = num_iterations):
    generation + reference (if beta > 0) + reward as for PPO, training I * 6 * (N_body * T + head * R)
    (the old log-probs come from generation's logits: a separate forward for them, as TRL runs when
    I > 1, is not counted as useful work). The prompt is counted once per response, as a plain
    forward computes it; ours runs each group's prompt once (`shared_prefix`), so its GRPO MFU is
    the work of the plain forward per second, which can exceed what the hardware executed.

The same count is used for both implementations: it is the useful work, so an implementation
that computes logits it never uses (e.g. over prompt positions) gets a lower MFU, not a higher one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.training.memory import current_rss_mb, peak_rss_mb  # noqa: F401  (re-exported for both bench sides)

PAD_ID = 50256  # GPT-2's eos, also its pad
SEED = 1234  # weights, prompts and sampling


@dataclass
class Shape:
    layers: int = 4
    dim: int = 256
    heads: int = 4
    vocab: int = 50257
    batch: int = 16
    prompt_length: int = 32
    response_length: int = 32
    ppo_epochs: int = 4
    mini_batches: int = 1  # optimizer steps per pass over a rollout (PPO and GRPO)
    rm_response_length: int = 8  # response tokens per side of an RM pair (synthetic responses have 4-10)
    num_generations: int = 4  # GRPO: responses per prompt (batch counts responses, as TRL's)
    num_iterations: int = 2  # GRPO: passes over each rollout (mu; ours' default)
    beta: float = 0.05  # GRPO: k3 KL weight (> 0: both sides run a reference model)

    def id(self, kind: str) -> str:
        base = f"L{self.layers}-d{self.dim}-h{self.heads}-V{self.vocab}-B{self.batch}-P{self.prompt_length}"
        if kind == "rm":
            return f"{base}-R{self.rm_response_length}"
        if kind == "grpo":
            return f"{base}-R{self.response_length}-G{self.num_generations}-I{self.num_iterations}-M{self.mini_batches}"
        return f"{base}-R{self.response_length}-E{self.ppo_epochs}-M{self.mini_batches}"


# ----- model FLOPs -----
def body_params(layers: int, dim: int) -> int:
    return 12 * layers * dim * dim


def ppo_flops_per_episode(s: Shape) -> float:
    body, head = body_params(s.layers, s.dim), s.dim * s.vocab
    T, R = s.prompt_length + s.response_length, s.response_length
    policy_fwd = 2 * (body * T + head * R)
    generation = policy_fwd
    reference = policy_fwd
    value = reward = 2 * body * T
    training = s.ppo_epochs * (3 * policy_fwd + 6 * body * T)
    return float(generation + reference + value + reward + training)


def grpo_flops_per_episode(s: Shape) -> float:
    body, head = body_params(s.layers, s.dim), s.dim * s.vocab
    T, R = s.prompt_length + s.response_length, s.response_length
    policy_fwd = 2 * (body * T + head * R)
    reference = policy_fwd if s.beta > 0 else 0
    return float(policy_fwd + reference + 2 * body * T + s.num_iterations * 3 * policy_fwd)


def flops_per_episode(kind: str, s: Shape) -> float:
    return grpo_flops_per_episode(s) if kind == "grpo" else ppo_flops_per_episode(s)


def rm_flops_per_pair(s: Shape, mean_pair_tokens: float) -> float:
    return float(6 * body_params(s.layers, s.dim) * mean_pair_tokens)


# ----- the machine -----
def set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def machine_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the core count, for result tables."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def matmul_peak_tflops(precision: str, sizes=(1024, 2048), repeats: int = 5, device: str = "cpu") -> float:
    """Best TFLOP/s of a square `a @ b` over `sizes` in fp32 or bf16 (CPU: the current thread count).

    On CUDA the sizes are 4096 and 8192 (a GPU is far from its peak at 2048) and each product is
    synchronised before the clock stops. fp32 on CUDA uses TF32 only if the caller enabled it.
    """
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = 0.0
    g = torch.Generator().manual_seed(0)
    for n in ((4096, 8192) if cuda else sizes):
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        a @ b  # warm-up: oneDNN primitive / cuBLAS handle creation, page faults
        sync()
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process (None without CUDA)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


# ----- the models and data both sides load -----
def build_models(s: Shape, out: Path, seed: int = SEED) -> dict:
    """A random-init GPT-2 policy and a reward model (scalar head) saved with their tokenizer.

    The value model is initialised from the reward model by both implementations, the reference
    policy is a copy of the policy.
    """
    import torch
    import transformers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from rlhf.models.tokenizer import load_tokenizer

    if s.vocab < 50257:
        raise SystemExit(f"--vocab {s.vocab}: the prompts use GPT-2's tokenizer, so the vocabulary must be >= 50257")
    transformers.utils.logging.disable_progress_bar()
    tok = load_tokenizer("gpt2-bundled")
    conf = dict(n_layer=s.layers, n_embd=s.dim, n_head=s.heads, vocab_size=s.vocab,
                n_positions=max(1024, s.prompt_length + s.response_length), resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=PAD_ID, eos_token_id=PAD_ID)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(GPT2Config(**conf))
    torch.manual_seed(seed + 1)
    rm = GPT2ForSequenceClassification(GPT2Config(**conf, num_labels=1, pad_token_id=PAD_ID))
    dirs = {"policy": out / "policy", "rm": out / "rm"}
    for model, d in ((policy, dirs["policy"]), (rm, dirs["rm"])):
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
    return {k: str(v) for k, v in dirs.items()}


def make_data(s: Shape, n_prompts: int, n_pairs: int, seed: int = SEED) -> dict:
    """Prompts and preference pairs of exactly one length each, as text and as token ids.

    Only synthetic prompts of at least `prompt_length` tokens are kept, so after the usual left
    truncation every prompt is exactly `prompt_length` tokens and every batch has the same width in
    both implementations whatever order their loaders shuffle into. RM pairs keep responses of at
    least `rm_response_length` tokens for the same reason. Token ids come from the project's own
    datamodule encoding, so the TRL side gets exactly the tokens ours builds.
    """
    from rlhf.data import PreferenceDataModule
    from rlhf.data.synthetic import generate_pairs
    from rlhf.models.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2-bundled")
    prompts, pairs = [], []
    n, attempt = max(256, 8 * max(n_prompts, n_pairs)), 0
    roundtrips = lambda ids: tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids  # noqa: E731
    while len(prompts) < n_prompts or len(pairs) < n_pairs:
        cand = generate_pairs(n, seed + attempt)
        plen = [len(x) for x in tok([p.prompt for p in cand], add_special_tokens=False)["input_ids"]]
        clen = [len(x) for x in tok([p.chosen for p in cand], add_special_tokens=False)["input_ids"]]
        rlen = [len(x) for x in tok([p.rejected for p in cand], add_special_tokens=False)["input_ids"]]
        ptoks = tok([p.prompt for p in cand], add_special_tokens=False)["input_ids"]
        had = (len(prompts), len(pairs))
        for p, a, b, c, ids in zip(cand, plen, clen, rlen, ptoks):
            if a >= s.prompt_length and roundtrips(ids[-s.prompt_length:]):
                prompts.append(p)
                if min(b, c) >= s.rm_response_length:
                    pairs.append(p)
        # None of this many candidates fits: the lengths are beyond what the synthetic data has
        # (each further attempt doubles the candidates, so it would only grow without end).
        if (len(prompts) == had[0] and len(prompts) < n_prompts) or (len(pairs) == had[1] and len(pairs) < n_pairs):
            raise SystemExit(f"rlhf.bench: no synthetic prompt of {len(cand)} has --prompt-length {s.prompt_length} "
                             f"tokens (longest {max(plen)})" + (f" with both responses of --rm-response-length "
                             f"{s.rm_response_length} (longest {max(min(b, c) for b, c in zip(clen, rlen))})"
                             if n_pairs else "") + ": choose shorter lengths")
        attempt += 1
        n *= 2
    prompts, pairs = prompts[:n_prompts], pairs[:n_pairs]

    def encode(mode, items):
        dm = PreferenceDataModule(None, tok, mode, s.batch, s.prompt_length,
                                  s.rm_response_length if mode == "rm" else s.response_length)
        return dm._encode(items)

    prompt_ids = [x["input_ids"] for x in encode("prompts", prompts)]
    rm_items = encode("rm", pairs)
    assert all(len(x) == s.prompt_length for x in prompt_ids)
    # The kept tokens as text that encodes back to exactly them: for TRL's GRPOTrainer, which
    # tokenizes prompt text itself and has no prompt truncation, and for ours on the same text.
    exact = [tok.decode(ids) for ids in prompt_ids]
    return {"prompts": [p.prompt for p in prompts], "prompt_ids": prompt_ids, "prompts_exact": exact,
            "pairs": [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs],
            "chosen_ids": [x["chosen_input_ids"] for x in rm_items],
            "rejected_ids": [x["rejected_input_ids"] for x in rm_items]}


# ----- timing -----
def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Window:
    """End-of-update timestamps; the timed window runs from the end of the last warm-up update
    (or the start of training when there is none) to the end of the last update, so it holds
    everything the loop does between updates too (data, logging, hooks)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = None
        self.ends: list[float] = []
        self.phases_at_start: dict = {}

    def begin(self, phases: dict | None = None) -> None:
        _cuda_sync()
        self.start = time.perf_counter()
        self.phases_at_start = dict(phases or {})

    def step_end(self, phases: dict | None = None) -> None:
        _cuda_sync()  # queued GPU work belongs to the update that queued it
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            self.phases_at_start = dict(phases or {})

    def result(self, items_per_update: int, phases_at_end: dict | None = None) -> dict:
        timed = len(self.ends) - self.warmup
        if timed <= 0:
            raise RuntimeError(f"only {len(self.ends)} updates ran, warm-up is {self.warmup}")
        t0 = self.ends[self.warmup - 1] if self.warmup else self.start
        seconds = self.ends[-1] - t0
        out = {"timed_updates": timed, "timed_items": timed * items_per_update, "timed_seconds": seconds,
               "items_per_s": timed * items_per_update / seconds}
        if phases_at_end is not None:
            split = {k: phases_at_end.get(k, 0.0) - self.phases_at_start.get(k, 0.0)
                     for k in ("generation", "scoring", "training")}
            split["other"] = seconds - sum(split.values())
            out["seconds"] = split
        return out


def optimizer_name(opt) -> str:
    """e.g. "AdamW(fused)": which implementation steps the weights (fused, foreach or the for-loop)."""
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps TRL's
    d = opt.defaults
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default: fused/foreach off"
    return f"{type(opt).__name__}({impl})"


def write_result(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result))


def shape_from(d: dict) -> Shape:
    return Shape(**d)


def shape_dict(s: Shape) -> dict:
    return asdict(s)
