"""Tests for rlhf.data: HH parsing and file validation, the synthetic gold task, the datamodule."""
from __future__ import annotations

import json
import time

import pytest
import torch

from rlhf.data import (
    HHRLHF,
    DataError,
    PreferenceDataModule,
    PreferencePair,
    PreferenceSplits,
    SyntheticPreferences,
    gold_reward,
    gold_reward_batch,
    read_hh_file,
    split_hh,
)
from rlhf.data import synthetic


@pytest.fixture(scope="module")
def tok():
    from rlhf.models.tokenizer import load_tokenizer

    t = load_tokenizer("gpt2-bundled")
    assert t("Hello world").input_ids == [15496, 995]
    return t


def hh(prompt_turns: str, answer: str) -> str:
    return prompt_turns + "\n\nAssistant:" + answer


# --------------------------------------------------------------------------- split_hh

def test_split_single_turn():
    pair = split_hh(hh("\n\nHuman: Hi?", " Hello there."), hh("\n\nHuman: Hi?", " Go away."))
    assert pair == PreferencePair("\n\nHuman: Hi?\n\nAssistant:", " Hello there.", " Go away.")


def test_split_multi_turn_keeps_history_in_prompt():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?"
    pair = split_hh(hh(history, " 4"), hh(history, " 5"))
    assert pair.prompt == history + "\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" 4", " 5")


def test_split_unicode_round_trip():
    prompt = "\n\nHuman: 你好，世界 🌍?"
    pair = split_hh(hh(prompt, " 你好 😊"), hh(prompt, " 🙃 no"))
    assert pair.prompt + pair.chosen == hh(prompt, " 你好 😊")
    assert pair.prompt + pair.rejected == hh(prompt, " 🙃 no")


@pytest.mark.parametrize(
    "chosen,rejected",
    [
        (hh("\n\nHuman: A?", " x"), hh("\n\nHuman: B?", " y")),  # prompts differ
        (hh("\n\nHuman: A?", "   "), hh("\n\nHuman: A?", " y")),  # empty chosen
        (hh("\n\nHuman: A?", " x"), hh("\n\nHuman: A?", "")),  # empty rejected
        ("\n\nHuman: A? no marker", hh("\n\nHuman: A?", " y")),  # no assistant turn
    ],
)
def test_split_drops_unusable(chosen, rejected):
    assert split_hh(chosen, rejected) is None


# --------------------------------------------------------------------------- read_hh_file

GOOD = {"chosen": hh("\n\nHuman: Q?", " good"), "rejected": hh("\n\nHuman: Q?", " bad")}


