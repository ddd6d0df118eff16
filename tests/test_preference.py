"""KTO, ORPO and SimPO (and DPO's metric units): each loss against its formula and against TRL's own
implementation, the one-line config errors, the plans, and a two-step run of each stage."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from rlhf.algorithms.dpo import dpo_loss
from rlhf.algorithms.kto import kto_loss, kto_reference_point
from rlhf.algorithms.orpo import odds_ratio_loss
from rlhf.algorithms.simpo import simpo_loss
from rlhf.errors import ConfigError
from rlhf.stages import stages
from rlhf.training.pipeline import train
from rlhf.training.plan import plan_stages

from conftest import TINY_DATA, compose_train

F64 = torch.float64
# Summed log-probs of chosen / rejected under policy and reference, and response lengths.
PC, PR, RC, RR = [-10.0, -8.0, -5.0], [-9.0, -9.0, -12.0], [-11.0, -7.5, -6.0], [-13.0, -9.0, -9.0]
NC, NR = [4, 2, 5], [3, 6, 1]
# Mean per-token log-probs (reference-free losses): in (-inf, 0), on both sides of -log 2.
AC, AR = [-0.3, -1.2, -2.5, -0.05], [-0.9, -0.4, -3.0, -0.7]


def t(xs):
    return torch.tensor(xs, dtype=F64)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_loss_per_token_and_rewards_summed(beta):
    losses, rc, rr = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, "ipo", chosen_tokens=t(NC), rejected_tokens=t(NR))
    want = [((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2 for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert rc.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)])  # sums, as every loss type
    assert rr.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PR, RR)])
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, "ipo")


@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (2.0, 0.7, 1.0)])
def test_kto_loss_matches_formula(beta, wd, wu):
    kl_pol, kl_ref = t([-20.0, -15.0, -30.0]), t([-21.0, -15.5, -29.0])
    z0 = kto_reference_point(kl_pol, kl_ref)
    assert z0.item() == pytest.approx(max(0.0, ((1.0 + 0.5 - 1.0) / 3)))
    assert kto_reference_point(kl_ref, kl_pol).item() == 0.0  # clamped at 0
    losses, rc, rr = kto_loss(t(PC), t(PR), t(RC), t(RR), z0, beta, wd, wu)
    z = z0.item()
    want = ([wd * (1 - _sig(beta * ((pc - rc) - z))) for pc, rc in zip(PC, RC)]
            + [wu * (1 - _sig(beta * (z - (pr - rr)))) for pr, rr in zip(PR, RR)])
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert rc.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)])
    pc = t(PC).requires_grad_()
    kl_pol = kl_pol.clone().requires_grad_()
    z0 = kto_reference_point(kl_pol, kl_ref)
    assert not z0.requires_grad  # detached: the reference point gets no gradient
    kto_loss(pc, t(PR), t(RC), t(RR), z0, beta)[0].sum().backward()
    assert (pc.grad < 0).all()  # descent raises the desirable log-probs


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_loss_matches_formula(beta):
    losses, rc, rr, ratio, log_odds = odds_ratio_loss(t(AC), t(AR), beta)  # in float32, as TRL
    odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731  log(p / (1 - p)), p = exp(lp)
    lo = [odds(c) - odds(r) for c, r in zip(AC, AR)]
    assert losses.tolist() == pytest.approx([-beta * _logsig(x) for x in lo], rel=1e-5)
    assert ratio.item() == pytest.approx(sum(_logsig(x) for x in lo) / len(lo), rel=1e-5)
    assert log_odds.item() == pytest.approx(sum(lo) / len(lo), rel=1e-5)
    assert rc.tolist() == pytest.approx([beta * x for x in AC], rel=1e-6)
    assert rr.tolist() == pytest.approx([beta * x for x in AR], rel=1e-6)


@pytest.mark.parametrize("beta,gamma,ls", [(2.0, 1.0, 0.0), (2.5, 0.0, 0.0), (0.1, 0.5, 0.1)])
def test_simpo_loss_matches_formula(beta, gamma, ls):
    losses, rc, rr = simpo_loss(t(AC), t(AR), beta, gamma, ls)
    x = [beta * (c - r) - gamma for c, r in zip(AC, AR)]
    assert losses.tolist() == pytest.approx([-(1 - ls) * _logsig(v) - ls * _logsig(-v) for v in x], rel=1e-10)
    assert rc.tolist() == pytest.approx([beta * v for v in AC])


# ----------------------------------------------------------------------------- against TRL
def _acc():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _fake_batch(n_rows: int, width: int = 7, vocab: int = 11, seed: int = 0):
    """Random logits of a 'model' and a batch whose completion starts after a varying prompt."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, width, vocab, generator=g, dtype=F64)
    ids = torch.randint(0, vocab, (n_rows, width), generator=g)
    completion = torch.zeros(n_rows, width, dtype=torch.long)
    for r in range(n_rows):
        start, end = 2 + r % 3, width - (r % 2)
        completion[r, start:end] = 1
    # Our side: summed log-probs of the completion tokens, each predicted from the previous position.
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    sums = (logp * completion[:, 1:]).sum(1)
    return logits, ids, completion, sums, completion.sum(1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl_loss_and_logged_rewards(loss_type):
    trl = pytest.importorskip("trl")
    B, beta = 3, 0.3
    logits, ids, completion, sums, count = _fake_batch(2 * B)
    ref = sums - t([0.5, -1.0, 2.0, 0.3, 1.5, -0.2])
    me = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_acc(), aux_loss_enabled=False, ld_alpha=None,
                         precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                         loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                         _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    model = lambda **kw: SimpleNamespace(logits=logits.clone())  # noqa: E731
    loss = trl.DPOTrainer._compute_loss(me, model, inputs, False)
    losses, rc, rr = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta, loss_type,
                              chosen_tokens=count[:B], rejected_tokens=count[B:])
    assert losses.mean().item() == pytest.approx(loss.item(), rel=1e-9)
    logged = me._metrics["train"]
    assert logged["rewards/chosen"][0] == pytest.approx(rc.mean().item(), rel=1e-9)
    assert logged["rewards/rejected"][0] == pytest.approx(rr.mean().item(), rel=1e-9)
    assert logged["rewards/margins"][0] == pytest.approx((rc - rr).mean().item(), rel=1e-9)
    assert logged["logps/chosen"][0] == pytest.approx(sums[:B].mean().item(), rel=1e-9)


