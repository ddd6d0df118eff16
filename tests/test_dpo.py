"""DPO: the loss against its formulas, the datamodule's "pairs" batches, and a short fit of the stage.
(Against TRL's DPOTrainer, and the other preference stages: tests/test_preference.py.)"""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from rlhf.algorithms.dpo import dpo_loss
from rlhf.data import PreferenceDataModule, PreferencePair, PreferenceSplits, SyntheticPreferences, gold_reward
from rlhf.models.causal_lm import ModelConfig
from rlhf.stages.base import Inputs
from rlhf.stages.dpo import DPOConfig, DPOModule

# Log-probs (policy chosen, policy rejected, ref chosen, ref rejected) chosen so the logits
# (pc - pr) - (rc - rr) are -3, 0.5 and 4: each loss's branches (hinge's kink, IPO's target) are hit.
PC, PR = [-10.0, -8.0, -5.0], [-9.0, -9.0, -12.0]
RC, RR = [-11.0, -7.5, -6.0], [-13.0, -9.0, -9.0]
NC, NR = [1, 1, 1], [1, 1, 1]  # one-token responses: IPO's per-token log-ratios equal the summed ones here


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _reference(beta: float, loss_type: str, ls: float) -> list[float]:
    out = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        z = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":
            out.append(-(1 - ls) * _logsig(beta * z) - ls * _logsig(-beta * z))
        elif loss_type == "ipo":
            out.append((z - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * z))
    return out


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_formulas(loss_type, ls, beta):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    losses, chosen, rejected = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, loss_type, ls, t(NC), t(NR))
    assert losses.tolist() == pytest.approx(_reference(beta, loss_type, ls), rel=1e-12)
    assert chosen.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)])
    assert rejected.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PR, RR)])


def test_dpo_loss_gradient_flows_to_policy_only():
    pc, pr = torch.tensor(PC, requires_grad=True), torch.tensor(PR, requires_grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, torch.tensor(RC), torch.tensor(RR), 0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    assert not chosen.requires_grad and not rejected.requires_grad  # rewards are for logging


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*(torch.zeros(2),) * 4, beta=0.1, loss_type="kto")


@pytest.mark.parametrize("bad,match", [({"loss_type": "simpo"}, "loss_type"), ({"label_smoothing": 0.5}, "label_smoothing"),
                                       ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid"), ({"beta": 0}, "beta")])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**bad)


# --------------------------------------------------------------------------- "pairs" batches

PAIRS = [PreferencePair("\n\nHuman: Hi?\n\nAssistant:", " Hello there, friend.", " No."),
         PreferencePair("\n\nHuman: A longer question about ovens?\n\nAssistant:", " Sure.", " Ugh whatever go away")]


@pytest.fixture(scope="module")
def tok():
    from rlhf.models.tokenizer import load_tokenizer

    return load_tokenizer("gpt2-bundled")


def test_pairs_batch_labels_and_index(tok):
    dm = PreferenceDataModule(PreferenceSplits(train=PAIRS, val=PAIRS[::-1]), tok, "pairs", batch_size=2)
    dm.setup()
    b = next(iter(dm.val_dataloader()))
    eos = tok.eos_token_id
    assert b["index"].tolist() == [0, 1]  # position in its own split (val here)
    width = b["chosen_input_ids"].shape[1]
    assert b["rejected_input_ids"].shape[1] == width  # one width for both sides
    for i, p in enumerate(PAIRS[::-1]):
        prompt = tok(p.prompt).input_ids
        for side, text in (("chosen", p.chosen), ("rejected", p.rejected)):
            resp = tok(text).input_ids + [eos]
            n = len(prompt) + len(resp)
            assert b[f"{side}_input_ids"][i, :n].tolist() == prompt + resp
            assert b[f"{side}_attention_mask"][i].tolist() == [1] * n + [0] * (width - n)  # right padding
            assert b[f"{side}_labels"][i].tolist() == [-100] * len(prompt) + resp + [-100] * (width - n)


def test_pairs_truncation_drops_eos_and_ordered_loader_shards(tok):
    dm = PreferenceDataModule(PreferenceSplits(train=PAIRS * 3, val=[]), tok, "pairs", 2, max_response_length=2)
    labels = dm.ordered_loader().dataset[1]["rejected_labels"]
    assert [x for x in labels if x != -100] == tok(PAIRS[1].rejected).input_ids[:2]  # cut: no eos
    shards = [[i for b in dm.ordered_loader("train", r, 2) for i in b["index"].tolist()] for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3, 5]]


# --------------------------------------------------------------------------- the stage

def test_dpo_stage_fit(tmp_path, monkeypatch):
    pl.seed_everything(0)
    cfg = DPOConfig(lr=3e-3, warmup_steps=2, batch_size=8, max_steps=20, max_prompt_length=32,
                    max_response_length=12, beta=0.1, loss_type="sigmoid", val_every=10, val_batches=1, eval_prompts=8, response_length=6)
    model = ModelConfig(arch={"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64})
    module = DPOModule(cfg, model, Inputs(gold=gold_reward))
    splits = SyntheticPreferences(n_pairs=240, seed=0).load()
    dm = PreferenceDataModule(splits, module.tokenizer, "pairs", cfg.batch_size, cfg.max_prompt_length,
                              cfg.max_response_length)
    calls = []
    original = DPOModule.compute_reference_cache
    monkeypatch.setattr(DPOModule, "compute_reference_cache", lambda self: calls.append(1) or original(self))
    rows = []

    class Rows(pl.Callback):
        def on_train_batch_end(self, trainer, m, *args):
            rows.append(dict(m.csv_row))

    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = pl.Trainer(max_steps=cfg.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Rows()], max_epochs=-1,
                         val_check_interval=cfg.val_every, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)

    assert calls == [1] and module.ref_logps.shape == (len(splits.train), 2)
    batch = next(iter(dm.ordered_loader()))  # the table holds the reference's log-probs, by pair index
    cached = module.ref_logps[batch["index"]]
    assert torch.allclose(torch.stack(module.reference_logps(batch), 1), cached, atol=1e-4)
    with torch.no_grad():  # TRL's units: summed over each response's tokens, from the plain forward
        ids, labels = batch["chosen_input_ids"], batch["chosen_labels"][:, 1:]
        logp = torch.log_softmax(module.ref_policy(ids, attention_mask=batch["chosen_attention_mask"]).logits[:, :-1], -1)
        logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose((logp * (labels != -100)).sum(1), cached[:, 0], atol=1e-3)
    assert rows[0]["policy_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert all(torch.equal(v, before[k]) for k, v in module.ref_policy.state_dict().items())
    late = rows[-5:]
    assert sum(r["reward_accuracy"] for r in late) / len(late) > 0.5 or late[-1]["reward_margin"] > rows[1]["reward_margin"]
    assert "val/rewards/accuracies" in trainer.callback_metrics

    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("ref_policy.") for k in ckpt["state_dict"])
    assert torch.equal(ckpt["reference_logps"], module.ref_logps)

    result = module.finish(dm, tmp_path, module.tokenizer, None)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    trained = module.policy.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items() if k in trained)
    assert result["eval_prompts"] == 8 and 0.0 <= result["gold_win_rate"] <= 1.0
    assert result["dpo_reward_accuracy"] == pytest.approx(float(trainer.callback_metrics["val/rewards/accuracies"]))
