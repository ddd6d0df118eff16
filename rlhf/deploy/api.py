"""The OpenAI-compatible HTTP API over a finished run (FastAPI): routes, errors, streaming.

    GET  /health                 {"status": "ok", "model", "policy", "reward": "reward_model" | "gold" | null,
                                  "batches", "sequences", "dropped": decode batches run, the sequences
                                  they held, and those dropped when their client went away}
    GET  /v1/models[/{id}]       the served policy
    POST /v1/completions         OpenAI Completions: prompt (verbatim), max_tokens, temperature, n,
                                 stop, logprobs, seed, stream (+ stream_options.include_usage);
                                 and vLLM's `ignore_eos` (decode max_tokens tokens, for benchmarks)
    POST /v1/chat/completions    OpenAI Chat Completions: messages -> the HH dialogue the policy was
                                 trained on (or the tokenizer's chat template when it has one)
    POST /v1/rewards             {"prompt", "responses": [...]} -> the run's reward per response: its
                                 reward model's normalised score, else its task's gold

Every refusal is OpenAI's error object, {"error": {"message", "type", "param", "code"}}: 400 for a
malformed request (invalid JSON or UTF-8, a wrong type, an unknown field, temperature < 0), 404
for an unknown model or path, 413 for a body over the server's limit, 422 for a valid request over
the server's limits (max_tokens, n, prompts per request, the model's context), 500 if the model
call failed (the server keeps serving).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from rlhf.deploy.engine import Delta, Job, Row
from rlhf.deploy.schemas import ChatCompletionRequest, CompletionRequest, RewardRequest

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # the HH turn markers (rlhf.data.pairs)


@dataclass
class Limits:
    max_tokens: int = 256       # per choice
    max_rows: int = 32          # prompts x n per request; responses per /v1/rewards request
    max_body_bytes: int = 65536


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param=None, code=None) -> dict:
    kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Served:
    """What the routes use: the run's artifacts, the engine, the model's public name, the limits."""
    artifacts: object
    engine: object
    name: str
    limits: Limits = field(default_factory=Limits)

    @property
    def tokenizer(self):
        return self.artifacts.tokenizer


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="rlhf-lightning", docs_url=None, redoc_url=None)
    app.state.served = served
    app.add_middleware(BodyLimit, limit=served.limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"the body is not valid JSON in UTF-8 ({err.get('msg')})"), 400)
        msg = err.get("msg", "invalid request").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unrecognized request argument"
        param = ".".join(loc) or None
        return JSONResponse(error_body(400, f"{param}: {msg}" if param else msg, param), 400)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        msg = {404: f"unknown path {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        if e.status_code == 400 and "parsing the body" in str(e.detail):
            msg = "the body is not valid JSON in UTF-8"
        return JSONResponse(error_body(e.status_code, str(msg)), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        message = f"internal error: {type(e).__name__}: {e}".splitlines()[0]
        return JSONResponse(error_body(500, message, code="internal_error"), 500)

    @app.get("/health")
    async def health():
        a = served.artifacts
        return {"status": "ok", "model": served.name, "policy": str(a.policy_dir), "reward": _reward_source(a),
                "batches": served.engine.batches, "sequences": served.engine.rows_done,
                "dropped": served.engine.dropped}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _check_model(served, req.model)
        return await _generate(served, req, req.prompts, req.max_tokens, "completion")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        _check_model(served, req.model)
        prompt, stops = chat_prompt(served.tokenizer, [m.model_dump() for m in req.messages])
        req.stop = list(req.stop) + [s for s in stops if s not in req.stop]
        return await _generate(served, req, [prompt], req.limit, "chat")

    @app.post("/v1/rewards")
    async def rewards(req: RewardRequest):
        if req.model is not None:
            _check_model(served, req.model)
        a, k = served.artifacts, len(req.responses)
        source = _reward_source(a)
        if source is None:
            raise APIError(404, "this run has no reward model (rm/model or reward.model_path) and its task "
                                "no gold function", code="no_reward")
        if k > served.limits.max_rows:
            raise APIError(422, f"{k} responses; this server scores at most {served.limits.max_rows} per request",
                           "responses")
        scores = await _run_job(served, lambda: a.rewards([req.prompt] * k, req.responses))
        if not all(math.isfinite(s) for s in scores):
            raise RuntimeError(f"the {source} returned a non-finite score")
        return {"object": "list", "model": served.name, "source": source,
                "data": [{"object": "reward", "index": i, "score": s} for i, s in enumerate(scores)]}

    return app


def _reward_source(artifacts) -> str | None:
    if artifacts.reward_dir is not None:
        return "reward_model"
    return "gold" if artifacts.gold is not None else None


def _model_card(served: Served) -> dict:
    created = int(served.artifacts.policy_dir.stat().st_mtime)
    return {"id": served.name, "object": "model", "created": created, "owned_by": "rlhf-lightning"}


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"the model `{name}` does not exist; this server serves `{served.name}`",
                       "model", "model_not_found")


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """(prompt, extra stop strings) for a message list: the tokenizer's chat template when it has
    one, else the HH dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ..."), system text first, stopping
    where the policy would start the human's next turn."""
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be from the assistant: the reply is generated after it",
                       "messages")
    if not any(m["role"] == "user" for m in messages):
        raise APIError(400, "messages must include a user message", "messages")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), []
    system = " ".join(m["content"].strip() for m in messages if m["role"] in ("system", "developer"))
    turns = "".join(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content'].strip()}"
                    for m in messages if m["role"] in ("user", "assistant"))
    return f"{system}{turns}{ASSISTANT}", [HUMAN]