def test_kto_matches_trl():
    trl = pytest.importorskip("trl")
    N, beta = 6, 0.2
    logits, ids, completion, sums, _ = _fake_batch(N, seed=1)
    label = torch.tensor([True, False, True, True, False, False])
    ref = sums + t([0.4, -0.7, 1.1, -0.2, 0.9, 0.3])
    kl_pol, kl_ref = sums - 3.0, sums - 3.0 - t([0.5, 0.1, -0.3, 0.8, 0.2, 0.6])
    me = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_acc(), aux_loss_enabled=False,
                         precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
                         desirable_weight=0.8, undesirable_weight=1.3, _compute_kl_logps=lambda model, batch: kl_pol,
                         _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion, "label": label,
              "ref_logps": ref, "ref_KL_logps": kl_ref}
    loss = trl.KTOTrainer._compute_loss(me, lambda **kw: SimpleNamespace(logits=logits.clone()), inputs, False)
    z0 = kto_reference_point(kl_pol, kl_ref)
    losses, rc, rr = kto_loss(sums[label], sums[~label], ref[label], ref[~label], z0, beta, 0.8, 1.3)
    assert losses.mean().item() == pytest.approx(loss.item(), rel=1e-9)
    logged = me._metrics["train"]
    assert logged["kl"][0] == pytest.approx(z0.item(), rel=1e-9)
    assert logged["rewards/chosen"][0] == pytest.approx(rc.mean().item(), rel=1e-9)
    assert logged["rewards/rejected"][0] == pytest.approx(rr.mean().item(), rel=1e-9)
    assert logged["logps/rejected"][0] == pytest.approx(sums[~label].mean().item(), rel=1e-9)


