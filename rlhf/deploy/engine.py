"""The server's batching engine: requests that arrive together are decoded as one batch.

One worker thread owns the models. It takes the first waiting request, collects more for up to
`window_s` seconds (or until `max_batch_size` rows), left-pads their prompts and runs the KV-cached
decode loop (`rlhf.models.sampling.decode_steps`) once for all of them: each row keeps its own
temperature, seed, `max_tokens` and stop strings, and leaves the batch's bookkeeping when it ends
(its compute slot idles until the longest row is done: static batching, as in Orca's baseline,
not continuous batching). Every model call, reward scoring included, runs in this one thread:
on a CPU concurrent model calls would only fight for the same cores, and a fast tokenizer must
not be used from two threads at once.

Each row reports through its `sink` (called in the worker thread): `Delta`s of new text as they
are decoded, then a final `Delta` with `finish_reason` ("stop": end-of-sequence token or a stop
string, which is never emitted; "length": `max_tokens` reached), or an exception if the batch
failed. Text that could still grow into a stop string, or ends inside a multi-byte character,
is held back until it cannot.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from rlhf.models.sampling import decode_steps, draw


@dataclass
class TokenLogprob:
    """A sampled token, its log-prob under the policy (temperature 1) and the `top` most likely
    alternatives as (token, log-prob) pairs."""
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0  # set on the final delta


@dataclass
class Row:
    """One sequence to generate (a request with `n` choices is `n` rows)."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    sink: Callable[[Delta | BaseException], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the top k
    seed: int | None = None
    ignore_eos: bool = False  # decode max_tokens whatever the policy says (benchmarks)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Job:
    """Any other model call (reward scoring), run in the worker thread between batches."""
    fn: Callable[[], object]
    sink: Callable[[object], None]


_NOTHING = object()


class Engine:
    """`submit(Row | Job)` from any thread. Counters: `batches` decode batches run (each one model call
    per step for all its rows), `rows_done` the rows they held, `dropped` rows abandoned mid-decode
    because their client went away."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, window_s: float = 0.02):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.window_s = max_batch_size, window_s
        self.device = next(model.parameters()).device
        self.batches = self.rows_done = self.dropped = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rlhf-engine", daemon=True)
        self._thread.start()

    def submit(self, item: Row | Job) -> None:
        self._queue.put(item)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the work in hand, then stop the worker (the server's shutdown)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            while isinstance(item, Job):
                _report(item.sink, _call(item.fn))
                item = self._queue.get()
            if item is None:
                return
            rows, deadline, held = [item], time.monotonic() + self.window_s, _NOTHING
            while len(rows) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if not isinstance(nxt, Row):  # a job or the stop signal: after this batch
                    held = nxt
                    break
                rows.append(nxt)
            try:
                self._run([r for r in rows if not r.cancelled.is_set()])
            except Exception as e:  # a failed batch fails its requests, never the server
                traceback.print_exc()
                for r in rows:
                    _report(r.sink, e)
            if held is None:
                return
            if held is not _NOTHING:
                _report(held.sink, _call(held.fn))

    @torch.no_grad()
    def _run(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.batches += 1
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=self.device)
        temps = torch.tensor([[max(r.temperature, 1e-6)] for r in rows], device=self.device)
        greedy = torch.tensor([r.temperature == 0 for r in rows], device=self.device)
        gens = [torch.Generator(self.device).manual_seed(r.seed) if r.seed is not None else None for r in rows]
        states = [_RowState(r) for r in rows]
        steps = decode_steps(self.model, ids, mask)
        logits = next(steps)
        for t in range(max(r.max_tokens for r in rows)):
            u = None
            if any(g is not None for g in gens):
                u = torch.cat([torch.rand(1, device=self.device, generator=g) for g in gens])[:, None]
            chosen = torch.where(greedy, logits.argmax(-1), draw(logits, temps, u=u))
            want = [s for s in states if s.live and s.row.logprobs is not None]
            logp = torch.log_softmax(logits.float(), -1) if want else None
            for i, s in enumerate(states):
                if s.live:
                    s.step(int(chosen[i]), logp[i] if logp is not None and s.row.logprobs is not None else None, tok)
            if not any(s.live for s in states):
                break
            logits = steps.send(chosen)
        steps.close()
        self.rows_done += len(rows)
        self.dropped += sum(s.dropped for s in states)


class _RowState:
    """Incremental detokenisation, stop strings and the finish of one row."""

    def __init__(self, row: Row):
        self.row, self.ids, self.sent, self.live, self.dropped = row, [], 0, True, False
        self.pending: list[TokenLogprob] = []

    def step(self, token: int, logp, tok) -> None:
        r = self.row
        if r.cancelled.is_set():  # the client went away: stop spending work on it, report nothing
            self.live, self.dropped = False, True
            return
        if token == tok.eos_token_id and not r.ignore_eos:
            return self._finish("stop", self._text(tok))
        self.ids.append(token)
        if logp is not None:
            top = []
            if r.logprobs:
                vals, idx = logp.topk(r.logprobs)
                top = [(tok.decode([int(j)]), float(v)) for v, j in zip(vals, idx)]
            self.pending.append(TokenLogprob(tok.decode([token]), float(logp[token]), top))
        text = self._text(tok)
        for s in r.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                return self._finish("stop", text[:at])
        if len(self.ids) >= r.max_tokens:
            return self._finish("length", text)
        # A multi-byte character split across tokens waits for the rest; a tail that may still
        # become a stop string is not sent yet.
        safe = len(text.rstrip("\ufffd"))
        safe -= max((k for s in r.stop for k in range(1, min(len(s), safe + 1)) if text[:safe].endswith(s[:k])),
                    default=0)
        if safe > self.sent:
            self._send(Delta(text[self.sent:safe], self.pending))
            self.sent, self.pending = safe, []

    def _text(self, tok) -> str:
        return tok.decode(self.ids, skip_special_tokens=True)

    def _finish(self, reason: str, text: str) -> None:
        self.live = False
        self._send(Delta(text[self.sent:], self.pending, reason, len(self.ids)))

    def _send(self, delta: Delta) -> None:
        _report(self.row.sink, delta)


def _call(fn):
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        return e


def _report(sink, value) -> None:
    try:
        sink(value)
    except RuntimeError:  # the server's event loop is gone (shutdown): nobody is waiting
        pass
