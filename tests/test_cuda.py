"""What only a GPU can check: the CUDA paths of the pipeline (trainer=gpu, bf16-mixed, sdpa
attention, fused AdamW on device) run, learn nothing wrong, and report GPU memory.

Skipped without CUDA; `python -m rlhf.bench.gpu_check` runs this file on a GPU machine.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from rlhf.models.causal_lm import ModelConfig, load_causal_lm
from rlhf.training.pipeline import train

from conftest import TINY_DATA, TINY_PPO, compose_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ARCH = {"n_layer": 2, "n_embd": 64, "n_head": 2}


def test_auto_attention_is_sdpa_and_adamw_fused_on_cuda():
    assert ModelConfig().attention == "sdpa"
    model = load_causal_lm(ModelConfig(arch=ARCH)).cuda()
    assert model.config._attn_implementation == "sdpa"
    from types import SimpleNamespace

    from rlhf.stages.common import adamw

    opt = adamw(model.parameters(), SimpleNamespace(precision="bf16-mixed"), lr=1e-3)
    assert opt.defaults["fused"] is True
    model(torch.randint(0, 100, (2, 8), device="cuda")).logits.float().sum().backward()
    opt.step()  # a fused step on device tensors


def test_ppo_on_gpu_in_bf16(trained_artifacts, tmp_path):
    run = tmp_path / "run"
    summary = train(compose_train(run, "stage=ppo", "trainer=gpu", f"ppo.policy_path={trained_artifacts['sft']}",
                                  f"reward.model_path={trained_artifacts['rm']}", *TINY_DATA, *TINY_PPO,
                                  "ppo.max_steps=3", "eval.eval_every=1"))
    res = summary["stages"]["ppo"]
    assert res["steps"] == 3 and res["peak_gpu_mb"] > 0
    df = pd.read_csv(run / "ppo" / "metrics.csv")
    # bf16-mixed on CUDA: the rollout's log-probs and the first training forward's agree (heads in fp32).
    assert df["logprob_gap_max"].max() < 0.05
    assert df[["policy_loss", "value_loss", "kl_divergence", "reward_score"]].notna().all().all()
    assert pd.read_csv(run / "ppo" / "eval.csv")["step"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_other_algorithms_run_on_gpu(algo, trained_artifacts, tmp_path):
    reward = [f"reward.model_path={trained_artifacts['rm']}"] if algo != "dpo" else []
    summary = train(compose_train(tmp_path / "run", f"algo={algo}", f"stage={algo}", "trainer=gpu",
                                  f"{algo}.policy_path={trained_artifacts['sft']}", *reward, *TINY_DATA,
                                  f"{algo}.max_steps=2", f"{algo}.eval_prompts=8"))
    assert summary["stages"][algo]["steps"] == 2 and summary["stages"][algo]["peak_gpu_mb"] > 0


@pytest.mark.parametrize("autocast", [False, True])
def test_decode_step_in_a_cuda_graph_draws_what_the_eager_loop_draws(autocast):
    from rlhf.models.sampling import sample

    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(arch=ARCH)).cuda().eval()
    q = torch.randint(0, 100, (4, 9), device="cuda")
    qm = torch.ones_like(q)
    qm[0, :3] = 0
    out = {}
    for graph in (False, True, True):  # the second graph call replays what the first recorded
        g = torch.Generator(device="cuda").manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out[graph] = sample(model, q, qm, 12, 1.0, 0, generator=g, logprobs=True, graph=graph)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], atol=2e-3 if autocast else 1e-4, rtol=0)


def test_grpo_with_the_decode_graph_on_gpu(trained_artifacts, tmp_path):
    summary = train(compose_train(tmp_path / "run", "algo=grpo", "stage=grpo", "trainer=gpu", "grpo.decode_graph=true",
                                  f"grpo.policy_path={trained_artifacts['sft']}",
                                  f"reward.model_path={trained_artifacts['rm']}", *TINY_DATA, "grpo.max_steps=3",
                                  "grpo.eval_prompts=8"))
    assert summary["stages"]["grpo"]["steps"] == 3
    df = pd.read_csv(tmp_path / "run" / "grpo" / "metrics.csv")
    assert df["logprob_gap_max"].max() < 0.05