def write(path, lines):
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name,lines,needle",
    [
        ("empty.jsonl", [], "empty"),
        ("bad.jsonl", [json.dumps(GOOD), "{not json"], ":2: line is not valid JSON"),
        ("list.jsonl", [json.dumps(GOOD), "[1, 2]"], ":2: expected a JSON object"),
        ("key.jsonl", [json.dumps({"chosen": "x"})], ":1: missing key 'rejected'"),
        ("type.jsonl", [json.dumps({"chosen": "x", "rejected": 3})], ":1: 'rejected' must be a string"),
        ("items.json", [json.dumps([GOOD, {"chosen": None, "rejected": "x"}])], "item 1: 'chosen' must be"),
    ],
)
def test_read_hh_file_errors(tmp_path, name, lines, needle):
    path = write(tmp_path / name, lines)
    with pytest.raises(DataError) as e:
        read_hh_file(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_read_hh_file_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_hh_file(tmp_path / "nope.jsonl")


def test_read_hh_file_json_list_and_jsonl(tmp_path):
    as_list = write(tmp_path / "a.json", [json.dumps([GOOD, GOOD])])
    as_lines = write(tmp_path / "b.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD)])
    assert read_hh_file(as_list) == read_hh_file(as_lines) == [GOOD, GOOD]


def test_hhrlhf_local_load_counts_dropped(tmp_path):
    rows = [
        {"chosen": hh(f"\n\nHuman: Q{i}?", f" good {i}"), "rejected": hh(f"\n\nHuman: Q{i}?", " bad")}
        for i in range(10)
    ]
    rows += [{"chosen": hh("\n\nHuman: A?", " x"), "rejected": hh("\n\nHuman: B?", " y")}] * 2
    path = write(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    splits = HHRLHF(data_files=str(path), val_fraction=0.2, seed=1).load()
    assert splits.dropped == 2
    assert (len(splits.train), len(splits.val)) == (8, 2)
    assert {p.prompt for p in splits.train + splits.val} == {f"\n\nHuman: Q{i}?\n\nAssistant:" for i in range(10)}
    assert HHRLHF(data_files=[str(path)], val_fraction=0.2, seed=1).load() == splits  # seeded
    assert HHRLHF.gold is None


def test_hhrlhf_validates_files_before_loading(tmp_path):
    good = write(tmp_path / "ok.jsonl", [json.dumps(GOOD)] * 3)
    with pytest.raises(DataError, match="missing.jsonl"):
        HHRLHF(data_files=[str(good), str(tmp_path / "missing.jsonl")]).load()


def test_hhrlhf_hub_failure_is_short_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach huggingface.co\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        HHRLHF().load()
    msg = str(e.value)
    assert "could not load" in msg and "data.data_files=" in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


# --------------------------------------------------------------------------- synthetic

def prompt_about(topic: str) -> str:
    return f"\n\nHuman: Can you tell me about {topic}?\n\nAssistant:"


def test_synthetic_deterministic_and_fast():
    t0 = time.perf_counter()
    a = SyntheticPreferences(n_pairs=4000, seed=0).load()
    assert time.perf_counter() - t0 < 1.0
    assert len(a.train) + len(a.val) == 4000 and len(a.val) == 400
    assert a == SyntheticPreferences(n_pairs=4000, seed=0).load()
    assert a.train != SyntheticPreferences(n_pairs=4000, seed=1).load().train


def test_synthetic_labels_agree_with_gold_and_are_varied():
    src = SyntheticPreferences(n_pairs=2000, seed=3)
    splits = src.load()
    pairs = splits.train + splits.val
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert src.gold(p.prompt, p.chosen) >= src.gold(p.prompt, p.rejected) + synthetic.TIE_MARGIN
        assert 4 <= len(p.chosen.split()) <= 10 and p.chosen.startswith(" ")
    multi = sum(p.prompt.count("\n\nHuman:") > 1 for p in pairs) / len(pairs)
    assert 0.2 < multi < 0.4
    # Not a length task: "longer wins" must be close to a coin flip.
    longer = sum(len(p.chosen.split()) > len(p.rejected.split()) for p in pairs) / len(pairs)
    assert longer < 0.6


def test_vocabulary_is_single_gpt2_tokens(tok):
    words = [w for ws in synthetic.TOPICS.values() for w in ws]
    words += [*synthetic.POLITE, *synthetic.RUDE, *synthetic.FILLER]
    assert len(words) == len(set(words)) == 8 * 6 + 18
    for w in words:
        assert w.startswith(" ") and len(tok(w).input_ids) == 1, w


def test_gold_on_hand_examples():
    cook = prompt_about("cooking")
    assert gold_reward(cook, " recipe oven salt") == pytest.approx(0.5)
    assert gold_reward(cook, " recipe oven salt") > gold_reward(cook, " guitar song melody")  # on > off topic
    assert gold_reward(cook, " sure glad thanks") > gold_reward(cook, " stupid lazy boring")  # polite > rude
    assert gold_reward(cook, " the a it") == 0.0
    assert gold_reward(cook, "") == gold_reward(cook, "  ...  ") == -1.0
    # Repetition is penalised, and repeating the same words is no way to buy reward.
    assert gold_reward(cook, " recipe recipe recipe") < gold_reward(cook, " recipe oven salt")
    assert gold_reward(cook, " recipe oven recipe oven") < gold_reward(cook, " recipe oven")
    # Length alone never helps: a mean, not a sum.
    assert gold_reward(cook, " recipe oven salt pan flavor dinner") == gold_reward(cook, " recipe oven")
    # Robust parsing: case and punctuation don't matter.
    assert gold_reward(cook, " Recipe, OVEN! salt.") == gold_reward(cook, " recipe oven salt")
    # Exact formula: (0.5 + 0.5 - 1 + 0 + 0.5) / 5 - 0.5 * 1/5
    assert gold_reward(cook, " oven thanks stupid the oven") == pytest.approx(0.5 / 5 - 0.1)


def test_gold_uses_last_human_turn():
    prompt = "\n\nHuman: Any tips on music?\n\nAssistant: song band\n\nHuman: Any tips on cooking?\n\nAssistant:"
    assert gold_reward(prompt, " recipe oven") == pytest.approx(0.5)
    assert gold_reward(prompt, " song band") == pytest.approx(-0.25)
    assert gold_reward_batch([prompt, prompt_about("music")], [" song band"] * 2) == [-0.25, 0.5]


# --------------------------------------------------------------------------- datamodule

PAIRS = [
    PreferencePair("\n\nHuman: Hi?\n\nAssistant:", " Hello there, friend.", " No."),
    PreferencePair(
        "\n\nHuman: A much longer question about cooking and ovens?\n\nAssistant:", " Sure.", " Ugh whatever go away"
    ),
    PreferencePair("\n\nHuman: Q?\n\nAssistant:", " A", " B"),
]


def make_dm(tok, mode, **kw):
    dm = PreferenceDataModule(PreferenceSplits(train=PAIRS, val=PAIRS[:2]), tok, mode, batch_size=3, **kw)
    dm.setup("fit")
    return dm


def val_batch(dm):
    return next(iter(dm.val_dataloader()))


def test_datamodule_sft(tok):
    dm = make_dm(tok, "sft")
    b = val_batch(dm)
    eos = tok.eos_token_id
    for i, p in enumerate(PAIRS[:2]):
        prompt, resp = tok(p.prompt).input_ids, tok(p.chosen).input_ids + [eos]
        n = len(prompt) + len(resp)
        assert b["input_ids"][i, :n].tolist() == prompt + resp
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        # Loss only on response tokens (incl. eos): -100 exactly on prompt and padding.
        assert b["labels"][i].tolist() == [-100] * len(prompt) + resp + [-100] * (b["labels"].shape[1] - n)
        assert (b["input_ids"][i, n:] == eos).all()  # right padding with eos


def test_datamodule_sft_truncation(tok):
    dm = make_dm(tok, "sft", max_prompt_length=3, max_response_length=2)
    b = val_batch(dm)
    prompt = tok(PAIRS[0].prompt).input_ids
    assert b["input_ids"][0, :3].tolist() == prompt[-3:]  # prompt keeps its last tokens
    assert b["labels"][0].tolist()[3:5] == tok(PAIRS[0].chosen).input_ids[:2]  # cut response: no eos
    assert b["input_ids"].shape[1] == 5


def test_datamodule_rm(tok):
    b = val_batch(make_dm(tok, "rm"))
    assert set(b) == {"chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask"}
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape
    for i, p in enumerate(PAIRS[:2]):
        for side, text in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids = tok(p.prompt + text).input_ids  # no eos appended
            mask = b[f"{side}_attention_mask"][i]
            assert int(mask.sum()) == len(ids) and mask[: len(ids)].all()  # right padding
            assert b[f"{side}_input_ids"][i, : len(ids)].tolist() == ids


def test_datamodule_prompts_left_padded(tok):
    dm = make_dm(tok, "prompts", max_prompt_length=12)
    b = val_batch(dm)
    assert b["prompt"] == [PAIRS[0].prompt, PAIRS[1].prompt]
    short, long_ = tok(PAIRS[0].prompt).input_ids, tok(PAIRS[1].prompt).input_ids
    assert len(short) < 12 < len(long_)
    assert b["input_ids"].shape == (2, 12)
    assert b["input_ids"][0, 12 - len(short):].tolist() == short
    assert b["attention_mask"][0].tolist() == [0] * (12 - len(short)) + [1] * len(short)
    assert b["input_ids"][1].tolist() == long_[-12:] and b["attention_mask"][1].all()


def test_datamodule_train_shuffle_is_seeded(tok):
    pairs = SyntheticPreferences(n_pairs=64, seed=0, val_fraction=0.0).load().train
    dms = [PreferenceDataModule(PreferenceSplits(pairs, []), tok, "prompts", 8, seed=s) for s in (0, 0, 1)]
    for dm in dms:
        dm.setup()
    order = [[p for b in dm.train_dataloader() for p in b["prompt"]] for dm in dms]
    assert order[0] == order[1] != order[2]
    assert sorted(order[0]) == sorted(p.prompt for p in pairs) and order[0] != [p.prompt for p in pairs]


def test_datamodule_rejects_bad_arguments(tok):
    splits = PreferenceSplits(PAIRS, [])
    with pytest.raises(ValueError, match="mode"):
        PreferenceDataModule(splits, tok, "ppo", 4)
    with pytest.raises(ValueError, match="batch_size"):
        PreferenceDataModule(splits, tok, "sft", 0)


# --------------------------------------------------------------------------- held-out prompts

def _pairs_with_repeated_prompts(n_prompts: int = 30, per_prompt: int = 4) -> list[PreferencePair]:
    return [PreferencePair(f"\n\nHuman: question {i}?\n\nAssistant:", f" good {i}.{j}", f" bad {i}.{j}")
            for i in range(n_prompts) for j in range(per_prompt)]


def test_split_train_val_keeps_every_prompt_on_one_side():
    from rlhf.data import prompt_overlap, split_train_val

    pairs = _pairs_with_repeated_prompts()
    train, val = split_train_val(pairs, 0.2, seed=3)
    assert sorted(train + val, key=repr) == sorted(pairs, key=repr)  # nothing lost or duplicated
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in val})
    assert len(val) == 24  # 6 whole prompts of 4 pairs: round(120 * 0.2)
    stats = prompt_overlap(PreferenceSplits(train=train, val=val))
    assert stats == {"distinct_train_prompts": 24, "distinct_eval_prompts": 6, "eval_prompts_in_train": 0}
    assert split_train_val(pairs, 0.2, seed=3) == (train, val)  # seeded
    # Two prompts, tiny file: one each side; one prompt: it stays in train.
    two = _pairs_with_repeated_prompts(2, 3)
    t2, v2 = split_train_val(two, 0.05, seed=0)
    assert len({p.prompt for p in t2}) == 1 and len({p.prompt for p in v2}) == 1
    t1, v1 = split_train_val(_pairs_with_repeated_prompts(1, 5), 0.5, seed=0)
    assert len(t1) == 5 and v1 == []


def test_hh_local_file_with_repeated_prompts_holds_prompts_out(tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in _pairs_with_repeated_prompts()]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    splits = HHRLHF(data_files=str(path), val_fraction=0.1, seed=0).load()
    assert splits.val and {p.prompt for p in splits.train}.isdisjoint({p.prompt for p in splits.val})


def test_hh_hub_test_split_drops_prompts_seen_in_train(monkeypatch):
    train_pairs = _pairs_with_repeated_prompts(10, 2)
    test_pairs = _pairs_with_repeated_prompts(14, 1)  # prompts 0..9 repeat train's, 10..13 are new

    def fake_split(self, split):
        pairs = train_pairs if split == "train" else test_pairs
        return [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in pairs]

    monkeypatch.setattr(HHRLHF, "_hub_split", fake_split)
    splits = HHRLHF().load()
    assert len(splits.train) == 20
    assert sorted(p.prompt for p in splits.val) == sorted(f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(10, 14))


def test_synthetic_validation_prompts_are_unseen_phrasings():
    from rlhf.data import prompt_overlap

    splits = SyntheticPreferences(n_pairs=4000, seed=42, val_fraction=0.1).load()
    assert (len(splits.train), len(splits.val)) == (3600, 400)
    stats = prompt_overlap(splits)
    assert stats["eval_prompts_in_train"] == 0 and stats["distinct_eval_prompts"] >= 50
    held_out = [t.split("{}")[0] for t in synthetic.HELD_OUT_TEMPLATES]
    train_text = "".join(p.prompt for p in splits.train)
    assert not any(h in train_text for h in held_out)  # not even in an earlier turn
    for p in splits.val:  # every validation turn asks in a held-out phrasing, about a known topic
        last = p.prompt.rsplit("\n\nHuman: ", 1)[1]
        assert any(last.startswith(h) for h in held_out), p.prompt
        assert synthetic.prompt_topic(p.prompt) in synthetic.TOPICS
