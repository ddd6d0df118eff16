"""data=gsm8k on the small file in its format (tests/data/gsm8k_sample.jsonl): verl's strict verifier,
the pairs and the held-out split, file errors, chat-template prompts, and a short SFT -> GRPO run
rewarded by the verifier."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.data import gsm8k
from rlhf.data.gsm8k import GSM8K, extract_answer
from rlhf.data.pairs import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "tests" / "data" / "gsm8k_sample.jsonl")


@pytest.mark.parametrize("text,answer", [
    ("She has 3*4=12.\n#### 12", "12"),
    ("#### 1,234 apples", "1234"),
    ("#### $18", None),  # strict: the number must follow "#### " directly, as verl's regex reads it
    ("The loss is #### -7", "-7"),
    ("#### 3.5", "3.5"),
    ("first #### 4 then #### 5", "4"),  # the first "#### " counts (verl's re.search)
    ("The answer is 12.", None),  # no "####": no answer, however right the number
    ("####12", None),
])
def test_strict_extraction_reads_the_number_after_the_marker(text, answer):
    assert extract_answer(text) == answer


def test_pairs_split_and_verifier():
    task = GSM8K(data_files=SAMPLE, val_fraction=0.2, seed=0)
    splits = task.load()
    assert not {p.prompt for p in splits.train} & {p.prompt for p in splits.val}
    assert len(splits.train) + len(splits.val) == 40 and len(splits.val) >= 6
    for p in splits.train + splits.val:
        assert p.prompt.startswith("\n\nHuman: ") and p.prompt.endswith(f'{gsm8k.INSTRUCTION}\n\nAssistant:')
        assert "<<" not in p.chosen  # calculator annotations removed
        assert task.verify(p.prompt, p.chosen) and not task.verify(p.prompt, p.rejected)
        assert p.chosen.rsplit("#### ", 1)[0] == p.rejected.rsplit("#### ", 1)[0]  # only the answer differs
    p = splits.val[0]
    assert gsm8k.correct([p.prompt] * 3, [p.chosen, p.rejected, " no idea"]) == [1.0, 0.0, 0.0]
    assert task.gold(p.prompt, p.chosen) == 1.0
    with pytest.raises(KeyError, match="not one of the loaded GSM8K problems"):
        gsm8k.verify("\n\nHuman: unseen?\n\nAssistant:", "#### 1")
    assert GSM8K(data_files=SAMPLE, max_pairs=5).load().train.__len__() == 5


@pytest.mark.parametrize("row,match", [
    ({"question": "q"}, "'answer'"),
    ({"question": "", "answer": "#### 1"}, "'question'"),
    ({"question": "q", "answer": "It is 4."}, "no final line"),
    (["q", "a"], "JSON object"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, row, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=match) as e:
        GSM8K(data_files=str(path)).load()
    assert str(e.value).startswith(f"{path}:2:") and "\n" not in str(e.value)


def test_bad_settings_are_refused():
    with pytest.raises(DataError, match="prompt_format"):
        GSM8K(prompt_format="alpaca")
    with pytest.raises(DataError, match="needs data.tokenizer"):
        GSM8K(prompt_format="chat")
    with pytest.raises(DataError, match="max_pairs"):
        GSM8K(data_files=SAMPLE, max_pairs=0)


def test_hub_unreachable_says_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="data.data_files=PATH"):
        GSM8K(path="openai/gsm8k-not-cached-here").load()


def test_chat_format_uses_the_tokenizers_template(tmp_path):
    from rlhf.models.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2-bundled")
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    splits = GSM8K(data_files=SAMPLE, prompt_format="chat", tokenizer=str(tmp_path / "tok")).load()
    p = splits.train[0]
    assert p.prompt.startswith("<|user|>") and p.prompt.endswith(f"{gsm8k.INSTRUCTION}<|end|><|assistant|>")
    assert not p.chosen.startswith(" ") and p.chosen.startswith(p.chosen.strip())  # no HH space before it
    with pytest.raises(DataError, match="no chat template"):
        GSM8K(data_files=SAMPLE, prompt_format="chat", tokenizer="gpt2-bundled").load()


@pytest.mark.slow
def test_gsm8k_grpo_is_rewarded_by_the_verifier(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "data=gsm8k", f"data.data_files={SAMPLE}", "algo=grpo",
                           "debug=fast", "grpo.max_steps=2", "eval.num_samples=2", "eval.pass_k=[1,2]",
                           f"paths.output_dir={run}", "callbacks.progress_bar.refresh_rate=0",
                           "++callbacks.analysis_report=null"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"] == ["sft", "grpo"]  # the verifier rewards GRPO: no reward model
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and set(summary["pass_at_k"]) == {"before", "after"}
    assert "fn: rlhf.data.gsm8k.correct" in (run / "config.yaml").read_text()
    assert "response_length: 128" in (run / "config.yaml").read_text()