async def _run_job(served: Served, fn):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    served.engine.submit(Job(fn, lambda v: loop.call_soon_threadsafe(_settle, done, v)))
    value = await done
    if isinstance(value, BaseException):
        raise value
    return value


def _settle(future, value) -> None:
    if not future.done():
        future.set_result(value)


async def _generate(served: Served, req, prompts: list[str], max_tokens: int | None, kind: str):
    lim, tok = served.limits, served.tokenizer
    rows_wanted = len(prompts) * req.n
    if rows_wanted > lim.max_rows:
        what = "n" if len(prompts) == 1 else "prompt"
        raise APIError(422, f"{len(prompts)} prompt(s) x n={req.n} is {rows_wanted} sequences; this server "
                            f"generates at most {lim.max_rows} per request", what)
    if max_tokens is not None and max_tokens > lim.max_tokens:
        raise APIError(422, f"max_tokens={max_tokens} is above this server's limit of {lim.max_tokens}",
                       "max_tokens")
    ids = [tok(p).input_ids for p in prompts]
    context = served.artifacts.context_length
    if max_tokens is None:  # chat without a limit: as many as the server and the context allow
        max_tokens = min(lim.max_tokens, context - max(map(len, ids))) if context else lim.max_tokens
    for i, p in enumerate(ids):
        if context is not None and len(p) + max_tokens > context:
            raise APIError(422, f"prompt {i} is {len(p)} tokens; with max_tokens={max_tokens} that exceeds "
                                f"the model's context of {context} tokens", "max_tokens")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    top = req.logprobs if kind == "completion" else (req.top_logprobs or 0) if req.logprobs else None
    rows = []
    for i in range(rows_wanted):
        sink = (lambda d, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, d)))
        seed = None if req.seed is None else req.seed + i
        rows.append(Row(ids[i // req.n], max_tokens, req.temperature, sink, tuple(req.stop), top, seed,
                        req.ignore_eos))
    for r in rows:
        served.engine.submit(r)
    out = _Output(kind, served.name, len(rows), sum(map(len, ids)), strip=kind == "chat" and not
                  getattr(tok, "chat_template", None))
    if req.stream:
        return StreamingResponse(_stream(out, events, rows, req.include_usage), media_type="text/event-stream")
    try:
        while not out.finished:
            i, d = await events.get()
            if isinstance(d, BaseException):
                raise d
            out.add(i, d)
    finally:
        for r in rows:
            r.cancelled.set()  # a no-op for finished rows; frees the batch if this request was abandoned
    return out.response()


async def _stream(out: "_Output", events: asyncio.Queue, rows: list[Row], include_usage: bool):
    try:
        if out.kind == "chat":
            for i in range(len(rows)):
                yield _sse(out.chunk(i, Delta(""), role=True))
        while not out.finished:
            i, d = await events.get()
            if isinstance(d, BaseException):
                message = f"internal error: {type(d).__name__}: {d}".splitlines()[0]
                yield _sse(error_body(500, message, code="internal_error"))
                return
            text = out.add(i, d)
            if text or d.finish_reason or d.logprobs:
                yield _sse(out.chunk(i, Delta(text, d.logprobs, d.finish_reason)))
        if include_usage:
            yield _sse(out.envelope("chunk") | {"choices": [], "usage": out.usage()})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream: the engine drops its rows
        for r in rows:
            r.cancelled.set()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Output:
    """The choices of one request as they arrive, and their OpenAI JSON (whole or as chunks)."""

    def __init__(self, kind: str, model: str, n: int, prompt_tokens: int, strip: bool):
        self.kind, self.model, self.strip = kind, model, strip
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts, self.logprobs = [""] * n, [[] for _ in range(n)]
        self.finish, self.tokens, self.prompt_tokens = [None] * n, [0] * n, prompt_tokens

    @property
    def finished(self) -> bool:
        return all(f is not None for f in self.finish)

    def add(self, i: int, d: Delta) -> str:
        """Record a delta; returns its text as sent (HH chat replies lose the space after "Assistant:")."""
        text = d.text.lstrip() if self.strip and not self.texts[i] else d.text
        self.texts[i] += text
        self.logprobs[i] += d.logprobs
        if d.finish_reason:
            self.finish[i], self.tokens[i] = d.finish_reason, d.completion_tokens
        return text

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def envelope(self, part: str = "") -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if part and self.kind == "chat":
            obj += ".chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, lps, offset: int = 0):
        if self.kind == "chat":
            entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
            return {"content": [entry(x.token, x.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in x.top]}
                                for x in lps]}
        offsets, at = [], offset
        for x in lps:
            offsets.append(at)
            at += len(x.token)
        return {"tokens": [x.token for x in lps], "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [dict(x.top) for x in lps], "text_offset": offsets}

    def chunk(self, i: int, d: Delta, role: bool = False) -> dict:
        lp = self._logprobs(d.logprobs) if d.logprobs else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {"content": d.text} if d.text else {}
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
        else:
            choice = {"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
        return self.envelope("chunk") | {"choices": [choice]}

    def response(self) -> dict:
        choices = []
        for i, (text, lps, reason) in enumerate(zip(self.texts, self.logprobs, self.finish)):
            lp = self._logprobs(lps) if lps else None
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        return self.envelope() | {"choices": choices, "usage": self.usage()}


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, from Content-Length when it is sent
    (before reading), else while reading a chunked body; the routes then see the body replayed.

    The 413 closes the connection, and a close with bytes still unread makes the kernel send a reset
    that can destroy the reply before the client reads it. So a body of up to `drain` bytes is read
    and discarded first (the lingering close of nginx, which uvicorn does not do); a larger claimed
    body, or one whose client waits on `Expect: 100-continue` and so has sent nothing, is refused
    from the header alone."""

    def __init__(self, app, limit: int, drain: int = 1 << 20, drain_seconds: float = 5.0):
        self.app, self.limit, self.drain, self.drain_seconds = app, limit, drain, drain_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        size = int(length) if length.isdigit() else None
        if size is not None and size > self.limit:
            if size <= self.drain and headers.get(b"expect", b"").lower() != b"100-continue":
                await self._discard(receive, size)
            return await self._refuse(size, send)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = message.get("more_body", False)
            if total > self.limit:
                if more:
                    await self._discard(receive, self.drain - total)
                return await self._refuse(total, send, at_least=True)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)

    async def _discard(self, receive, budget: int) -> None:
        """Read and drop the rest of the body: at most `budget` bytes, for at most `drain_seconds`."""
        try:
            async with asyncio.timeout(self.drain_seconds):
                while budget > 0:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    budget -= len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            return

    async def _refuse(self, size: int, send, at_least: bool = False):
        what = f"over {self.limit} bytes ({size} received)" if at_least else f"{size} bytes"
        data = json.dumps(error_body(413, f"body is {what}; the limit is {self.limit}")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


def _replay(messages: list, receive):
    async def replay():
        return messages.pop(0) if messages else await receive()
    return replay