def test_orpo_matches_trl_odds_ratio_loss():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.15
    me = SimpleNamespace(beta=beta, accelerator=_acc())
    t_losses, t_rc, t_rr, t_ratio, t_odds = ORPOTrainer.odds_ratio_loss(me, t(AC), t(AR))
    losses, rc, rr, ratio, odds = odds_ratio_loss(t(AC), t(AR), beta)
    assert losses.tolist() == pytest.approx((-t_losses).tolist(), rel=1e-6)  # TRL subtracts its mean
    assert (rc.tolist(), rr.tolist()) == (pytest.approx(t_rc.tolist()), pytest.approx(t_rr.tolist()))
    assert (ratio.item(), odds.item()) == (pytest.approx(t_ratio.item(), rel=1e-6), pytest.approx(t_odds.item(), rel=1e-6))


@pytest.mark.parametrize("gamma,ls", [(0.5, 0.0), (1.4, 0.1)])
def test_simpo_matches_trl_cpo_loss(gamma, ls):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    beta = 2.0
    me = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=ls,
                         accelerator=_acc())
    t_losses, t_rc, t_rr = CPOTrainer.cpo_loss(me, t(AC), t(AR))
    losses, rc, rr = simpo_loss(t(AC), t(AR), beta, gamma, ls)
    assert losses.tolist() == pytest.approx(t_losses.tolist(), rel=1e-10)
    assert rc.tolist() == pytest.approx(t_rc.tolist()) and rr.tolist() == pytest.approx(t_rr.tolist())


# ----------------------------------------------------------------------------- config and plan
@pytest.mark.parametrize("override,match", [
    ("kto.desirable_weight=0", r"^kto: desirable_weight must be > 0, got 0"),
    ("kto.undesirable_weight=-1", r"^kto: undesirable_weight must be > 0, got -1"),
    ("kto.beta=0", r"^kto: beta must be > 0"),
    ("simpo.gamma=-0.5", r"^simpo: gamma must be >= 0, got -0.5"),
    ("simpo.beta=-1", r"^simpo: beta must be > 0"),
    ("orpo.beta=0", r"^orpo: beta must be > 0"),
    ("orpo.lr=-1", r"^orpo: lr must be > 0"),
])
def test_bad_config_is_one_line_before_any_model(tmp_path, override, match):
    algo = override.split(".")[0]
    with pytest.raises(ConfigError, match=match) as e:
        train(compose_train(tmp_path / "run", f"algo={algo}", override))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.parametrize("overrides,plan", [
    (["algo=orpo"], ["sft", "orpo"]),  # SFT is ORPO's evaluation baseline, not its start
    (["algo=kto"], ["sft", "kto"]),
    (["algo=simpo"], ["sft", "simpo"]),
    (["algo=orpo", "orpo.policy_path=/some/sft"], ["orpo"]),
    (["algo=simpo", "simpo.policy_path=/some/sft"], ["simpo"]),
])
def test_plan(tmp_path, overrides, plan):
    assert plan_stages(compose_train(tmp_path, *overrides)) == plan


def test_root_settings_reach_the_right_fields(tmp_path):
    from rlhf.training.plan import apply_root_settings

    for algo in ("kto", "orpo", "simpo"):
        cfg = compose_train(tmp_path, f"algo={algo}", "lr=1e-4", "kl_coef=0.02")
        beta = cfg[algo].beta
        apply_root_settings(cfg)
        assert cfg[algo].lr == 1e-4, algo
        assert cfg[algo].beta == (0.02 if algo == "kto" else beta), algo  # ORPO, SimPO: no KL coefficient


def test_kto_mismatched_pairs_shift_completions_by_one():
    from rlhf.data import PreferenceDataModule, SyntheticPreferences
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.stages.kto import mismatched

    tok = load_tokenizer("gpt2-bundled")
    dm = PreferenceDataModule(SyntheticPreferences(n_pairs=20).load(), tok, "pairs", 3, 48, 12)
    b = next(iter(dm.ordered_loader()))
    ids, mask, labels = mismatched(b, tok.pad_token_id)
    rows = [(b[f"{s}_input_ids"][i], b[f"{s}_labels"][i], b[f"{s}_attention_mask"][i])
            for s in ("chosen", "rejected") for i in range(3)]
    for r in range(6):
        prompt = rows[r][0][(rows[r][1] == -100) & (rows[r][2] == 1)].tolist()
        completion = rows[r - 1][0][rows[r - 1][1] != -100].tolist()  # the previous example's (r=0: the last)
        n = int(mask[r].sum())
        assert ids[r, :n].tolist() == prompt + completion
        assert labels[r, :n].tolist() == [-100] * len(prompt) + completion and (labels[r, n:] == -100).all()


