"""The server's batching engine without a server: stop strings never leak into what is sent,
split multi-byte characters wait, rows of one batch keep their own limits, and a batch decodes
each row as it would be decoded alone (left padding handled)."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.deploy.engine import Delta, Engine, Row, _RowState
from rlhf.models.sampling import sample


class CharTokenizer:
    """Token i decodes to VOCAB[i]; 0 is end-of-sequence."""
    VOCAB = ["<eos>", "a", "E", "N", "D", "x", "\ufffd", "é", " "]
    eos_token_id = pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and i == 0))
        return text.replace("\ufffdé", "é")  # token 6 then 7: one character split in two tokens


def run_row(tokens, stop=(), max_tokens=50, ignore_eos=False):
    sent: list[Delta] = []
    state = _RowState(Row([1], max_tokens, 1.0, sent.append, tuple(stop), ignore_eos=ignore_eos))
    for t in tokens:
        if not state.live:
            break
        state.step(t, None, CharTokenizer())
    return sent


def text(deltas):
    return "".join(d.text for d in deltas)


def test_stop_string_is_cut_and_never_sent():
    sent = run_row([1, 2, 3, 4, 5, 5], stop=["END"])  # a E N D x x
    assert text(sent) == "a" and sent[-1].finish_reason == "stop"
    # While "E", "EN" could still become "END", nothing of them was sent.
    assert [d.text for d in sent[:-1]] == ["a"]
    assert sent[-1].completion_tokens == 4


def test_a_false_start_of_a_stop_string_is_sent_once_it_cannot_match():
    sent = run_row([2, 3, 5, 0], stop=["END"])  # E N x <eos>
    assert [d.text for d in sent] == ["ENx", ""] and sent[-1].finish_reason == "stop"


def test_split_character_waits_for_its_second_token():
    sent = run_row([1, 6, 7, 1, 0])
    assert [d.text for d in sent] == ["a", "é", "a", ""]


def test_length_finish_sends_the_held_back_tail():
    sent = run_row([1, 2, 3], stop=["END"], max_tokens=3)
    assert text(sent) == "aEN" and sent[-1].finish_reason == "length" and sent[-1].completion_tokens == 3


def test_ignore_eos_decodes_max_tokens():
    assert text(run_row([1, 0, 1], max_tokens=3)) == "a"
    sent = run_row([1, 0, 1], max_tokens=3, ignore_eos=True)
    assert text(sent) == "aa" and sent[-1].finish_reason == "length" and sent[-1].completion_tokens == 3


def test_a_cancelled_row_reports_nothing_more():
    sent: list[Delta] = []
    state = _RowState(Row([1], 10, 1.0, sent.append))
    state.step(1, None, CharTokenizer())
    state.row.cancelled.set()
    state.step(1, None, CharTokenizer())
    assert not state.live and [d.text for d in sent] == ["a"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=9, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    return model


def collect(engine, rows_spec):
    """Submit rows (prompt ids, max_tokens, temperature) together; returns what each row's sink got."""
    results = [[] for _ in rows_spec]
    left, all_done = [len(rows_spec)], threading.Event()

    def sink(i):
        def put(d):  # runs in the engine's thread: must not block
            results[i].append(d)
            if isinstance(d, BaseException) or d.finish_reason:
                left[0] -= 1
                if not left[0]:
                    all_done.set()
        return put

    for i, (prompt, max_tokens, temperature) in enumerate(rows_spec):
        engine.submit(Row(prompt, max_tokens, temperature, sink(i)))
    assert all_done.wait(60)
    return results


def generate(engine, rows_spec):
    """Each row's (text, finish_reason, completion_tokens)."""
    return [(text(r), r[-1].finish_reason, r[-1].completion_tokens) for r in collect(engine, rows_spec)]


def test_batched_greedy_rows_decode_as_they_would_alone(tiny):
    engine = Engine(tiny, CharTokenizer(), max_batch_size=8, window_s=0.5)
    try:
        prompts = [[1, 2, 3, 4, 5], [5], [3, 3, 1]]
        batch = generate(engine, [(p, 6 + i, 0.0) for i, p in enumerate(prompts)])
        assert engine.batches == 1  # submitted within the window: one batch
        alone = [generate(engine, [(p, 6 + i, 0.0)])[0] for i, p in enumerate(prompts)]
        assert engine.batches == 4
        assert batch == alone
        for (out, reason, n), p, limit in zip(batch, prompts, (6, 7, 8)):
            assert n <= limit and reason == ("length" if n == limit else "stop")
            # ... and as the training sampler decodes greedily.
            ids = torch.tensor([p])
            resp, _ = sample(tiny, ids, torch.ones_like(ids), limit, 0.0, 0, 0)
            kept = [t for t in resp[0].tolist()[:n]]
            assert out == CharTokenizer().decode(kept)
    finally:
        engine.close()


def test_a_failing_batch_fails_its_rows_and_the_engine_goes_on(tiny):
    engine = Engine(tiny, CharTokenizer(), max_batch_size=4, window_s=0.05)
    try:
        failed = collect(engine, [([99], 3, 1.0)])  # a token id outside the vocabulary: the forward fails
        assert len(failed[0]) == 1 and isinstance(failed[0][0], IndexError)
        out = generate(engine, [([1, 2], 3, 1.0)])
        assert out[0][1] in ("stop", "length")
    finally:
        engine.close()


def test_a_row_whose_client_left_is_dropped_mid_decode(tiny):
    engine = Engine(tiny, CharTokenizer(), max_batch_size=4, window_s=0.01)
    try:
        got, finished = [], threading.Event()
        row = Row([1, 2], 60, 1.0, None, ignore_eos=True)

        def sink(d):  # the client hangs up after its first text
            got.append(d)
            row.cancelled.set()
            finished.set()
        row.sink = sink
        engine.submit(row)
        assert finished.wait(60)
        generate(engine, [([1], 2, 1.0)])  # the next batch runs once the abandoned one has ended
        assert engine.dropped == 1 and len(got) == 1 and got[0].finish_reason is None
    finally:
        engine.close()