# ----------------------------------------------------------------------------- two steps of each stage
@pytest.mark.parametrize("algo,metrics", [("kto", ["kl", "rewards_chosen"]), ("orpo", ["log_odds_ratio", "nll_loss"]),
                                          ("simpo", ["logps_chosen", "reward_accuracy"])])
def test_two_steps(algo, metrics, trained_artifacts, tmp_path):
    from safetensors.torch import load_file

    cls, box = stages()[algo], {}
    init, finish = cls.__init__, cls.finish

    def keep_start(self, *a, **k):
        init(self, *a, **k)
        box["start"] = {n: v.clone() for n, v in self.policy.state_dict().items()}

    def keep_module(self, *a, **k):
        box["module"] = self
        return finish(self, *a, **k)

    run = tmp_path / "run"
    cfg = compose_train(run, f"algo={algo}", f"stage={algo}", f"{algo}.policy_path={trained_artifacts['sft']}",
                        *TINY_DATA, f"{algo}.batch_size=8", f"{algo}.max_steps=2", f"{algo}.eval_prompts=8",
                        f"{algo}.response_length=8", f"{algo}.max_prompt_length=48", f"{algo}.max_response_length=16",
                        f"{algo}.val_batches=1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "__init__", keep_start)
        mp.setattr(cls, "finish", keep_module)
        summary = train(cfg)
    module, sft = box["module"], load_file(str(trained_artifacts["sft"] / "model.safetensors"))
    moved = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, box["start"][k])]
    assert moved, "no policy weight changed"
    # The baseline (KTO: also the reference) is the SFT export, bit for bit; ORPO started elsewhere.
    assert all(torch.equal(v, sft[k]) for k, v in module.ref_policy.state_dict().items() if k in sft)
    assert (algo == "orpo") != all(torch.equal(v, sft[k]) for k, v in box["start"].items() if k in sft)
    df = pd.read_csv(run / algo / "metrics.csv")
    assert list(df.columns[:8]) == ["step", "policy_loss", "value_loss", "kl_divergence", "reward_score",
                                    "learning_rate", "batch_size", "timestamp"]
    assert df["step"].tolist() == [1, 2] and df["batch_size"].eq(8).all() and set(metrics) <= set(df.columns)
    result = summary["stages"][algo]
    assert result["steps"] == 2 and result["eval_prompts"] == 8 and 0 <= result["gold_win_rate"] <= 1
    assert (module.ref_logps is not None) == (algo == "kto")  # only KTO caches reference log-probs


# ----------------------------------------------------------------------------- KTO from an unpaired file
def _write_rows(path, rows):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


P = "\n\nHuman: hi\n\nAssistant:"


@pytest.mark.parametrize("row,match", [
    ({"prompt": P, "completion": " ok"}, r"kto\.jsonl:2: missing key 'label'"),
    ({"prompt": P, "completion": " ok", "label": "true"}, r"kto\.jsonl:2: 'label' must be a JSON boolean, got str"),
    ({"prompt": "hi", "completion": " ok", "label": True}, r"kto\.jsonl:2: 'prompt' must end with"),
    ({"prompt": P, "completion": "  ", "label": False}, r"kto\.jsonl:2: 'completion' is empty"),
    ('{"prompt": ', r"kto\.jsonl:2: line is not valid JSON"),
])
def test_unpaired_file_errors_name_file_and_line(tmp_path, row, match):
    from rlhf.data import DataError
    from rlhf.data.unpaired import read_unpaired_file

    path = _write_rows(tmp_path / "kto.jsonl", [{"prompt": P, "completion": " fine", "label": True}, row])
    with pytest.raises(DataError, match=match) as e:
        read_unpaired_file(path)
    assert "\n" not in str(e.value)


def test_unpaired_file_needs_both_labels_and_a_batch_that_can_hold_both(tmp_path):
    from rlhf.data import DataError
    from rlhf.data.unpaired import read_unpaired_file

    good = {"prompt": P, "completion": " fine", "label": True}
    with pytest.raises(DataError, match=r"kto\.jsonl: no undesirable example"):
        read_unpaired_file(_write_rows(tmp_path / "kto.jsonl", [good] * 3))
    path = _write_rows(tmp_path / "skewed.jsonl", [good] * 30 + [{**good, "label": False}] * 2)
    with pytest.raises(ConfigError, match=r"^kto\.unpaired_path=.*30 desirable and 2 undesirable.*batch_size >= 16"):
        train(compose_train(tmp_path / "run", "algo=kto", f"kto.unpaired_path={path}", "kto.batch_size=8"))
    assert not (tmp_path / "run" / "sft").exists()  # refused before any stage ran


def test_export_unpaired_writes_trl_rows_with_the_asked_imbalance(tmp_path):
    from rlhf.data.export_synthetic import main
    from rlhf.data.unpaired import read_unpaired_file

    out = tmp_path / "kto.jsonl"
    assert main([str(out), "--unpaired", "--pairs", "40", "--undesirable-fraction", "0.25"]) == 0
    rows = read_unpaired_file(out)
    assert sum(r.label for r in rows) == 40 and sum(not r.label for r in rows) == 10
    assert main([str(out), "--unpaired"]) == 1  # never overwritten


def test_stratified_sampler_puts_both_classes_in_every_batch_on_every_rank():
    from rlhf.data.sampler import ResumableShuffleSampler

    labels = [True] * 75 + [False] * 25
    shares = []
    for rank in range(2):
        order = list(ResumableShuffleSampler(100, seed=3, num_replicas=2, rank=rank, labels=labels))
        shares += order
        for b in range(0, len(order) - 3, 4):  # batches of 4 hold one undesirable each
            assert sorted(labels[i] for i in order[b:b + 4]) == [False, True, True, True]
    assert sorted(shares) == list(range(100))  # a permutation, split between the ranks


def test_kto_from_an_unpaired_file(trained_artifacts, tmp_path):
    from rlhf.data.synthetic import write_unpaired_file

    data = tmp_path / "kto.jsonl"
    n = write_unpaired_file(data, 60, seed=1, undesirable_fraction=0.5)
    cls, box = stages()["kto"], {}
    finish = cls.finish

    def keep_module(self, *a, **k):
        box["module"] = self
        return finish(self, *a, **k)

    run = tmp_path / "run"
    cfg = compose_train(run, "algo=kto", "stage=kto", f"kto.policy_path={trained_artifacts['sft']}", *TINY_DATA,
                        f"kto.unpaired_path={data}", "kto.batch_size=6", "kto.max_steps=2", "kto.eval_prompts=8",
                        "kto.response_length=8", "kto.max_prompt_length=48", "kto.max_response_length=16",
                        "kto.val_batches=1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "finish", keep_module)
        summary = train(cfg)
    module = box["module"]
    assert module.ref_logps.shape == (n, 1)  # one reference log-prob per example of the file
    df = pd.read_csv(run / "kto" / "metrics.csv")
    # Every batch met both classes (2 desirable : 1 undesirable), so every margin is a number.
    assert df["step"].tolist() == [1, 2] and df["reward_score"].notna().all() and "reward_accuracy" not in df
    assert summary["stages"]["kto"]["steps"] == 2

    # The unpaired objective of a batch laid out as a pair batch's chosen then rejected rows is the
    # pair objective itself: the same loss, the same KL point, the same rewards.
    from rlhf.data import PreferenceDataModule, SyntheticPreferences

    splits = SyntheticPreferences(n_pairs=20).load()
    pairs = next(iter(PreferenceDataModule(splits, module.tokenizer, "pairs", 3, 48, 16).ordered_loader()))
    rows = next(iter(PreferenceDataModule(splits, module.tokenizer, "unpaired", 6, 48, 16).ordered_loader()))
    order = torch.tensor([0, 2, 4, 1, 3, 5])  # unpair() gives chosen, rejected per pair: regroup
    rows = {k: v[order] for k, v in rows.items()}
    width = pairs["chosen_input_ids"].shape[1]
    rows = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in rows.items()}
    module.eval()
    with torch.no_grad():
        lp, mp_ = module._step(pairs, module.reference_logps(pairs))
        lu, mu = module._step(rows, module.reference_logps(rows))
    assert torch.allclose(lp, lu, atol=1e-5)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert torch.allclose(mp_[k], mu[k], atol=1e-5), k
